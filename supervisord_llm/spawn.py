"""The only place that starts or signals processes.

- Each service runs in its own session and process group, through the exec shim
  (`_shim.py`), which sets the parent-death signal, CPU affinity and memory binding.
- Every launch carries a marker in its environment that its descendants inherit:
  `LLM_SUPERVISOR_INSTANCE` (random, one per run of the daemon), `LLM_SUPERVISOR_SERVICE` and
  `LLM_SUPERVISOR_LAUNCH`. A process outside a service's group is signalled only if its
  `/proc/PID/environ` carries the marker, and only through a pidfd opened before the check,
  so a reused pid is never hit.
- The exit of a service's main process is seen when it happens (the event loop's child
  watcher calls `process_exited`), even while processes that escaped the group still hold
  its output pipe; the supervisor closes that pipe itself once the service is gone.
- A guardian process (`_guardian.py`) holds the list of live groups and SIGKILLs them, and
  every process carrying this run's marker, when the daemon disappears, however it ended.
- Every launch is recorded in `state_dir/processes.json` with the boot id and the instance id,
  so that a daemon started after a crash of both finds and stops what is left (and only that)
  before launching again. The record is written off the event loop by a single writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import secrets
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .config import read_config_file
from .errors import ConfigError, SpawnError, StartupError
from .logs import forward_output

log = logging.getLogger(__name__)

_PKG = Path(__file__).resolve().parent
SHIM = str(_PKG / "_shim.py")
GUARDIAN = str(_PKG / "_guardian.py")
_LINE_LIMIT = 64 * 1024
_POLL_S = 0.02
_DRAIN_READS = 16  # at most 1 MiB of output read when the pipe is closed

MARK_INSTANCE = "LLM_SUPERVISOR_INSTANCE"
MARK_SERVICE = "LLM_SUPERVISOR_SERVICE"
MARK_LAUNCH = "LLM_SUPERVISOR_LAUNCH"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
_CMD_MAX = 200


@dataclass(frozen=True)
class LaunchSpec:
    service: str
    argv: tuple[str, ...]
    env: dict[str, str]
    cpus: tuple[int, ...] | None = None
    mem_node: int | None = None
    user: str | None = None


# --- /proc, read off the event loop ------------------------------------------------------------


def read_boot_id(path: str = BOOT_ID_PATH) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _pids() -> list[int]:
    try:
        return [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return []


@dataclass(frozen=True)
class _Stat:
    state: str
    pgid: int
    start_ticks: int


def _stat(pid: int) -> _Stat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data.rpartition(b")")[2].split()  # the name may hold spaces and parentheses
    try:
        return _Stat(fields[0].decode(), int(fields[2]), int(fields[19]))
    except (IndexError, ValueError):
        return None


def _marker(pid: int) -> dict[str, str] | None:
    """The launch marker in `/proc/PID/environ` (an empty dict if it has none); None when the
    environment cannot be read (another user's process without the privilege, or gone)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    out: dict[str, str] = {}
    for item in raw.split(b"\0"):
        if item.startswith(b"LLM_SUPERVISOR_"):
            key, _, value = item.partition(b"=")
            out[key.decode("ascii", "replace")] = value.decode("utf-8", "replace")
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            raw = fh.read(4096)
    except OSError:
        return "?"
    text = " ".join(raw.replace(b"\0", b" ").decode("utf-8", "replace").split())
    return (text[:_CMD_MAX] + "...") if len(text) > _CMD_MAX else (text or "?")


def _holds(pid: int, link: str) -> bool:
    """Whether the process has an open file descriptor on `link` (e.g. "pipe:[1234]")."""
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(f"{base}/{name}") == link:
                return True
        except OSError:
            continue
    return False


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _pidfd_alive(fd: int) -> bool:
    """A pidfd polls readable once its process has exited (zombie or reaped)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return not poller.poll(0)


class Escapee:
    """A process that left a service's process group (setsid, setpgid, a double fork).

    `ours` only when its environment carries the marker of this daemon run, this service and
    this launch; only then may it be signalled, through the pidfd opened before the check."""

    def __init__(self, pid: int, cmd: str, ours: bool, pidfd: int) -> None:
        self.pid = pid
        self.cmd = cmd
        self.ours = ours
        self._pidfd: int | None = pidfd
        self.signalled = False

    def __repr__(self) -> str:
        return f"Escapee(pid={self.pid}, ours={self.ours}, cmd={self.cmd!r})"

    def alive(self) -> bool:
        return self._pidfd is not None and _pidfd_alive(self._pidfd)

    def signal(self, sig: int) -> bool:
        if not self.ours or self._pidfd is None:
            return False  # never signal what is not proven ours
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            return False
        except PermissionError as exc:
            log.error("cannot signal process %d: %s", self.pid, exc)
            return False
        self.signalled = True
        return True

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


def scan_escaped(instance: str, service: str, launch: str, *, pgid: int, since_ticks: int,
                 pipe_link: str | None) -> list[Escapee]:
    """Processes outside group `pgid`, started since the launch, that carry the launch's marker
    (ours) or hold its output pipe (not proven ours). Blocking: run it in a thread."""
    me = os.getpid()
    found: list[Escapee] = []
    for pid in _pids():
        if pid in (me, pgid):
            continue
        st = _stat(pid)
        if st is None or st.state in ("Z", "X") or st.pgid == pgid or st.start_ticks < since_ticks:
            continue
        fd = _pidfd(pid)  # before the check: what it names cannot be replaced under us
        if fd is None:
            continue
        mark = _marker(pid)
        ours = mark is not None and mark.get(MARK_INSTANCE) == instance \
            and mark.get(MARK_SERVICE) == service and mark.get(MARK_LAUNCH) == launch
        if ours or (pipe_link is not None and _holds(pid, pipe_link)):
            found.append(Escapee(pid, _cmdline(pid), ours, fd))
        else:
            os.close(fd)
    return found


@dataclass
class _Leftover:
    pid: int
    pgid: int
    service: str
    cmd: str
    pidfd: int
    in_group: bool


@dataclass
class _LeftoverScan:
    ours: list[_Leftover] = field(default_factory=list)
    strangers: list[tuple[int, int, str, str]] = field(default_factory=list)  # pid pgid cmd why


def _scan_leftovers(instance: str, groups: dict[int, str]) -> _LeftoverScan:
    """Processes of the recorded groups, and processes anywhere that carry the recorded
    instance id. Ours: the environment carries the instance id. Blocking: run it in a thread."""
    me = os.getpid()
    scan = _LeftoverScan()
    for pid in _pids():
        if pid == me:
            continue
        st = _stat(pid)
        if st is None or st.state in ("Z", "X"):
            continue
        fd = _pidfd(pid)
        if fd is None:
            continue
        mark = _marker(pid)
        in_group = st.pgid in groups
        if mark is not None and mark.get(MARK_INSTANCE) == instance:
            service = mark.get(MARK_SERVICE) or groups.get(st.pgid, "?")
            scan.ours.append(_Leftover(pid, st.pgid, service, _cmdline(pid), fd, in_group))
            continue
        os.close(fd)
        if in_group:
            why = "its environment cannot be read" if mark is None else \
                "it does not carry the recorded launch marker"
            scan.strangers.append((pid, st.pgid, _cmdline(pid), why))
    return scan


# --- a launched service ------------------------------------------------------------------------


class ExitProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """The stream protocol, plus a future resolved as soon as the main process exits: the
    child watcher's callback, not the end of the output pipes (which escaped processes may
    hold open forever)."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited: asyncio.Future[int] = loop.create_future()
        self.output_closed = False
        self._sub: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert isinstance(transport, asyncio.SubprocessTransport)
        self._sub = transport

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd in (1, 2):
            self.output_closed = True
        super().pipe_connection_lost(fd, exc)

    def process_exited(self) -> None:
        code = self._sub.get_returncode() if self._sub is not None else None
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(code if code is not None else 255)


class ServiceProcess:
    """A launched service: its main process (its exit seen when it happens, never polled), its
    process group, and the processes found to have escaped the group."""

    def __init__(self, spec: LaunchSpec, *, transport: asyncio.SubprocessTransport,
                 protocol: ExitProtocol, create_time: float, start_ticks: int,
                 launch_id: str, spawner: Spawner) -> None:
        self.spec = spec
        self._transport = transport
        self._protocol = protocol
        self.pid = transport.get_pid()
        self.pgid = self.pid  # start_new_session: the service leads its own group
        self.create_time = create_time
        self.start_ticks = start_ticks
        self.launch_id = launch_id
        self.launched_at = time.monotonic()
        self.escapees: dict[int, Escapee] = {}  # proven ours, being stopped
        self._spawner = spawner
        self._released = False
        self._pipe_link: str | None = None
        pipe = transport.get_pipe_transport(1)
        if pipe is not None:
            with contextlib.suppress(OSError, AttributeError):
                self._pipe_link = f"pipe:[{os.fstat(pipe.get_extra_info('pipe').fileno()).st_ino}]"
        self.log_task: asyncio.Task[None] | None = None

    @property
    def returncode(self) -> int | None:
        fut = self._protocol.exited
        return fut.result() if fut.done() else None

    async def wait(self) -> int:
        """Until the main process exits (not until its output pipe closes)."""
        return await asyncio.shield(self._protocol.exited)

    def signal_group(self, sig: int) -> bool:
        """Signal the whole group; False if nothing of it is left."""
        if self._released:
            return False
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            return False
        except PermissionError as exc:
            log.error("%s: cannot signal process group %d: %s", self.spec.service, self.pgid, exc)
            return False
        return True

    def group_alive(self) -> bool:
        if self._released:
            return False
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    async def find_escaped(self) -> list[Escapee]:
        """Look (off the loop) for processes of this launch outside its group: those carrying
        its marker are ours and are kept in `escapees`, to be stopped with the service;
        those only holding its output pipe are returned, never signalled."""
        pipe = None if self._protocol.output_closed else self._pipe_link
        found = await asyncio.to_thread(
            scan_escaped, self._spawner.instance_id, self.spec.service, self.launch_id,
            pgid=self.pgid, since_ticks=self.start_ticks, pipe_link=pipe)
        for esc in found:
            if not esc.ours:
                continue
            known = self.escapees.get(esc.pid)
            if known is not None and known.alive():
                esc.close()
                continue
            if known is not None:
                known.close()
            self.escapees[esc.pid] = esc
        return [e if not e.ours else self.escapees[e.pid] for e in found]

    def signal_escapees(self, sig: int, only_new: bool = False) -> int:
        """Signal the escaped processes proven ours; returns how many were signalled."""
        n = 0
        for esc in self.escapees.values():
            if (not only_new or not esc.signalled) and esc.alive() and esc.signal(sig):
                n += 1
        return n

    def escapees_alive(self) -> bool:
        return any(e.alive() for e in self.escapees.values())

    def close_output(self) -> None:
        """Close our end of the output pipe, so that processes that escaped the group and
        still hold it can no longer keep anything waiting on it. What the service wrote last
        and the loop has not read yet is read first (bounded) and still forwarded."""
        pipe = self._transport.get_pipe_transport(1)
        reader = self._protocol.stdout
        if pipe is not None and reader is not None and not pipe.is_closing():
            with contextlib.suppress(OSError, ValueError, AttributeError):
                fd = pipe.get_extra_info("pipe").fileno()
                for _ in range(_DRAIN_READS):
                    data = os.read(fd, 65536)  # non-blocking: BlockingIOError ends it
                    if not data:
                        break
                    reader.feed_data(data)
        self._transport.close()

    def release(self) -> None:
        """The group is empty and no escaped process of ours is left: forget it (guardian and
        state file) and close the output pipe."""
        if not self._released:
            self._released = True
            self.close_output()
            for esc in self.escapees.values():
                esc.close()
            self.escapees.clear()
            self._spawner.forget(self)


def _user_env(user: str) -> tuple[int, int, dict[str, str]]:
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid, {"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name}


def _start_ticks(pid: int) -> int:
    st = _stat(pid)
    return st.start_ticks if st is not None else 0


class Spawner:
    def __init__(self, state_dir: str | Path | None, use_guardian: bool = True,
                 on_output: Callable[[str, str], None] | None = None,
                 instance_id: str | None = None) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.use_guardian = use_guardian
        # `[service] line` INFO records, through the log pipeline (which never blocks)
        self.on_output = on_output or forward_output(log)
        self.instance_id = instance_id or secrets.token_hex(8)
        self.boot_id = read_boot_id()
        self._live: dict[int, ServiceProcess] = {}
        self._launches = 0
        self._guardian: asyncio.subprocess.Process | None = None
        self._guardian_fd: int | None = None
        self._guardian_watch: asyncio.Task[None] | None = None
        self._closing = False
        # the record: one writer task, the latest state wins, writes never go backwards
        self._state_seq = 0
        self._state_next: tuple[int, str] | None = None
        self._state_writer: asyncio.Task[None] | None = None
        self._state_lock = threading.Lock()
        self._state_written = 0

    # --- the guardian ------------------------------------------------------------------------

    async def start(self) -> None:
        if self.use_guardian:
            await self._start_guardian()

    async def _start_guardian(self) -> None:
        rfd, wfd = os.pipe()  # both non-inheritable: no service gets the write end
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", GUARDIAN, self.instance_id,
                stdin=rfd, stdout=asyncio.subprocess.DEVNULL, start_new_session=True,
            )
        except OSError as exc:
            os.close(rfd)
            os.close(wfd)
            raise StartupError(f"cannot start the orphan guardian: {exc}") from None
        os.close(rfd)
        os.set_blocking(wfd, False)
        self._guardian = proc
        self._guardian_fd = wfd
        for live in self._live.values():
            self._tell_guardian(f"+{live.pgid}\n")
        self._guardian_watch = asyncio.get_running_loop().create_task(
            self._watch_guardian(proc, wfd), name="guardian-watch")

    async def _watch_guardian(self, proc: asyncio.subprocess.Process, wfd: int) -> None:
        """A guardian that dies (killed by hand, OOM) is replaced at once."""
        code = await proc.wait()
        if self._closing or self._guardian is not proc:
            return
        log.error("orphan guardian (pid %d) ended (%s); starting a new one", proc.pid, code)
        if self._guardian_fd == wfd:
            os.close(wfd)
            self._guardian_fd = None
        try:
            await self._start_guardian()
        except StartupError as exc:
            log.error("%s: services are not protected against a crash of the supervisor",
                      exc)

    def track_group(self, pgid: int) -> None:
        """A helper's process group (a checkpoint hook) for the orphan guardian to kill if
        the daemon dies while it runs."""
        self._tell_guardian(f"+{pgid}\n")

    def untrack_group(self, pgid: int) -> None:
        self._tell_guardian(f"-{pgid}\n")

    def _tell_guardian(self, line: str) -> None:
        if self._guardian_fd is None:
            return
        try:
            os.write(self._guardian_fd, line.encode())
        except BlockingIOError:
            log.error("orphan guardian is not reading its pipe; %s not recorded", line.strip())
        except OSError as exc:  # it died: _watch_guardian replaces it and re-registers all
            log.debug("orphan guardian pipe: %s", exc)

    def guardian_pid(self) -> int | None:
        return self._guardian.pid if self._guardian is not None else None

    async def close(self) -> None:
        """Write the last record, then stop the guardian cleanly: groups still registered,
        and processes still carrying this run's marker, are killed by it."""
        self._closing = True
        await self.flush_state()
        if self._guardian_fd is not None:
            os.close(self._guardian_fd)
            self._guardian_fd = None
        if self._guardian is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._guardian.wait(), 5)
            self._guardian = None

    # --- launching ---------------------------------------------------------------------------

    async def launch(self, spec: LaunchSpec) -> ServiceProcess:
        env = dict(spec.env)
        creds = "-"
        if spec.user is not None:
            # NSS lookups (LDAP, sssd) can block for long: in a thread, with a deadline.
            lookup_timeout_s = 30.0
            try:
                uid, gid, user_env = await asyncio.wait_for(
                    asyncio.to_thread(_user_env, spec.user), lookup_timeout_s)
                groups = ""
                if uid != os.geteuid():
                    groups = ",".join(str(g) for g in await asyncio.wait_for(
                        asyncio.to_thread(os.getgrouplist, spec.user, gid), lookup_timeout_s))
            except KeyError:
                raise SpawnError(f"no such user {spec.user!r}") from None
            except TimeoutError:
                raise SpawnError(f"looking up user {spec.user!r} took longer than "
                                 f"{lookup_timeout_s:g} s") from None
            except OSError as exc:
                raise SpawnError(f"cannot look up the groups of user {spec.user!r}: "
                                 f"{exc}") from None
            env.update(user_env)
            if uid != os.geteuid():
                creds = f"{uid}:{gid}:{groups}"
        exe = shutil.which(spec.argv[0], path=env.get("PATH", os.defpath))
        if exe is None:
            raise SpawnError(f"command not found: {spec.argv[0]!r}"
                             + ("" if "/" in spec.argv[0] else " (not in PATH)"))
        self._launches += 1
        launch_id = str(self._launches)
        env[MARK_INSTANCE] = self.instance_id
        env[MARK_SERVICE] = spec.service
        env[MARK_LAUNCH] = launch_id
        cpus = ",".join(str(c) for c in spec.cpus) if spec.cpus else "-"
        mem = str(spec.mem_node) if spec.mem_node is not None else "-"
        argv = (sys.executable, "-I", "-S", SHIM, str(os.getpid()), str(int(signal.SIGKILL)),
                cpus, mem, creds, "--", *spec.argv)
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.subprocess_exec(
                lambda: ExitProtocol(_LINE_LIMIT, loop),
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            raise SpawnError(f"cannot launch {spec.argv[0]!r}: {exc}") from None
        pid = transport.get_pid()
        try:
            create_time = psutil.Process(pid).create_time()
        except psutil.Error:
            create_time = 0.0
        sp = ServiceProcess(spec, transport=transport, protocol=protocol,
                            create_time=create_time, start_ticks=_start_ticks(pid),
                            launch_id=launch_id, spawner=self)
        self._live[sp.pgid] = sp
        self._tell_guardian(f"+{sp.pgid}\n")
        self._save_state()
        if protocol.stdout is not None:
            sp.log_task = loop.create_task(
                self._forward(spec.service, protocol.stdout), name=f"log-{spec.service}"
            )
        return sp

    async def _forward(self, service: str, stream: asyncio.StreamReader) -> None:
        """Read the service's output as it comes and hand it on line by line: read in chunks
        (never waiting for a newline), split, forward each whole line, and yield to the loop
        after each chunk. `on_output` never blocks (the log pipeline drops what the journal
        cannot take), so the pipe never fills up and the service never waits on it. A line
        longer than the limit is forwarded cut, with a marker; the rest of it is skipped."""
        pending = b""
        skipping = False  # in the rest of a line already forwarded cut
        while True:
            try:
                chunk = await stream.read(_LINE_LIMIT)
            except (OSError, ValueError):
                chunk = b""
            if not chunk:
                if pending and not skipping:
                    self.on_output(service, pending.decode("utf-8", "replace").rstrip())
                return
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            for line in lines:
                if skipping:
                    skipping = False
                    continue
                self.on_output(service, line.decode("utf-8", "replace").rstrip())
            if len(pending) > _LINE_LIMIT:
                if not skipping:
                    head = pending[:_LINE_LIMIT].decode("utf-8", "replace")
                    self.on_output(service, head + " [line cut]")
                    skipping = True
                pending = b""
            await asyncio.sleep(0)  # a chatty service never holds the loop for long

    def forget(self, proc: ServiceProcess) -> None:
        if self._live.pop(proc.pgid, None) is not None:
            self._tell_guardian(f"-{proc.pgid}\n")
            self._save_state()

    def kill_all(self) -> None:
        """Fast stop: SIGKILL every live group and the escaped processes proven ours."""
        for proc in list(self._live.values()):
            proc.signal_group(signal.SIGKILL)
            proc.signal_escapees(signal.SIGKILL)

    # --- the record of launched groups, for a restart after a crash -------------------------

    def _state_file(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / "processes.json"

    def record_again(self) -> None:
        """Write the record now (its directory was removed and created again)."""
        self._save_state()

    def _save_state(self) -> None:
        """Snapshot the record now (in order, on the loop); write it off the loop. One writer
        task at a time; a snapshot taken while it writes replaces any older one still
        waiting, so writes never pile up and the latest state always lands last."""
        path = self._state_file()
        if path is None:
            return
        records = [
            {"service": p.spec.service, "pid": p.pid, "pgid": p.pgid,
             "create_time": p.create_time, "launch": p.launch_id}
            for p in self._live.values()
        ]
        self._state_seq += 1
        self._state_next = (self._state_seq, json.dumps(
            {"daemon_pid": os.getpid(), "boot_id": self.boot_id, "instance": self.instance_id,
             "processes": records}))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_pending(path)
            return
        if self._state_writer is None or self._state_writer.done():
            self._state_writer = loop.create_task(self._write_state(path), name="state-writer")

    async def _write_state(self, path: Path) -> None:
        while self._state_next is not None:
            seq, text = self._state_next
            self._state_next = None
            await asyncio.to_thread(self._write_record, path, seq, text)

    def _write_pending(self, path: Path) -> None:
        if self._state_next is not None:
            seq, text = self._state_next
            self._state_next = None
            self._write_record(path, seq, text)

    def _write_record(self, path: Path, seq: int, text: str) -> None:
        with self._state_lock:
            if seq <= self._state_written:
                return  # a newer record is already there
            try:
                if not path.parent.is_dir():
                    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
                    log.warning("state directory %s was missing: created it again",
                                path.parent)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(text)
                os.replace(tmp, path)
            except OSError as exc:
                log.error("cannot record processes in %s: %s", path, exc)
                return
            self._state_written = seq

    async def flush_state(self) -> None:
        """Until the latest record is on disk (called at exit: nothing is lost)."""
        writer = self._state_writer
        if writer is not None and not writer.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(writer)
        path = self._state_file()
        if path is not None:
            self._write_pending(path)

    async def reap_leftovers(self, timeout_s: float = 10.0) -> list[str]:
        """Stop what an earlier run of the daemon left behind, and only that: processes that
        carry the recorded instance id, in a recorded group or escaped from one, on the same
        boot. Returns what was found."""
        path = self._state_file()
        if path is None:
            return []
        doc = await asyncio.to_thread(_read_record, path)
        if doc is None:
            return []
        owner = await asyncio.to_thread(_live_supervisor, doc.get("daemon_pid"))
        if owner is not None and doc.get("boot_id") == self.boot_id:
            # its lock file went with a removed state directory: it is not a leftover
            raise StartupError(f"{path.parent} belongs to a running llm-supervisor (pid "
                               f"{owner}) whose lock file was removed; stop that one first")
        try:
            found = await self._reap_recorded(path, doc, timeout_s)
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
        return found

    async def _reap_recorded(self, path: Path, doc: dict[str, Any], timeout_s: float
                             ) -> list[str]:
        records = doc.get("processes")
        if not isinstance(records, list):
            log.warning("ignoring unreadable %s: processes is not a list", path)
            return []
        recorded_boot = doc.get("boot_id")
        if self.boot_id is None or recorded_boot != self.boot_id:
            log.warning("%s was written %s: nothing recorded in it can be running; "
                        "nothing stopped", path,
                        "before the last reboot" if recorded_boot else "without a boot id")
            return []
        instance = doc.get("instance")
        if not isinstance(instance, str) or not instance:
            log.warning("%s has no instance id (an older version wrote it): nothing can be "
                        "proven ours, so nothing is stopped", path)
            return []
        groups: dict[int, str] = {}
        for rec in records:
            try:
                service, pgid = str(rec["service"]), int(rec["pgid"])
            except (KeyError, TypeError, ValueError):
                continue
            if pgid > 1:
                groups[pgid] = service
        scan = await asyncio.to_thread(_scan_leftovers, instance, groups)
        for pid, pgid, cmd, why in scan.strangers:
            log.warning("process %d (%s) in process group %d, recorded for %s by an earlier "
                        "run, is not proven ours (%s): left alone",
                        pid, cmd, pgid, groups.get(pgid, "?"), why)
        found: list[str] = []
        for left in scan.ours:
            desc = (f"{left.service} (pgid {left.pgid})" if left.in_group
                    else f"{left.service} (pid {left.pid}, outside its group)")
            if desc not in found:
                found.append(desc)
                log.warning("found %s left by an earlier run: stopping it", desc)
            log.info("stopping pid %d (%s)", left.pid, left.cmd)
        try:
            await _stop_pidfds([left.pidfd for left in scan.ours], timeout_s)
        finally:
            for left in scan.ours:
                os.close(left.pidfd)
        return found


def _live_supervisor(pid: object) -> int | None:
    """`pid` if it is a live llm-supervisor other than this one (by its command line)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1 or pid == os.getpid():
        return None
    st = _stat(pid)
    if st is None or st.state in ("Z", "X"):
        return None
    cmd = _cmdline(pid)
    return pid if "supervisord_llm" in cmd or "llm-supervisor" in cmd else None


def _read_record(path: Path) -> dict[str, Any] | None:
    """The record, read like a config file (a regular file of at most 1 MB: a FIFO, a device
    or a huge file left there is refused, never read); None if there is none."""
    if not (path.exists() or path.is_symlink()):
        return None
    try:
        text = read_config_file(path, what="process record").decode("utf-8", "replace")
        doc = json.loads(text)
    except ConfigError as exc:
        log.warning("ignoring %s", "; ".join(exc.problems))
        return None
    except (ValueError, RecursionError) as exc:
        log.warning("ignoring unreadable %s: %s", path, str(exc)[:200])
        return {}
    return doc if isinstance(doc, dict) else {}


def _send(fd: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        signal.pidfd_send_signal(fd, sig)


async def _stop_pidfds(fds: Iterable[int], timeout_s: float) -> None:
    """SIGTERM (and SIGCONT), then SIGKILL to what is still there after `timeout_s`."""
    left = list(fds)
    for fd in left:
        _send(fd, signal.SIGTERM)
        _send(fd, signal.SIGCONT)
    deadline = time.monotonic() + timeout_s
    while left:
        left = [fd for fd in left if _pidfd_alive(fd)]
        if not left or time.monotonic() >= deadline:
            break
        await asyncio.sleep(_POLL_S)
    for fd in left:
        _send(fd, signal.SIGKILL)
