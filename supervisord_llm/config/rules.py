"""The rules of each section and across sections: TOML -> `schema` dataclasses, every
problem named by its key's path (`service[2].health.interval_s: must be > 0`). The same
function serves start-up, `--check` and reload. Checks that need the discovered GPUs (an
unknown GPU in `service[i].gpus`) are made by `plan.resolve_plan`, in the same form."""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import itertools
import os
import pwd
import re
import signal
import stat
import tomllib
from collections.abc import Mapping
from typing import Any, Final, cast
from urllib.parse import urlsplit

from ..errors import ConfigError
from .reader import (
    MISSING,
    Table,
    config_error,
    file_kind,
    key_text,
    long_integers,
    one_line,
    read_config_file,
    short,
    text_of,
    type_name,
)
from .schema import (
    API_PATHS,
    CHECKPOINT_KINDS,
    DEFAULT_METRICS_LISTEN,
    GPU_BACKENDS,
    GPU_FLAGS,
    LOG_FORMATS,
    ON_CRITICAL,
    POWER_SOURCES,
    PROBE_ENDPOINTS,
    PROBE_KINDS,
    PULL_POLICIES,
    RESTART_POLICIES,
    START_MODES,
    UPS_RE,
    AuditSection,
    AuthSection,
    Checkpoint,
    CheckpointKind,
    Config,
    ContainerSection,
    GateSection,
    GpuFlag,
    GpuSection,
    HealthSection,
    Listen,
    MetricsSection,
    PowerSection,
    ProbeEndpoint,
    ProbeKind,
    ProbeSection,
    PullPolicy,
    RestartSection,
    RouterSection,
    ServiceConfig,
    SimGpu,
    StartMode,
    StopSection,
    SupervisorSection,
    ThermalSection,
    Threshold,
)

_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_ENV_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UUID_RE: Final = re.compile(r"^(GPU|MIG)-[0-9A-Za-z-]+$")
_PCI_RE: Final = re.compile(r"^(?:([0-9A-Fa-f]{4,8}):)?([0-9A-Fa-f]{2}):([0-9A-Fa-f]{2})\.([0-7])$")
# "slowdown", "slowdown-4", "shutdown-2.5": at or below the GPU's own threshold, no spaces
_THRESHOLD_RE: Final = re.compile(r"^(slowdown|shutdown)(?:-(\d+(?:\.\d+)?))?$")
_PLACEHOLDER_RE: Final = re.compile(r"\{([A-Za-z_]*)\}")
# a listener's host without brackets: a dotted IPv4 address, or a name (labels of letters,
# digits, '-', '_', with a letter somewhere: all-numeric labels must make an IPv4 address)
_HOST_RE: Final = re.compile(r"^(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
                             r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)$"
                             r"|^(?=.*[A-Za-z])[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*\.?$")
PLACEHOLDERS: Final = ("port", "gpu_uuids")


def parse_listen(text: str) -> Listen:
    """`host:port`, `[v6]:port`; raises ValueError with a readable message. An IPv4-mapped
    IPv6 address (`[::ffff:127.0.0.1]:P`) is its IPv4 address: a socket bound to one accepts
    only IPv4 connections to it, and binding that IPv6 form fails."""
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected [ADDRESS]:PORT, got {short(text)}")
        try:
            v6 = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"[ADDRESS]:PORT takes an IPv6 address, not {short(host)} (write "
                             "an IPv4 address or a host name without brackets)") from None
        host = str(v6.ipv4_mapped) if v6.ipv4_mapped is not None else host
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"expected HOST:PORT, got {short(text)}")
    if not host:
        raise ValueError(f"missing host in {short(text)}")
    if not text.startswith("[") and not _HOST_RE.match(host):
        raise ValueError(f"the host must be an IPv4 address or a host name, not {short(host)}")
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5) \
            or not 0 < int(port_text) < 65536:
        raise ValueError(f"port must be 1-65535, got {short(port_text)}")
    return Listen(host, int(port_text))


def parse_signal(value: str) -> int:
    name = value.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    if name.startswith("SIG_"):
        raise ValueError(f"unknown signal {short(value)}")
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ValueError(f"unknown signal {short(value)} (use a name such as SIGTERM)") from None


def normalize_pci_bus_id(text: str) -> str | None:
    """`41:00.0`, `0000:41:00.0`, `00000000:41:00.0` -> `0000:41:00.0` (sysfs form)."""
    m = _PCI_RE.match(text.strip())
    if not m:
        return None
    domain = int(m.group(1) or "0", 16)
    return f"{domain:04x}:{m.group(2).lower()}:{m.group(3).lower()}.{m.group(4)}"


def _threshold(table: Table, key: str, default: Threshold) -> Threshold:
    value = table.raw(key)
    if value is MISSING:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not -50 <= value <= 150:  # nan and inf too, and integers no float holds
            table.error(key, f"must be between -50 and 150 Celsius (got {short(value)})")
            return default
        return Threshold(None, float(value))
    if isinstance(value, str):
        m = _THRESHOLD_RE.match(value)
        if m:
            offset = float(m.group(2) or 0)
            if offset > 60:
                table.error(key, f"offset {m.group(2)} is too large (at most 60)")
                return default
            return Threshold(m.group(1), -offset)
        if _THRESHOLD_RE.match(value.replace(" ", "").replace("+", "-")):
            table.error(key, f'write a relative temperature as "slowdown-N" or "shutdown-N" '
                        f'(no spaces; at or below the GPU\'s own threshold), not {short(value)}')
            return default
    table.error(
        key, f'must be a temperature in Celsius or "slowdown-N" / "shutdown-N", not {short(value)}'
    )
    return default


def _placeholders_ok(table: Table, key: str, values: tuple[str, ...], has_port: bool) -> None:
    for i, value in enumerate(values):
        for m in _PLACEHOLDER_RE.finditer(value):
            name = m.group(1)
            where = f"{table.key_path(key)}[{i}]" if len(values) > 1 or key == "command" else (
                table.key_path(key)
            )
            if name not in PLACEHOLDERS:
                table.problems.append(
                    f"{where}: unknown placeholder {{{name}}} (known: {{port}}, {{gpu_uuids}})"
                )
            elif name == "port" and not has_port:
                table.problems.append(f"{where}: uses {{port}} but the service has no port")


# ---------------------------------------------------------------------------------------------
# Sections


def _supervisor(root: Table) -> SupervisorSection:
    t = root.table("supervisor")
    d = SupervisorSection()
    if t is None:
        if (why := state_dir_problem(d.state_dir)) is not None:  # the default's, the same rule
            root.problems.append(f"supervisor.state_dir: {why}")
        return d
    sock = t.string("control_socket", d.control_socket)
    if not os.path.isabs(sock):
        t.error("control_socket", f"must be an absolute path (got {short(sock)})")
        sock = d.control_socket
    elif len(os.fsencode(sock)) > 107:
        t.error("control_socket", "path is too long for a Unix socket (at most 107 bytes)")
        sock = d.control_socket
    elif (why := state_dir_problem(os.path.dirname(sock))) is not None:
        t.error("control_socket", f"its directory cannot be made: {why}")
    group = t.string("control_group", None)
    if group is not None:
        import grp

        try:
            grp.getgrnam(group)
        except KeyError:
            t.error("control_group", f"no such group {short(group)} (create it or remove the key)")
    state_dir = t.string("state_dir", d.state_dir)
    if not os.path.isabs(state_dir):
        t.error("state_dir", f"must be an absolute path (got {short(state_dir)})")
        state_dir = d.state_dir
    elif not t.failed("state_dir") and (why := state_dir_problem(state_dir)) is not None:
        t.error("state_dir", why)
    log_format = t.string("log_format", d.log_format, choices=LOG_FORMATS)
    grace = t.number("adopt_grace_s", d.adopt_grace_s, minimum=0, maximum=86400)
    unattended = t.number("unattended_limit_s", d.unattended_limit_s, above=0, maximum=86400)
    if not t.failed("adopt_grace_s") and not t.failed("unattended_limit_s") \
            and unattended < grace:
        t.error("unattended_limit_s", f"must be at least adopt_grace_s ({grace:g}): a model "
                "left without a supervisor is stopped after the shorter of the two")
    front_mb = int(t.number("front_memory_max_mb", d.front_memory_max_mb, integer=True,
                            minimum=64, maximum=1024 * 1024))
    t.finish()
    return SupervisorSection(sock, group, state_dir, log_format, grace, unattended, front_mb)


def state_dir_problem(path: str) -> str | None:
    """What keeps `path` from being the state directory, as far as the file system tells
    without writing: it, or a directory above it, exists and is not a directory. None when it
    is one or can be created (whether it may be is for the start to find: exit 2)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return (f"{short(path)} is a symbolic link to nothing" if os.path.islink(path)
                else None)
    except NotADirectoryError:
        parent = os.path.dirname(path)
        while parent != os.path.dirname(parent):
            try:
                st = os.stat(parent)
            except OSError:
                parent = os.path.dirname(parent)
                continue
            if not stat.S_ISDIR(st.st_mode):
                return (f"{short(parent)}, above it, exists and is not a directory: it is "
                        f"{_kind(st.st_mode)}")
            break
        return f"{short(path)}: a directory above it is not a directory"
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return f"{short(path)}: the path is too long ({exc.strerror})"
        return None
    if not stat.S_ISDIR(st.st_mode):
        return f"{short(path)} exists and is not a directory: it is {_kind(st.st_mode)}"
    return None


def _kind(mode: int) -> str:
    return "a regular file" if stat.S_ISREG(mode) else file_kind(mode)


def _metrics(root: Table) -> MetricsSection:
    t = root.table("metrics")
    if t is None:
        return MetricsSection()
    text = t.string("listen", DEFAULT_METRICS_LISTEN, allow_empty=True)
    t.finish()
    if text == "":
        return MetricsSection(listen=None)
    try:
        return MetricsSection(parse_listen(text))
    except ValueError as exc:
        t.error("listen", str(exc))
        return MetricsSection()


def _sim_gpu(t: Table) -> SimGpu | None:
    uuid = t.string("uuid")
    if isinstance(uuid, str) and not _UUID_RE.match(uuid):
        t.error("uuid", f'must look like "GPU-xxxxxxxx-..." (got {short(uuid)})')
    d = SimGpu(uuid="")
    name = t.string("name", d.name)
    pci = t.string("pci_bus_id", "")
    if pci and normalize_pci_bus_id(pci) is None:
        t.error("pci_bus_id", f'must look like "00000000:41:00.0" (got {short(pci)})')
    numa = t.number("numa_node", d.numa_node, integer=True, minimum=-1, maximum=1023)
    vendor = t.string("vendor", d.vendor, choices=("nvidia", "amd"))
    mem = t.number("memory_total_bytes", d.memory_total_bytes, integer=True, above=0,
                   maximum=10**15)
    dpl = t.number("default_power_limit_w", d.default_power_limit_w, above=0, maximum=5000)
    mpl = t.number("min_power_limit_w", min(d.min_power_limit_w, dpl), above=0, maximum=5000)
    xpl = t.number("max_power_limit_w", None, above=0, maximum=5000)
    slow = t.number("slowdown_c", d.slowdown_c, minimum=20, maximum=150)
    shut = t.number("shutdown_c", d.shutdown_c, minimum=20, maximum=150)
    t.finish()
    ok = not t.failed("default_power_limit_w")
    if mpl > dpl and ok and not t.failed("min_power_limit_w"):
        t.error("min_power_limit_w", f"must be <= default_power_limit_w ({dpl:g})")
    if xpl is not None and xpl < dpl and ok:
        t.error("max_power_limit_w", f"must be >= default_power_limit_w ({dpl:g})")
    if shut < slow and not t.failed("slowdown_c") and not t.failed("shutdown_c"):
        t.error("shutdown_c", f"must be >= slowdown_c ({slow:g})")
    if not isinstance(uuid, str):
        return None
    return SimGpu(uuid, name, pci, numa, vendor, mem, dpl, mpl, xpl, slow, shut)


def _gpu(root: Table) -> GpuSection:
    t = root.table("gpu")
    if t is None:
        return GpuSection()
    d = GpuSection()
    backend = t.string("backend", d.backend, choices=GPU_BACKENDS)
    poll = t.number("poll_interval_s", d.poll_interval_s, minimum=0.1, maximum=3600)
    call_timeout = t.number("call_timeout_s", d.call_timeout_s, above=0, maximum=600)
    health_interval = t.number("health_interval_s", d.health_interval_s, above=0,
                               maximum=86400)
    state_file = t.string("sim_state_file", None)
    if state_file is not None and not os.path.isabs(state_file):
        t.error("sim_state_file", f"must be an absolute path (got {short(state_file)})")
    sysfs_root = t.string("sysfs_root", d.sysfs_root)
    if not os.path.isabs(sysfs_root):
        t.error("sysfs_root", "must be an absolute path: the sysfs tree the amd-sysfs backend "
                f"reads (/sys; a test tree elsewhere) (got {short(sysfs_root)})")
        sysfs_root = d.sysfs_root
    sims = []
    for st in t.array_of_tables("sim"):
        sim = _sim_gpu(st)
        if sim is not None:
            sims.append(sim)
    t.finish()
    if t.failed("backend"):
        pass  # what is used with which backend cannot be judged
    elif backend == "sim":
        if not t.has("sim"):
            t.error("sim", 'backend = "sim" needs at least one [[gpu.sim]] table')
        seen: dict[str, int] = {}
        for i, sim in enumerate(sims):
            for key, value in (("uuid", sim.uuid), ("pci_bus_id", sim.pci_bus_id)):
                if not value:
                    continue
                norm = normalize_pci_bus_id(value) if key == "pci_bus_id" else value
                tag = f"{key}:{norm}"
                if tag in seen:
                    t.problems.append(
                        f"gpu.sim[{i}].{key}: {short(value)} is already used by "
                        f"gpu.sim[{seen[tag]}]"
                    )
                seen[tag] = i
    else:
        if t.has("sim") and not t.failed("sim"):
            t.error("sim", f'[[gpu.sim]] is only used with backend = "sim" (not {short(backend)})')
        if state_file is not None:
            t.error("sim_state_file", f'is only used with backend = "sim" (not {short(backend)})')
    if t.has("sysfs_root") and backend not in ("amd-sysfs", "auto") \
            and not t.failed("backend") and not t.failed("sysfs_root"):
        t.error("sysfs_root", 'is only used by the AMD sysfs backend (backend = "amd-sysfs" '
                f'or "auto"), not with {short(backend)}')
    return GpuSection(backend, poll, call_timeout, state_file, tuple(sims),
                      sysfs_root=sysfs_root, health_interval_s=health_interval)


def _thermal(root: Table) -> ThermalSection:
    t = root.table("thermal")
    d = ThermalSection()
    if t is None:
        return d
    warn = _threshold(t, "warn_c", d.warn_c)
    throttle = _threshold(t, "throttle_c", d.throttle_c)
    critical = _threshold(t, "critical_c", d.critical_c)
    resume = _threshold(t, "resume_c", d.resume_c)
    step = t.number("power_step", d.power_step, above=0, maximum=1)
    min_frac = t.number("min_power_fraction", d.min_power_fraction, above=0, maximum=1)
    interval = t.number("step_interval_s", d.step_interval_s, above=0, maximum=3600)
    on_critical = t.string("on_critical", d.on_critical, choices=ON_CRITICAL)
    pause_timeout = t.number("pause_timeout_s", d.pause_timeout_s, above=0, maximum=86400)
    t.finish()
    # The order resume <= warn <= throttle <= critical, wherever the config alone decides it:
    # both sides on the same base, or the lower one on the shutdown base with a larger offset
    # than a higher one on the slowdown base (a GPU's shutdown is never below its slowdown).
    # Mixed bases it cannot decide are checked per GPU at run time (`thermal_limits`).
    chain = (("resume_c", resume), ("warn_c", warn), ("throttle_c", throttle),
             ("critical_c", critical))
    for (lo_key, lo), (hi_key, hi) in itertools.combinations(chain, 2):
        if t.failed(lo_key) or t.failed(hi_key):
            continue
        same = lo.base == hi.base
        proven = lo.base == "shutdown" and hi.base == "slowdown"
        if (same or proven) and lo.offset > hi.offset:
            t.error(hi_key, f"must not be below {lo_key} ({lo} > {hi})")
            break
    return ThermalSection(warn, throttle, critical, resume, step, min_frac, interval, on_critical,
                          pause_timeout)


def _power(root: Table) -> PowerSection:
    t = root.table("power")
    d = PowerSection()
    if t is None:
        return d
    source = t.string("source", "nut" if t.has("ups") else d.source, choices=POWER_SOURCES)
    ups = t.string("ups", d.ups)
    if isinstance(ups, str) and (not UPS_RE.match(ups) or not 0 < PowerSection(
            ups=ups).host_port[2] < 65536):
        t.error("ups", f'must look like "NAME@HOST[:PORT]" (IPv6 as [ADDR]), the port 1-65535 '
                f"(got {short(ups)})")
    poll = t.number("poll_interval_s", d.poll_interval_s, minimum=0.1, maximum=3600)
    grace = t.number("on_battery_grace_s", d.on_battery_grace_s, minimum=0, maximum=86400)
    low_rt = t.number("low_runtime_s", d.low_runtime_s, minimum=0, maximum=86400)
    low_ch = t.number("low_charge_pct", d.low_charge_pct, minimum=0, maximum=100)
    dead = t.number("deadtime_s", d.deadtime_s, above=0, maximum=86400)
    drain = t.number("drain_timeout_s", d.drain_timeout_s, minimum=0, maximum=86400)
    stop = t.number("stop_timeout_s", d.stop_timeout_s, above=0, maximum=86400)
    cmd = t.string_list("shutdown_command", ())
    if isinstance(cmd, tuple) and cmd and not cmd[0].strip():
        t.error("shutdown_command", "the program (the first item) must not be empty")
        cmd = ()
    ret = t.boolean("restart_on_power_return", d.restart_on_power_return)
    frac = t.number("on_battery_power_fraction", d.on_battery_power_fraction, above=0,
                    maximum=1)
    stale = t.number("fsd_stale_s", d.fsd_stale_s, minimum=0, maximum=86400 * 7)
    user = t.string("username", None)
    if isinstance(user, str) and not re.fullmatch(r"[\x21-\x7e]{1,64}", user):
        t.error("username", f"must be 1-64 printable characters without spaces (got "
                f"{short(user)})")
        user = None
    pw_file = t.string("password_file", None)
    if t.has("password"):
        t.raw("password")
        t.error("password", "a password is never written in the config: put it in a file "
                "readable by root only and name it in password_file, or pass it as the "
                "systemd credential nut-password (LoadCredential=nut-password:/path)")
    password = None
    if user is not None:
        password = _nut_password(t, pw_file)
    elif pw_file is not None:
        t.error("password_file", "needs username (the NUT user it is the password of)")
    t.finish()
    return PowerSection(source, ups, poll, grace, low_rt, low_ch, dead, drain, stop, cmd, ret,
                        frac, user, pw_file, password, fsd_stale_s=stale)


NUT_CREDENTIAL = "nut-password"


def _nut_password(t: Table, path: str | None) -> str | None:
    """The NUT password: from password_file, else from the systemd credential nut-password
    ($CREDENTIALS_DIRECTORY); the first line, at most 256 bytes. None (and an error) when
    neither can be read."""
    key = "password_file"
    if path is None:
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if not cred_dir:
            t.error("username", "needs a password: set password_file, or pass the systemd "
                    f"credential {NUT_CREDENTIAL} (LoadCredential={NUT_CREDENTIAL}:/path)")
            return None
        path, key = os.path.join(cred_dir, NUT_CREDENTIAL), "username"
    elif not os.path.isabs(path):
        t.error(key, f"must be an absolute path (got {short(path)})")
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{path} is not a regular file")
            data = os.read(fd, 4097)
        finally:
            os.close(fd)
    except OSError as exc:
        t.error(key, f"cannot read the NUT password from {short(path)}: "
                f"{exc.strerror or exc}")
        return None
    lines = data.decode("utf-8", "replace").splitlines()
    password = lines[0].strip() if lines else ""
    if not password or len(data) > 4096 or len(password) > 256 \
            or not all(0x21 <= ord(c) < 0x7f for c in password):
        t.error(key, f"{short(path)}: the password must be the first line, 1-256 printable "
                "characters without spaces")
        return None
    return password


def _checkpoint(t: Table) -> Checkpoint | None:
    name = t.string("name")
    if isinstance(name, str) and not _NAME_RE.match(name):
        t.error("name", f"must be letters, digits, '_', '.', '-' (got {short(name)})")
    kind = t.string("kind", choices=CHECKPOINT_KINDS)
    timeout = t.number("timeout_s", 30.0, above=0, maximum=86400)
    url = command = service = sig = done_file = None
    if kind == "http":
        url = t.string("url")
        if isinstance(url, str) and not url.startswith(("http://", "https://")):
            t.error("url", f"must be an http:// or https:// URL (got {short(url)})")
        elif isinstance(url, str) and (why := url_problem(url)) is not None:
            t.error("url", f"not a usable URL ({why}): {short(url)}")
    elif kind == "command":
        command = t.string_list("command", allow_empty=False)
        if isinstance(command, tuple) and command and not command[0].strip():
            t.error("command", "the program (the first item) must not be empty")
            command = None
    elif kind == "signal":
        service = t.string("service")
        sig_name = t.string("signal", "SIGUSR1")
        try:
            sig = parse_signal(sig_name)
            if sig in (signal.SIGKILL, signal.SIGSTOP):
                t.error("signal", f"{sig_name} cannot be caught: it would kill or freeze the "
                        "service instead of making it checkpoint (SIGUSR1 is the usual one)")
        except ValueError as exc:
            t.error("signal", str(exc))
        done_file = t.string("done_file", None)
        if done_file is not None and not os.path.isabs(done_file):
            t.error("done_file", f"must be an absolute path (got {short(done_file)})")
    elif t.failed("kind"):  # which keys go with it cannot be judged
        for key in ("url", "command", "service", "signal", "done_file"):
            t.raw(key)
    t.finish()
    if not isinstance(name, str) or not isinstance(kind, str):
        return None
    # a key with a problem stands as absent (its default would be MISSING)
    return Checkpoint(name, cast(CheckpointKind, kind), url if isinstance(url, str) else None,
                      command if isinstance(command, tuple) else (),
                      service if isinstance(service, str) else None, sig, done_file, timeout)


def _health(t: Table | None, has_port: bool) -> HealthSection:
    default_url = "http://127.0.0.1:{port}/health" if has_port else None
    if t is None:
        return HealthSection(url=default_url)
    url = t.string("url", default_url)
    if url is not None and isinstance(url, str):
        if not url.startswith(("http://", "https://")):
            t.error("url", f"must be an http:// or https:// URL (got {short(url)})")
        else:
            _placeholders_ok(t, "url", (url,), has_port)
            if (why := url_problem(url)) is not None:
                t.error("url", f"not a usable URL ({why}): {short(url)}")
    elif url is None and t.ok:
        t.problems.append(
            f"{t.path}: a health check needs `url` (or a `port` for the default "
            "http://127.0.0.1:{port}/health)"
        )
    d = HealthSection(url=None)
    interval = t.number("interval_s", d.interval_s, above=0, maximum=86400)
    timeout = t.number("timeout_s", d.timeout_s, above=0, maximum=3600)
    failures = t.number("failures", d.failures, integer=True, minimum=1, maximum=1000)
    startup = t.number("startup_timeout_s", d.startup_timeout_s, above=0, maximum=7 * 86400)
    t.finish()
    return HealthSection(url, interval, timeout, failures, startup)


def _restart(t: Table | None) -> RestartSection:
    d = RestartSection()
    if t is None:
        return d
    policy = t.string("policy", d.policy, choices=RESTART_POLICIES)
    initial = t.number("backoff_initial_s", d.backoff_initial_s, minimum=0, maximum=86400)
    maximum = t.number("backoff_max_s", max(d.backoff_max_s, initial), minimum=0, maximum=86400)
    max_restarts = t.number("max_restarts", d.max_restarts, integer=True, minimum=0,
                            maximum=1_000_000)
    window = t.number("window_s", d.window_s, above=0, maximum=30 * 86400)
    t.finish()
    if maximum < initial and not t.failed("backoff_initial_s") \
            and not t.failed("backoff_max_s"):
        t.error("backoff_max_s", f"must be >= backoff_initial_s ({initial:g})")
    return RestartSection(policy, initial, maximum, max_restarts, window)


# what the supervisor sets on `run` itself (or what would undo its guarantees): refused in
# run_args, with the key to use instead
_OURS: Final = {
    "--name": "the supervisor names each container (llm-<service>-<id>)",
    "--rm": "the supervisor removes each container itself",
    "--detach": "the runtime must stay in the foreground: its exit is the engine's",
    "-d": "the runtime must stay in the foreground: its exit is the engine's",
    "--pull": "use `pull`",
    "--restart": "the supervisor restarts the service; a runtime restarting it too would "
                 "fight it",
    "--network": "use `network`",
    "--net": "use `network`",
    "--replace": "the supervisor removes each container itself",
    "--label-file": "give labels with --label (the labels io.llm-supervisor.* are the "
                    "supervisor's own)",
}
_IMAGE_RE: Final = re.compile(r"[A-Za-z0-9][\x21-\x7e]{0,511}")  # (fullmatch: no newline)
_NETWORK_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:=/-]{0,127}")
C_LABELS: Final = "io.llm-supervisor."


def _container(t: Table | None, has_port: bool) -> ContainerSection | None:
    if t is None:
        return None
    image = t.string("image")
    if isinstance(image, str) and not _IMAGE_RE.fullmatch(image):
        t.error("image", f"must be an image reference (1-512 printable characters without "
                f"spaces, not starting with `-`), got {short(image)}")
    runtime = t.string("runtime", "podman")
    if isinstance(runtime, str) and runtime not in ("podman", "docker") and (
            not runtime.startswith("/") or any(c.isspace() for c in runtime)):
        t.error("runtime", f'must be "podman", "docker" or an absolute path to one of them '
                f"(got {short(runtime)})")
    runtime_args = t.string_list("runtime_args", ())
    run_args = t.string_list("run_args", ())
    if isinstance(run_args, tuple):
        _placeholders_ok(t, "run_args", run_args, has_port)
        for i, arg in enumerate(run_args):
            flag = arg.split("=", 1)[0]
            where = f"{t.key_path('run_args')}[{i}]"
            if flag in _OURS:
                t.problems.append(f"{where}: {flag} is not for run_args: {_OURS[flag]}")
            elif re.fullmatch(r"-[A-Za-z]*d[A-Za-z]*(=.*)?", arg, re.DOTALL):
                # -d among short flags, however written: -td, -td=true, -itd
                t.problems.append(f"{where}: {short(arg)} is not for run_args: the runtime "
                                  "must stay in the foreground (-d); a value that looks so "
                                  "is written joined to a long flag: --env=-d")
            elif C_LABELS in arg:  # in any spelling: --label=, -l=, -lKEY=..., a value
                t.problems.append(f"{where}: the labels io.llm-supervisor.* are the "
                                  "supervisor's own (they say whose a container is)")
    if isinstance(runtime_args, tuple):
        _placeholders_ok(t, "runtime_args", runtime_args, has_port)
    pull = t.string("pull", "never", choices=PULL_POLICIES)
    pull_timeout = t.number("pull_timeout_s", 1800.0, above=0, maximum=86400)
    network = t.string("network", "host")
    if isinstance(network, str) and not _NETWORK_RE.fullmatch(network):
        t.error("network", f"must be a network name or mode such as host, bridge or "
                f"slirp4netns (got {short(network)})")
    gpu_flag = t.string("gpu_flag", None, choices=GPU_FLAGS)
    t.finish()
    if not isinstance(image, str):
        return None
    return ContainerSection(image, str(runtime), tuple(run_args or ()),
                            tuple(runtime_args or ()), cast(PullPolicy, pull), pull_timeout,
                            str(network), cast(GpuFlag | None, gpu_flag))


def _stop(t: Table | None) -> StopSection:
    d = StopSection()
    if t is None:
        return d
    sig = d.signal
    name = t.string("signal", "SIGTERM")
    try:
        sig = parse_signal(name)
    except ValueError as exc:
        t.error("signal", str(exc))
    if sig == signal.SIGKILL:
        t.error("signal", "SIGKILL cannot be the stop signal (it is what follows the timeout)")
    timeout = t.number("timeout_s", d.timeout_s, above=0, maximum=86400)
    t.finish()
    return StopSection(sig, timeout)


def _gate(t: Table | None, has_router: bool) -> GateSection | None:
    if t is None:
        return None
    listen = None
    text = t.string("listen", None)
    if text is None and not has_router:
        t.error("listen", "required key is missing (a gate without `listen` is reachable "
                "only through the router: add a [router] section)")
    if isinstance(text, str):
        try:
            listen = parse_listen(text)
        except ValueError as exc:
            t.error("listen", str(exc))
    d_conc, d_queue = 64, 256
    conc = t.number("max_concurrency", d_conc, integer=True, minimum=1, maximum=100_000)
    queue = t.number("max_queue", d_queue, integer=True, minimum=0, maximum=1_000_000)
    backup = t.string("backup", None)
    swap_port = t.number("swap_port", None, integer=True, minimum=1, maximum=65535)
    qt = t.number("queue_timeout_s", 30.0, above=0, maximum=86400)
    header_t = t.number("header_timeout_s", 30.0, above=0, maximum=3600)
    body_t = t.number("body_timeout_s", 60.0, above=0, maximum=86400)
    send_t = t.number("send_timeout_s", 120.0, above=0, maximum=86400)
    max_conn = t.number("max_connections", 1024, integer=True, minimum=1, maximum=1_000_000)
    drain_t = t.number("drain_timeout_s", 60.0, minimum=0, maximum=86400)
    stall_t = t.number("stall_timeout_s", 300.0, minimum=1, maximum=86400)
    paths = _allow_paths(t)
    per_client = _per_client(t, max_conn)
    t.finish()
    if listen is None and (text is not None or not has_router):
        return None
    return GateSection(listen, conc, queue, backup, swap_port, qt, header_t, body_t, send_t,
                       max_conn, drain_t, stall_t, paths, per_client)


_PATH_RE: Final = re.compile(r"^/[\x21-\x7e]{0,255}$")


def _allow_paths(t: Table) -> tuple[str, ...]:
    """Paths forwarded beside the API's (API_PATHS): exact, or a prefix ending in `*`."""
    paths = t.string_list("allow_paths", ())
    if not isinstance(paths, tuple):
        return ()
    good = []
    for i, path in enumerate(paths):
        where = f"{t.key_path('allow_paths')}[{i}]"
        if not _PATH_RE.match(path) or any(c in path for c in "?#\\"):
            t.problems.append(f"{where}: must be a path from `/` (no spaces, `?`, `#`), at most "
                              f"256 characters; a trailing `*` matches a prefix (got "
                              f"{short(path)})")
        elif "*" in path[:-1]:
            t.problems.append(f"{where}: `*` goes only at the end (a prefix): {short(path)}")
        elif any(seg in (".", "..") for seg in path.rstrip("*").split("/")) or "%" in path:
            t.problems.append(f"{where}: no `.`/`..` segments or %-escapes: {short(path)}")
        elif path not in API_PATHS:
            good.append(path)
    return tuple(dict.fromkeys(good))


def _per_client(t: Table, max_conn: int) -> int | None:
    value = t.number("max_connections_per_client", None, integer=True, minimum=1,
                     maximum=1_000_000)
    if value is not None and not t.failed("max_connections") and value > max_conn:
        t.error("max_connections_per_client", f"must be <= max_connections ({max_conn})")
        return None
    return int(value) if value is not None else None


def _probe(t: Table | None, has_port: bool) -> ProbeSection | None:
    if t is None:
        return None
    d = ProbeSection()
    kind = t.string("kind", choices=PROBE_KINDS)
    interval = t.number("interval_s", d.interval_s, above=0, maximum=86400)
    timeout = t.number("timeout_s", d.timeout_s, above=0, maximum=3600)
    failures = t.number("failures", d.failures, integer=True, minimum=1, maximum=1000)
    model = t.string("model", None)
    if isinstance(model, str) and (len(model) > 256 or not model.isprintable()):
        t.error("model", f"must be 1-256 printable characters (got {short(model)})")
    endpoint = t.string("endpoint", d.endpoint, choices=PROBE_ENDPOINTS)
    if not has_port and t.ok:
        t.problems.append(f"{t.path}: a generation probe needs the service's `port` (it "
                          "sends its request to http://127.0.0.1:{port})")
    t.finish()
    if not isinstance(kind, str):
        return None
    return ProbeSection(cast(ProbeKind, kind), interval, timeout, failures, model,
                        cast(ProbeEndpoint, endpoint))


def _metrics_url(t: Table, has_port: bool) -> str | None:
    default = "http://127.0.0.1:{port}/metrics" if has_port else None
    url = t.string("metrics_url", default, allow_empty=True)
    if not isinstance(url, str) or not url:
        return None  # "" turns it off
    if not url.startswith(("http://", "https://")):
        t.error("metrics_url", f"must be an http:// or https:// URL, or \"\" for none (got "
                f"{short(url)})")
        return None
    _placeholders_ok(t, "metrics_url", (url,), has_port)
    if (why := url_problem(url)) is not None:
        t.error("metrics_url", f"not a usable URL ({why}): {short(url)}")
        return None
    return url


def url_problem(url: str) -> str | None:
    """Why an http(s) URL cannot be used (with the placeholders filled in as they will be:
    a host, a port that parses and is not 0, no spaces or control characters), or None."""
    if any(c.isspace() or not c.isprintable() for c in url):
        return "spaces or control characters"
    try:
        parts = urlsplit(url.replace("{port}", "1").replace("{gpu_uuids}", "x"))
        if not parts.hostname:
            return "no host"
        if parts.port == 0:
            return "port 0"
    except ValueError as exc:  # "Invalid IPv6 URL", a port out of range or not a number
        return str(exc)
    return None


def _gpu_ref(value: object) -> int | str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= 65535 else None
    if isinstance(value, str):
        if _UUID_RE.match(value):
            return value
        pci = normalize_pci_bus_id(value)
        return pci
    return None


def _models(t: Table, name: object, has_port: bool,
            has_gate: bool) -> tuple[str, ...] | None:
    """The model names a service serves behind the router (default: its name)."""
    raw = t.raw("models")
    if raw is MISSING:
        return (name,) if isinstance(name, str) and has_port else ()
    models = t.string_list("models")
    if not isinstance(models, tuple):
        return None
    if not models:
        return ()  # not behind the router
    seen: set[str] = set()
    good = True
    for i, model in enumerate(models):
        if not 1 <= len(model) <= 256 or not model.isprintable() or model != model.strip():
            t.problems.append(f"{t.key_path('models')}[{i}]: must be 1-256 printable "
                              f"characters without leading or trailing blanks (got "
                              f"{short(model)})")
            good = False
        elif model in seen:
            t.problems.append(f"{t.key_path('models')}[{i}]: {short(model)} is listed twice")
            good = False
        seen.add(model)
    if not good:
        return None
    if not has_port and not has_gate:
        t.error("models", "the router sends requests to the service's `port`: give it one")
        return None
    return models


def _demand(t: Table, has_router: bool, has_gate: bool, gpus: list[int | str],
            has_port: bool) -> tuple[str, float | None, float | None, bool]:
    """`start`, `idle_stop_s`, `vram_gb`, `exclusive`."""
    start = t.string("start", "always", choices=START_MODES)
    idle = t.number("idle_stop_s", None, above=0, maximum=30 * 86400)
    vram = t.number("vram_gb", None, above=0, maximum=1_000_000)
    exclusive = t.boolean("exclusive", False)
    if start == "on-demand":
        if not has_port:
            t.error("start", "an on-demand service needs a `port` (its requests come "
                    "through a gate or the router)")
        elif not has_gate and not has_router:
            t.error("start", "an on-demand service is started by its first request: give "
                    "it a [service.gate] or add a [router] section")
    elif idle is not None and not t.failed("start"):
        t.error("idle_stop_s", 'only an on-demand service (start = "on-demand") is stopped '
                "when idle")
    gpus_named = bool(gpus) or t.failed("gpus")
    if vram is not None and not gpus_named:
        t.error("vram_gb", "is what the service needs on each of its GPUs: name them in "
                "`gpus`")
    if exclusive and not gpus_named:
        t.error("exclusive", "reserves the service's GPUs: name them in `gpus`")
    return (start if isinstance(start, str) else "always"), idle, vram, exclusive


def _residency(t: Table, start: str) -> float:
    """`min_residency_s`: on demand only; 0 turns it off."""
    default = ServiceConfig.min_residency_s
    residency = t.number("min_residency_s", default, minimum=0, maximum=30 * 86400)
    if t.has("min_residency_s") and start != "on-demand" and not t.failed("start"):
        t.error("min_residency_s", 'only an on-demand service (start = "on-demand") is '
                "stopped to make room for another")
    return float(residency)


def _service(t: Table, warnings: list[str], has_router: bool = False) -> ServiceConfig | None:
    name = t.string("name")
    if isinstance(name, str) and not _NAME_RE.match(name):
        t.error("name", f"must be 1-63 letters, digits, '_', '.', '-' (got {short(name)})")
    port = t.number("port", None, integer=True, minimum=1, maximum=65535)
    # a port with a problem of its own stands as given for what needs one ({port}, probe...)
    has_port = port is not None or t.failed("port")
    container = _container(t.table("container"), has_port)
    in_container = container is not None or t.failed("container")
    command = t.string_list("command", () if in_container else MISSING,
                            allow_empty=in_container)
    if isinstance(command, tuple) and command and not command[0].strip() \
            and not in_container:
        t.error("command", "the program (the first item) must not be empty")
        command = None
    if isinstance(command, tuple):
        _placeholders_ok(t, "command", command, has_port)
    gpus: list[int | str] = []
    raw_gpus = t.raw("gpus")
    if raw_gpus is not MISSING:
        if not isinstance(raw_gpus, list):
            t.error("gpus", f"must be an array of GPU indexes, UUIDs or PCI bus ids, "
                            f"not {type_name(raw_gpus)}")
        else:
            for i, item in enumerate(raw_gpus):
                ref = _gpu_ref(item)
                if ref is None:
                    t.problems.append(
                        f"{t.key_path('gpus')}[{i}]: must be a GPU index (0-65535), a UUID "
                        f'("GPU-...") or a PCI bus id ("0000:41:00.0"), not {short(item)}'
                    )
                elif ref in gpus:
                    t.problems.append(
                        f"{t.key_path('gpus')}[{i}]: GPU {short(item)} is listed twice")
                else:
                    gpus.append(ref)
    numa: int | str = "auto"
    raw_numa = t.raw("numa")
    if raw_numa is not MISSING:
        if (isinstance(raw_numa, str) and raw_numa in ("auto", "none")) or (
            isinstance(raw_numa, int) and not isinstance(raw_numa, bool) and 0 <= raw_numa < 1024
        ):
            numa = raw_numa
        else:
            t.error("numa", f'must be "auto", "none" or a node number, not {short(raw_numa)}')
    user = t.string("user", None)
    if isinstance(user, str) and in_container:
        t.error("user", "not with [service.container]: the runtime runs as the supervisor; "
                "give the user inside the image in container.run_args (--user)")
    elif isinstance(user, str):
        try:
            pwd.getpwnam(user)
        except KeyError:
            t.error("user", f"no such user {short(user)}")
        else:
            if os.geteuid() != 0 and pwd.getpwnam(user).pw_uid != os.geteuid():
                warnings.append(
                    f"{t.key_path('user')}: only root can run a service as {short(user)}")
    env: list[tuple[str, str]] = []
    raw_env = t.raw("env")
    if raw_env is not MISSING:
        if not isinstance(raw_env, dict):
            t.error("env", f"must be a table of strings, not {type_name(raw_env)}")
        else:
            for key, value in raw_env.items():
                where = f"{t.key_path('env')}.{key_text(key)}"
                if not _ENV_RE.match(key):
                    t.problems.append(f"{where}: not a valid variable name")
                elif not isinstance(value, str):
                    t.problems.append(f"{where}: must be a string, not {type_name(value)}")
                elif "\x00" in value:
                    t.problems.append(f"{where}: must not contain NUL characters")
                else:
                    env.append((key, value))
            _placeholders_ok(t, "env", tuple(v for _, v in env), has_port)
    health = _health(t.table("health"), has_port)
    restart = _restart(t.table("restart"))
    stop = _stop(t.table("stop"))
    gate = _gate(t.table("gate"), has_router)
    has_gate = gate is not None or t.failed("gate")
    probe = _probe(t.table("probe"), has_port)
    metrics_url = _metrics_url(t, has_port)
    models = (_models(t, name, has_port, has_gate) if has_router or t.has("models") else ())
    if t.has("models") and not has_router:
        t.error("models", "names the service's models for the router: add a [router] "
                "section")
    start, idle, vram, exclusive = _demand(t, has_router, has_gate, gpus, has_port)
    residency = _residency(t, start)
    t.finish()
    if not isinstance(name, str) or not isinstance(command, tuple) or models is None:
        return None
    if has_router and gate is None and models:
        gate = GateSection(None)  # behind the router only: a gate without a listener
    return ServiceConfig(name, command, port, tuple(gpus), numa, user, tuple(env), health,
                         restart, stop, gate, probe, metrics_url, models,
                         cast(StartMode, start), idle, vram, exclusive,
                         min_residency_s=residency, container=container)


def _router(root: Table) -> RouterSection | None:
    t = root.table("router")
    if t is None:
        return None
    listen = None
    text = t.string("listen")
    if isinstance(text, str):
        try:
            listen = parse_listen(text)
        except ValueError as exc:
            t.error("listen", str(exc))
    d = RouterSection(Listen("127.0.0.1", 9000))
    header_t = t.number("header_timeout_s", d.header_timeout_s, above=0, maximum=3600)
    body_t = t.number("body_timeout_s", d.body_timeout_s, above=0, maximum=86400)
    send_t = t.number("send_timeout_s", d.send_timeout_s, above=0, maximum=86400)
    max_conn = t.number("max_connections", d.max_connections, integer=True, minimum=1,
                        maximum=1_000_000)
    max_body = t.number("max_body_bytes", d.max_body_bytes, integer=True, minimum=1024,
                        maximum=256 * 1024 * 1024)
    paths = _allow_paths(t)
    per_client = _per_client(t, max_conn)
    t.finish()
    if listen is None:
        return None
    return RouterSection(listen, header_t, body_t, send_t, max_conn, max_body, paths,
                         per_client)


def _auth(root: Table) -> AuthSection | None:
    t = root.table("auth")
    if t is None:
        return None
    path = t.string("keys_file")
    if isinstance(path, str) and not os.path.isabs(path):
        t.error("keys_file", f"must be an absolute path (got {short(path)})")
    t.finish()
    if not isinstance(path, str) or t.failed("keys_file"):
        return None
    from ..keys import load_keys  # (the keys file is read with the config: --check too)

    try:
        load_keys(path)
    except ConfigError as exc:
        root.problems.extend(f"auth.keys_file: {p}" for p in exc.problems)
    return AuthSection(path)


def _audit(root: Table) -> AuditSection | None:
    t = root.table("audit")
    if t is None:
        return None
    path = t.string("path")
    if isinstance(path, str) and path != "journal":
        if not os.path.isabs(path):
            t.error("path", f'must be an absolute path, or "journal" (got {short(path)})')
        elif os.path.isdir(path):
            t.error("path", f"{short(path)} is a directory; name a file in it")
        elif not os.path.isdir(os.path.dirname(path)):
            t.error("path", f"its directory {short(os.path.dirname(path))} does not exist")
    t.finish()
    if not isinstance(path, str) or t.failed("path"):
        return None
    return AuditSection(path)


def _exposed(cfg: Config) -> list[str]:
    """Listeners beyond loopback without [auth]: loud warnings."""
    if cfg.auth is not None:
        return []
    out = []
    where = [("router.listen", cfg.router.listen)] if cfg.router is not None else []
    where += [(f"service {s.name}: gate.listen", s.gate.listen) for s in cfg.services
              if s.gate is not None and s.gate.listen is not None]
    for name, listen in where:
        if not _loopback(listen.host):
            out.append(f"{name} = {str(listen)!r} listens beyond loopback and there is no "
                       "[auth]: anyone who can reach it uses every model with no key. Add "
                       "[auth] keys_file (docs/security.md), or listen on 127.0.0.1")
    return out


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: whatever it resolves to


def _error_paths(problems: list[str]) -> set[str]:
    """Every key path that has a problem, with all its ancestors (`a.b[1].c` gives `a`,
    `a.b`, `a.b[1]` and `a.b[1].c`)."""
    paths: set[str] = set()
    for problem in problems:
        path = problem.split(": ", 1)[0]
        paths.add(path)
        for i, c in enumerate(path):
            if c in ".[" and i:
                paths.add(path[:i])
    return paths


def _cross_checks(cfg: Config, services: list[tuple[int, ServiceConfig]],
                  checkpoints: list[tuple[int, Checkpoint]], declared: set[str] | None,
                  problems: list[str]) -> None:
    """Checks across fields, over what could be built. `services` and `checkpoints` keep their
    index in the file; `declared` holds every service name given, built or not (None: one of
    them has a problem of its own, so no name is known to be missing). A check that
    involves a field with a problem of its own is skipped (it would only repeat it)."""
    bad = _error_paths(problems).__contains__
    names: dict[str, int] = {}
    ports: dict[tuple[str, int], str] = {}

    def claim(port: int, path: str, owner: str) -> None:
        key = ("tcp", port)
        if key in ports:
            problems.append(f"{path}: port {port} is already used by {ports[key]}")
        else:
            ports[key] = owner

    if cfg.metrics.listen is not None and not bad("metrics.listen"):
        claim(cfg.metrics.listen.port, "metrics.listen", "metrics.listen")
    if cfg.router is not None and not bad("router.listen"):
        claim(cfg.router.listen.port, "router.listen", "router.listen")
    served: dict[str, tuple[int, str]] = {}
    for i, svc in services:
        for j, model in enumerate(svc.models):
            if model in served:
                k, owner = served[model]
                problems.append(f"service[{i}].models[{j}]: model {short(model)} is already "
                                f"served by service[{k}] ({owner}); model names must be "
                                "unique across services")
            else:
                served[model] = (i, svc.name)
    for i, svc in services:
        if svc.name in names:
            problems.append(
                f"service[{i}].name: {short(svc.name)} is already used by "
                f"service[{names[svc.name]}]"
            )
        names.setdefault(svc.name, i)
        if svc.port is not None:
            claim(svc.port, f"service[{i}].port", f"service[{i}] ({svc.name})")
        if svc.gate is not None:
            if svc.gate.listen is not None and not bad(f"service[{i}].gate.listen"):
                claim(svc.gate.listen.port, f"service[{i}].gate.listen",
                      f"service[{i}].gate ({svc.name})")
            if svc.gate.swap_port is not None:
                claim(svc.gate.swap_port, f"service[{i}].gate.swap_port",
                      f"service[{i}].gate.swap_port ({svc.name})")
        if (svc.health.timeout_s > svc.health.interval_s and svc.health.url
                and not bad(f"service[{i}].health")):
            problems.append(
                f"service[{i}].health.timeout_s: must be <= interval_s "
                f"({svc.health.interval_s:g})"
            )
    for i, svc in services:
        if svc.gate is not None and svc.gate.backup is not None:
            if svc.gate.backup == svc.name:
                problems.append(f"service[{i}].gate.backup: a service cannot back itself up")
            elif declared is not None and svc.gate.backup not in declared:
                problems.append(
                    f"service[{i}].gate.backup: no service named {short(svc.gate.backup)}")
        if cfg.gpu.backend == "none" and svc.gpus and not bad("gpu.backend"):
            problems.append(f'service[{i}].gpus: gpu.backend is "none", so no GPU can be named')
    for i, cp in checkpoints:
        if cp.kind == "signal" and cp.service is not None and declared is not None \
                and cp.service not in declared:
            problems.append(f"checkpoint[{i}].service: no service named {short(cp.service)}")
    seen_cp: dict[str, int] = {}
    for i, cp in checkpoints:
        if cp.name in seen_cp:
            problems.append(f"checkpoint[{i}].name: {short(cp.name)} is already used by "
                            f"checkpoint[{seen_cp[cp.name]}]")
        seen_cp.setdefault(cp.name, i)


def _declared_names(doc: Mapping[str, Any]) -> set[str] | None:
    raw = doc.get("service", [])
    if not isinstance(raw, list) or not all(
            isinstance(item, dict) and isinstance(item.get("name"), str) for item in raw):
        return None
    return {item["name"] for item in raw}


def build_config(doc: Mapping[str, Any], path: str | None = None) -> Config:
    """Validate a parsed TOML document; raises ConfigError with every problem: those of each
    field and those across fields (over what could be built), each on one line."""
    if not doc:  # start, --check and reload alike
        raise config_error([f"{path or '<config>'}: no settings at all (no [[service]], no "
                            "section: the file is empty or only comments); refused, as a file "
                            "caught mid-write would be"])
    problems: list[str] = []
    warnings: list[str] = []
    root = Table(dict(doc), "", problems)
    supervisor = _supervisor(root)
    metrics = _metrics(root)
    gpu = _gpu(root)
    thermal = _thermal(root)
    power = _power(root)
    checkpoints = [(i, c) for i, c in enumerate(map(_checkpoint,
                                                    root.array_of_tables("checkpoint"))) if c]
    router = _router(root)
    auth = _auth(root)
    audit = _audit(root)
    has_router = root.has("router")
    services = [(i, s) for i, s in enumerate(
        _service(t, warnings, has_router) for t in root.array_of_tables("service")) if s]
    root.finish()
    cfg = Config(supervisor, metrics, gpu, thermal, power, tuple(c for _, c in checkpoints),
                 tuple(s for _, s in services), router, auth, audit, path,
                 tuple(one_line(w) for w in warnings))
    exposed = _exposed(cfg)
    if exposed:
        cfg = dataclasses.replace(cfg, warnings=(*cfg.warnings, *exposed))
    _cross_checks(cfg, services, checkpoints, _declared_names(doc), problems)
    if problems:
        raise config_error(problems)
    return cfg


def parse_config(text: str, path: str | None = None) -> Config:
    """Parse and validate TOML text (a leading UTF-8 byte order mark is ignored)."""
    where = path or "<config>"
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise config_error([f"{where}: TOML syntax error: {exc}"]) from None
        except ValueError as exc:  # an integer too long to convert (4300 digits)
            raise config_error(long_integers(text, where, exc)) from None
        return build_config(doc, path)
    except RecursionError:
        raise config_error([f"{where}: arrays or tables are nested too deeply (a few hundred "
                            "levels at most)"]) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; raises ConfigError (and nothing else) on any problem.
    Blocking file I/O: call it off the event loop once the daemon runs."""
    p = os.fspath(path)
    return parse_config(text_of(read_config_file(p), p), p)
