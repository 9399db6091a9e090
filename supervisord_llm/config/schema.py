"""The configuration's schema: frozen dataclasses, a `Literal` type for every choice.
Standard library only; `rules.py` builds these from TOML and checks them."""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass, field
from typing import Final, Literal, get_args

DEFAULT_CONFIG_PATH: Final = "/etc/llm-supervisor/config.toml"
DEFAULT_CONTROL_SOCKET: Final = "/run/llm-supervisor/control.sock"
DEFAULT_STATE_DIR: Final = "/var/lib/llm-supervisor"
DEFAULT_METRICS_LISTEN: Final = "127.0.0.1:9468"

LogFormat = Literal["journal", "text", "json"]
GpuBackendName = Literal["auto", "nvml", "amd-sysfs", "sim", "none"]
Vendor = Literal["nvidia", "amd"]
RestartPolicy = Literal["always", "on-failure", "never"]
OnCritical = Literal["pause", "drain-restart", "stop", "none"]
PowerSource = Literal["nut", "none"]
UPS_RE: Final = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)@(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|"
                           r"(?P<host>[A-Za-z0-9_.-]+))(?::(?P<port>[0-9]{1,5}))?$")
CheckpointKind = Literal["http", "command", "signal"]
ProbeKind = Literal["completion"]
ProbeEndpoint = Literal["completions", "chat"]
StartMode = Literal["always", "on-demand"]
PullPolicy = Literal["never", "missing"]
GpuFlag = Literal["cdi", "gpus"]

LOG_FORMATS: Final[tuple[str, ...]] = get_args(LogFormat)
GPU_BACKENDS: Final[tuple[str, ...]] = get_args(GpuBackendName)
VENDORS: Final[tuple[str, ...]] = get_args(Vendor)
RESTART_POLICIES: Final[tuple[str, ...]] = get_args(RestartPolicy)
ON_CRITICAL: Final[tuple[str, ...]] = get_args(OnCritical)
POWER_SOURCES: Final[tuple[str, ...]] = get_args(PowerSource)
CHECKPOINT_KINDS: Final[tuple[str, ...]] = get_args(CheckpointKind)
PROBE_KINDS: Final[tuple[str, ...]] = get_args(ProbeKind)
PROBE_ENDPOINTS: Final[tuple[str, ...]] = get_args(ProbeEndpoint)
START_MODES: Final[tuple[str, ...]] = get_args(StartMode)
PULL_POLICIES: Final[tuple[str, ...]] = get_args(PullPolicy)
GPU_FLAGS: Final[tuple[str, ...]] = get_args(GpuFlag)
# what the router and the gates forward (exact paths; a trailing `*` matches a prefix): the
# OpenAI API and what engines serve to its clients. Anything else (an engine's admin and
# debug endpoints: /slots, /metrics, /reset_prefix_cache, /sleep...) is answered 404.
API_PATHS: Final[tuple[str, ...]] = (
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
    "/v1/models/*", "/v1/responses", "/v1/rerank", "/v1/score", "/v1/audio/transcriptions",
    "/v1/audio/translations", "/tokenize", "/detokenize", "/health")
GIB: Final = 1024**3  # vram_gb counts GiB, as GPU makers and nvidia-smi do ("96 GB" cards)

@dataclass(frozen=True)
class SupervisorSection:
    control_socket: str = DEFAULT_CONTROL_SOCKET
    control_group: str | None = None
    state_dir: str = DEFAULT_STATE_DIR
    log_format: LogFormat = "journal"
    # models outlive the daemon: how long a keeper waits for a daemon to come back, and how
    # long a model may run with no daemon attached at all
    adopt_grace_s: float = 30.0
    unattended_limit_s: float = 300.0
    # under systemd: the front process's MemoryMax= (a runaway costs a front restart)
    front_memory_max_mb: int = 2048


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class MetricsSection:
    listen: Listen | None = Listen("127.0.0.1", 9468)


@dataclass(frozen=True)
class SimGpu:
    uuid: str
    name: str = "Simulated GPU"
    pci_bus_id: str = ""
    numa_node: int = -1
    vendor: Vendor = "nvidia"
    memory_total_bytes: int = 24 * 1024**3
    default_power_limit_w: float = 300.0
    min_power_limit_w: float = 100.0
    max_power_limit_w: float | None = None
    slowdown_c: float = 89.0
    shutdown_c: float = 95.0


@dataclass(frozen=True)
class GpuSection:
    backend: GpuBackendName = "auto"
    poll_interval_s: float = 1.0
    call_timeout_s: float = 2.0
    sim_state_file: str | None = None
    sim: tuple[SimGpu, ...] = ()
    # where the amd-sysfs backend looks for `class/drm`, `class/kfd` (tests, demos: a tree
    # built in a temporary directory)
    sysfs_root: str = "/sys"
    health_interval_s: float = 10.0  # clock events, PCIe link, ECC: read less often


@dataclass(frozen=True)
class Threshold:
    """A temperature: absolute (`base` None) or relative to the GPU's slowdown/shutdown."""

    base: str | None
    offset: float

    def resolve(self, slowdown_c: float | None, shutdown_c: float | None) -> float | None:
        if self.base is None:
            return self.offset
        ref = slowdown_c if self.base == "slowdown" else shutdown_c
        return None if ref is None else ref + self.offset

    def __str__(self) -> str:
        if self.base is None:
            return f"{self.offset:g}"
        return f"{self.base}{self.offset:+g}" if self.offset else self.base


@dataclass(frozen=True)
class ThermalSection:
    warn_c: Threshold = Threshold("slowdown", -6.0)
    throttle_c: Threshold = Threshold("slowdown", -4.0)
    critical_c: Threshold = Threshold("slowdown", -1.0)
    resume_c: Threshold = Threshold("slowdown", -10.0)
    power_step: float = 0.10
    min_power_fraction: float = 0.5
    step_interval_s: float = 5.0
    # None: `pause` for a service behind a gate, `drain-restart` for one without
    on_critical: OnCritical | None = None
    pause_timeout_s: float = 300.0

    def critical_action(self, gated: bool) -> OnCritical:
        if self.on_critical is not None:
            return self.on_critical
        return "pause" if gated else "drain-restart"


@dataclass(frozen=True)
class PowerSection:
    source: PowerSource = "none"
    ups: str = "ups@127.0.0.1:3493"
    poll_interval_s: float = 2.0
    on_battery_grace_s: float = 20.0
    low_runtime_s: float = 300.0
    low_charge_pct: float = 20.0
    deadtime_s: float = 15.0
    drain_timeout_s: float = 60.0
    stop_timeout_s: float = 30.0
    shutdown_command: tuple[str, ...] = ()
    restart_on_power_return: bool = True
    on_battery_power_fraction: float = 0.6  # 1.0: the GPUs' limits are left alone
    username: str | None = None  # NUT login (USERNAME/PASSWORD) when set
    password_file: str | None = None
    password: str | None = field(default=None, repr=False)  # read from the file, never TOML
    # FSD still standing this long after the power-down ended, upsd saying OL and the machine
    # still up: the shutdown was aborted; the FSD is no longer believed (0: never)
    fsd_stale_s: float = 300.0

    @property
    def host_port(self) -> tuple[str, str, int]:
        """(ups name, host, port) of `ups` ("NAME@HOST[:PORT]"; IPv6 as [ADDR]); the config's
        rules refuse anything else (UPS_RE)."""
        m = UPS_RE.match(self.ups)
        if m is None:
            return self.ups, "", 0
        port = m.group("port")
        return m.group("name"), m.group("v6") or m.group("host"), int(port) if port else 3493


@dataclass(frozen=True)
class Checkpoint:
    name: str
    kind: CheckpointKind
    url: str | None = None
    command: tuple[str, ...] = ()
    service: str | None = None
    signal: int | None = None
    done_file: str | None = None
    timeout_s: float = 30.0


@dataclass(frozen=True)
class HealthSection:
    url: str | None  # None: no HTTP check; "ready" once launched
    interval_s: float = 5.0
    timeout_s: float = 3.0
    failures: int = 3
    startup_timeout_s: float = 900.0


@dataclass(frozen=True)
class ProbeSection:
    """A generation probe: a real 1-token request, when the gate has seen no success."""

    kind: ProbeKind = "completion"
    interval_s: float = 30.0
    timeout_s: float = 20.0
    failures: int = 3
    model: str | None = None  # None: the first of the engine's /v1/models
    endpoint: ProbeEndpoint = "completions"  # POST /v1/completions or /v1/chat/completions


@dataclass(frozen=True)
class RestartSection:
    policy: RestartPolicy = "on-failure"
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0
    max_restarts: int = 10
    window_s: float = 600.0


@dataclass(frozen=True)
class StopSection:
    signal: int = int(signal.SIGTERM)
    timeout_s: float = 30.0


@dataclass(frozen=True)
class GateSection:
    listen: Listen | None  # None: reachable only through the router
    max_concurrency: int = 64
    max_queue: int = 256
    backup: str | None = None
    swap_port: int | None = None
    queue_timeout_s: float = 30.0
    header_timeout_s: float = 30.0  # a client's request head must arrive within this
    body_timeout_s: float = 60.0  # longest pause between reads of a request body
    send_timeout_s: float = 120.0  # a client that accepts nothing for this long is dropped
    max_connections: int = 1024  # beyond it, new connections wait in the listen backlog
    drain_timeout_s: float = 60.0  # llmctl drain's default wait; a swap's old instance; stop
    # every in-flight request silent from the upstream this long, then a failed probe: hung
    stall_timeout_s: float = 300.0
    allow_paths: tuple[str, ...] = ()  # forwarded beside API_PATHS
    max_connections_per_client: int | None = None  # per client address (None: no limit)


@dataclass(frozen=True)
class ContainerSection:
    """The service runs in a container (`containers.py`): its `command` is the command in the
    image, run by `runtime` with the pinning translated into the runtime's flags."""

    image: str
    runtime: str = "podman"  # podman, docker, or a path to one of them
    run_args: tuple[str, ...] = ()  # extra arguments to `run` ({port}, {gpu_uuids})
    runtime_args: tuple[str, ...] = ()  # global flags before `run` (a storage driver)
    pull: PullPolicy = "never"
    pull_timeout_s: float = 1800.0
    network: str = "host"
    gpu_flag: GpuFlag | None = None  # None: by the runtime (docker: gpus; else cdi)

    @property
    def flag(self) -> GpuFlag:
        if self.gpu_flag is not None:
            return self.gpu_flag
        return "gpus" if "docker" in self.runtime.rsplit("/", 1)[-1] else "cdi"


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    command: tuple[str, ...]
    port: int | None = None
    gpus: tuple[int | str, ...] = ()
    numa: int | str = "auto"  # "auto" | "none" | node number
    user: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    health: HealthSection = HealthSection(url=None)
    restart: RestartSection = RestartSection()
    stop: StopSection = StopSection()
    gate: GateSection | None = None
    probe: ProbeSection | None = None
    metrics_url: str | None = None  # the engine's metrics (None: no port, or "" given)
    # the model names the router sends here (empty: not behind the router)
    models: tuple[str, ...] = ()
    start: StartMode = "always"
    idle_stop_s: float | None = None  # on-demand: stopped after this long with nothing asked
    vram_gb: float | None = None  # what it needs on each of its GPUs (GiB)
    exclusive: bool = False  # its GPUs are for it alone
    # on-demand: once loaded, not stopped to make room for another before this long (0: off)
    min_residency_s: float = 10.0
    container: ContainerSection | None = None

    @property
    def on_demand(self) -> bool:
        return self.start == "on-demand"


@dataclass(frozen=True)
class RouterSection:
    """One OpenAI endpoint in front of every service's gate, by the request's `model`."""

    listen: Listen
    header_timeout_s: float = 30.0
    body_timeout_s: float = 60.0
    send_timeout_s: float = 120.0
    max_connections: int = 1024
    # how much of a request body is read to find its `model` (the rest streams through)
    max_body_bytes: int = 8 * 1024 * 1024
    allow_paths: tuple[str, ...] = ()  # forwarded beside API_PATHS
    max_connections_per_client: int | None = None  # per client address (None: no limit)


@dataclass(frozen=True)
class AuthSection:
    """API keys for the router and every gate's own listener (`keys.py`)."""

    keys_file: str


@dataclass(frozen=True)
class AuditSection:
    """One JSON line per request: to a file (reopened on SIGHUP), or to the journal."""

    path: str  # a file, or "journal"


@dataclass(frozen=True)
class Config:
    supervisor: SupervisorSection = SupervisorSection()
    metrics: MetricsSection = MetricsSection()
    gpu: GpuSection = GpuSection()
    thermal: ThermalSection = ThermalSection()
    power: PowerSection = PowerSection()
    checkpoints: tuple[Checkpoint, ...] = ()
    services: tuple[ServiceConfig, ...] = ()
    router: RouterSection | None = None
    auth: AuthSection | None = None
    audit: AuditSection | None = None
    path: str | None = field(default=None, compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def service(self, name: str) -> ServiceConfig | None:
        for svc in self.services:
            if svc.name == name:
                return svc
        return None
