"""The resolved plan: each service's GPUs, NUMA node, CPUs, argv and environment, worked out
from the validated config and the discovered GPUs. `--check` prints it; the daemon launches
from it. Problems that need the inventory (an unknown GPU) are ConfigErrors named by path."""

from __future__ import annotations

import os
import re
import shlex
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from .config import GIB, Config, ServiceConfig, normalize_pci_bus_id
from .containers import ContainerRun, gpu_options, run_options
from .errors import ConfigError
from .sensors.base import GpuInfo
from .topology import Topology, format_cpulist

_PLACEHOLDER_RE: Final = re.compile(r"\{([A-Za-z_]*)\}")


def substitute(value: str, values: Mapping[str, str]) -> str:
    """Replace `{port}` and `{gpu_uuids}`; other braces are left as they are (the config's
    rules refuse unknown placeholders)."""

    def repl(m: re.Match[str]) -> str:
        return values.get(m.group(1), m.group(0))

    return _PLACEHOLDER_RE.sub(repl, value)


# Variables of the daemon's own environment that must not leak into a service.
_DROP_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
             "LISTEN_FDNAMES", "INVOCATION_ID")


@dataclass(frozen=True)
class ServicePlan:
    config: ServiceConfig
    gpus: tuple[GpuInfo, ...]
    numa_node: int | None  # None: no binding
    cpus: tuple[int, ...] | None  # None: inherit the daemon's affinity
    bind_memory: bool
    env: tuple[tuple[str, str], ...]  # the service's own + pinning (not the inherited base)
    notes: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.config.name

    def values(self, port: int | None = None) -> dict[str, str]:
        p = self.config.port if port is None else port
        return {
            "port": "" if p is None else str(p),
            "gpu_uuids": ",".join(g.uuid for g in self.gpus),
        }

    def argv(self, port: int | None = None) -> tuple[str, ...]:
        vals = self.values(port)
        return tuple(substitute(a, vals) for a in self.config.command)

    def container_run(self, port: int | None = None) -> ContainerRun | None:
        """The container that runs the service (None: it runs as a process of its own)."""
        c = self.config.container
        if c is None:
            return None
        vals = self.values(port)
        vendor = self.gpus[0].vendor if self.gpus else None
        gpu = gpu_options(c, vendor, [g.uuid for g in self.gpus],
                          [d for g in self.gpus for d in g.devices])
        opts = run_options(c, env_keys=dict(self.env), gpu=gpu, cpus=self.cpus,
                           mem_node=self.numa_node if self.bind_memory else None,
                           stop_signal=self.config.stop.signal,
                           stop_timeout_s=self.config.stop.timeout_s,
                           run_args=tuple(substitute(a, vals) for a in c.run_args))
        return ContainerRun((c.runtime, *(substitute(a, vals) for a in c.runtime_args)), opts,
                            c.image, self.argv(port), c.pull == "missing", c.pull_timeout_s)

    def health_url(self, port: int | None = None) -> str | None:
        url = self.config.health.url
        return None if url is None else substitute(url, self.values(port))

    def metrics_url(self, port: int | None = None) -> str | None:
        url = self.config.metrics_url
        return None if url is None else substitute(url, self.values(port))

    def environment(self, base: Mapping[str, str], port: int | None = None) -> dict[str, str]:
        env = {k: v for k, v in base.items() if k not in _DROP_ENV}
        vals = self.values(port)
        for key, value in self.env:
            env[key] = substitute(value, vals)
        return env


def _find_gpu(ref: int | str, gpus: list[GpuInfo]) -> GpuInfo | None:
    for gpu in gpus:
        if isinstance(ref, int):
            if gpu.index == ref:
                return gpu
        elif ref == gpu.uuid or (
            gpu.pci_bus_id and normalize_pci_bus_id(gpu.pci_bus_id) == normalize_pci_bus_id(ref)
        ):
            return gpu
    return None


def _pinning_env(gpus: tuple[GpuInfo, ...], in_container: bool = False
                 ) -> list[tuple[str, str]]:
    if not gpus:
        return []
    if gpus[0].vendor == "amd":
        # ROCR selects the physical devices; HIP then indexes within what ROCR exposes. In a
        # container only the service's cards are there: a card pinned by its host index (no
        # unique id) is found by its place among them
        pins = [g.pin_token for g in gpus]
        if in_container and any(g.pin for g in gpus):
            pins = [str(i) for i in range(len(gpus))]
        return [
            ("ROCR_VISIBLE_DEVICES", ",".join(pins)),
            ("HIP_VISIBLE_DEVICES", ",".join(str(i) for i in range(len(gpus)))),
        ]
    return [
        ("CUDA_VISIBLE_DEVICES", ",".join(g.pin_token for g in gpus)),
        ("CUDA_DEVICE_ORDER", "PCI_BUS_ID"),
    ]


def plan_service(  # noqa: PLR0917
    i: int,
    svc: ServiceConfig,
    gpus: list[GpuInfo],
    topo: Topology,
    allowed_cpus: set[int],
    problems: list[str],
) -> ServicePlan | None:
    chosen: list[GpuInfo] = []
    for j, ref in enumerate(svc.gpus):
        gpu = _find_gpu(ref, gpus)
        if gpu is None:
            known = ", ".join(f"{g.index} ({g.uuid})" for g in gpus) or "none"
            problems.append(f"service[{i}].gpus[{j}]: unknown GPU {ref!r} (present: {known})")
        else:
            chosen.append(gpu)
    if len({g.vendor for g in chosen}) > 1:
        problems.append(f"service[{i}].gpus: mixes NVIDIA and AMD GPUs in one service")
    notes: list[str] = []
    node: int | None = None
    if svc.numa == "auto":
        gpu_nodes = {g.numa_node for g in chosen}
        if len(gpu_nodes) == 1 and -1 not in gpu_nodes:
            node = gpu_nodes.pop()
        elif len(gpu_nodes) > 1:
            notes.append(f"GPUs span NUMA nodes {sorted(gpu_nodes)}: no NUMA binding")
        elif chosen:
            notes.append("GPU NUMA node not reported (-1): no NUMA binding")
    elif isinstance(svc.numa, int):
        if svc.numa not in topo.nodes():
            problems.append(
                f"service[{i}].numa: NUMA node {svc.numa} does not exist on this host "
                f"(nodes: {format_cpulist(topo.nodes()) or 'none'})"
            )
        node = svc.numa
    cpus: tuple[int, ...] | None = None
    bind_memory = False
    if node is not None:
        node_cpus = topo.node_cpus(node)
        if node_cpus is None:
            notes.append(f"NUMA node {node} not found in sysfs: no NUMA binding")
            node = None
        else:
            usable = node_cpus & allowed_cpus
            if usable:
                cpus = tuple(sorted(usable))
            else:
                notes.append(f"no CPU of NUMA node {node} is allowed to the supervisor: "
                             "CPUs not bound")
            bind_memory = topo.node_has_memory(node)
            if not bind_memory:
                notes.append(f"NUMA node {node} has no memory: memory not bound")
    env = list(svc.env)
    names = {k for k, _ in env}
    if svc.container is not None:
        for g in chosen:
            if g.vendor == "amd" and not g.devices:
                problems.append(f"service[{i}].gpus: GPU{g.index} ({g.uuid}) has no render "
                                "node in /sys/class/drm: it cannot be given to a container")
    for key, value in _pinning_env(tuple(chosen), svc.container is not None):
        if key in names:
            notes.append(f"env.{key} set in the config overrides the GPU pinning")
        else:
            env.append((key, value))
    return ServicePlan(svc, tuple(chosen), node, cpus, bind_memory, tuple(env), tuple(notes))


def resolve_plan(
    cfg: Config, gpus: list[GpuInfo], topo: Topology | None = None,
    allowed_cpus: set[int] | None = None,
) -> list[ServicePlan]:
    topo = topo or Topology()
    allowed = allowed_cpus if allowed_cpus is not None else os.sched_getaffinity(0)
    problems: list[str] = []
    plans = [plan_service(i, svc, gpus, topo, allowed, problems)
             for i, svc in enumerate(cfg.services)]
    if not problems:
        _check_memory(cfg, plans, problems)
    if problems:
        raise ConfigError(problems)
    return [p for p in plans if p is not None]


def _check_memory(cfg: Config, plans: list[ServicePlan | None],
                  problems: list[str]) -> None:
    """What only the resolved GPUs show: a service that can never fit, and `exclusive`
    GPUs shared with a service that is never stopped to make room."""
    indexed = [(i, p) for i, p in enumerate(plans) if p is not None]
    always: dict[str, tuple[GpuInfo, list[tuple[int, ServicePlan]]]] = {}
    for i, p in indexed:
        if not p.config.on_demand and p.config.vram_gb is not None:
            for g in p.gpus:
                always.setdefault(g.uuid, (g, []))[1].append((i, p))
    for g, group in always.values():
        total = sum(q.config.vram_gb or 0 for _i, q in group)
        if g.memory_total_bytes and len(group) > 1 and total * GIB > g.memory_total_bytes:
            names = ", ".join(q.config.name for _i, q in group)
            problems.append(f"service[{group[-1][0]}].vram_gb: the services that always run "
                            f"on GPU{g.index} ({names}) need {total:g} GiB, more than it has "
                            f"({g.memory_total_bytes / GIB:.1f} GiB)")
    for i, p in indexed:
        svc = p.config
        if svc.vram_gb is not None:
            for g in p.gpus:
                if g.memory_total_bytes and svc.vram_gb * GIB > g.memory_total_bytes:
                    problems.append(f"service[{i}].vram_gb: {svc.vram_gb:g} GiB is more than "
                                    f"GPU{g.index} has ({g.memory_total_bytes / GIB:.1f} GiB)")
        if not svc.exclusive:
            continue
        mine = {g.uuid for g in p.gpus}
        for j, q in indexed:
            if j == i or not mine & {g.uuid for g in q.gpus}:
                continue
            shared = ", ".join(f"GPU{g.index}" for g in q.gpus if g.uuid in mine)
            if not q.config.on_demand:
                problems.append(
                    f"service[{i}].exclusive: {svc.name} reserves {shared}, which "
                    f"{q.config.name} (start = \"always\") also uses; make {q.config.name} "
                    "on demand or give it other GPUs")
            elif not svc.on_demand:
                problems.append(
                    f"service[{i}].exclusive: {svc.name} (start = \"always\") reserves "
                    f"{shared} for good, so {q.config.name} could never run there; make "
                    f"{svc.name} on demand or give {q.config.name} other GPUs")


def render_plan(cfg: Config, gpus: list[GpuInfo], plans: list[ServicePlan],
                backend: str) -> str:
    """The human-readable plan that `llm-supervisor --check` prints."""
    out: list[str] = [f"configuration {cfg.path or '<string>'}: ok"]
    out.append(f"control socket {cfg.supervisor.control_socket}"
               f" (group {cfg.supervisor.control_group or 'root only'}),"
               f" state {cfg.supervisor.state_dir}")
    out.append(f"metrics {cfg.metrics.listen or 'disabled'}")
    if cfg.router is not None:
        out.append(f"router {cfg.router.listen} (OpenAI endpoint for "
                   f"{sum(len(s.models) for s in cfg.services)} models)")
    out.append(f"GPUs ({backend}): {len(gpus)}")
    for g in gpus:
        node = "-" if g.numa_node < 0 else str(g.numa_node)
        out.append(f"  GPU{g.index} {g.uuid} {g.name} pci {g.pci_bus_id or '-'} numa {node}")
    out.append(f"services: {len(plans)}")
    for p in plans:
        svc = p.config
        gpu_text = ", ".join(f"GPU{g.index} {g.uuid}" for g in p.gpus) or "none"
        cpus = format_cpulist(p.cpus) if p.cpus else "any"
        numa = "none" if p.numa_node is None else str(p.numa_node)
        out.append(f"  {svc.name}")
        run = p.container_run()
        if run is None:
            out.append(f"    command  {' '.join(p.argv())}")
        else:
            pull = svc.container.pull if svc.container is not None else "never"
            out.append(f"    image    {run.image} (pull {pull})")
            out.append("    run      " + shlex.join(run.argv(
                svc.name, f"{svc.name}-XXXXXXXX", cfg.supervisor.state_dir)))
            if p.env:  # (their values are the CLI's environment: not shown, they may be keys)
                out.append("    env      " + " ".join(k for k, _ in p.env)
                           + " (-e KEY: from the runtime's environment)")
        out.append(f"    gpus     {gpu_text}")
        out.append(f"    numa     {numa} (cpus {cpus}, memory "
                   f"{'bound' if p.bind_memory else 'not bound'})")
        out.append(f"    port     {svc.port if svc.port is not None else '-'}")
        h = svc.health
        if p.health_url():
            out.append(f"    health   {p.health_url()} every {h.interval_s:g}s, timeout "
                       f"{h.timeout_s:g}s, {h.failures} failures, startup {h.startup_timeout_s:g}s")
        else:
            out.append("    health   none (process liveness only)")
        r = svc.restart
        out.append(f"    restart  {r.policy}, backoff {r.backoff_initial_s:g}-{r.backoff_max_s:g}s,"
                   f" at most {r.max_restarts} in {r.window_s:g}s")
        out.append(f"    stop     {signal.Signals(svc.stop.signal).name}, SIGKILL after "
                   f"{svc.stop.timeout_s:g}s")
        if svc.gate is not None:
            g2 = svc.gate
            out.append(f"    gate     {g2.listen or 'router only'} (concurrency "
                       f"{g2.max_concurrency}, queue {g2.max_queue}, backup "
                       f"{g2.backup or 'none'})")
        else:
            out.append("    gate     none")
        if svc.models:
            out.append(f"    models   {', '.join(svc.models)}")
        if svc.on_demand or svc.vram_gb is not None or svc.exclusive:
            extra: list[str] = [svc.start]
            if svc.idle_stop_s is not None:
                extra.append(f"idle stop after {svc.idle_stop_s:g}s")
            if svc.on_demand and svc.min_residency_s:
                extra.append(f"kept at least {svc.min_residency_s:g}s once loaded")
            if svc.vram_gb is not None:
                extra.append(f"needs {svc.vram_gb:g} GiB per GPU")
            if svc.exclusive:
                extra.append("exclusive")
            out.append(f"    start    {', '.join(extra)}")
        if svc.user:
            out.append(f"    user     {svc.user}")
        for note in p.notes:
            out.append(f"    note     {note}")
    for w in cfg.warnings:
        out.append(f"warning: {w}")
    return "\n".join(out)
