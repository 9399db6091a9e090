"""Processes, read from /proc and signalled only when proven ours: the launch marker, the
scans for escaped processes and for what an earlier run left, pidfds. Blocking functions:
run them in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("supervisord_llm.spawn")

_POLL_S = 0.02
MARK_INSTANCE = "LLM_SUPERVISOR_INSTANCE"
MARK_SERVICE = "LLM_SUPERVISOR_SERVICE"
MARK_LAUNCH = "LLM_SUPERVISOR_LAUNCH"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
_CMD_MAX = 200


def read_boot_id(path: str = BOOT_ID_PATH) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def pids() -> list[int]:
    try:
        return [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return []


@dataclass(frozen=True)
class Stat:
    state: str
    pgid: int
    start_ticks: int


def stat(pid: int) -> Stat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data.rpartition(b")")[2].split()  # the name may hold spaces and parentheses
    try:
        return Stat(fields[0].decode(), int(fields[2]), int(fields[19]))
    except (IndexError, ValueError):
        return None


def marker(pid: int) -> dict[str, str] | None:
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


def cmdline(pid: int) -> str:
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


def pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def pidfd_alive(fd: int) -> bool:
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
        return self._pidfd is not None and pidfd_alive(self._pidfd)

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
    for pid in pids():
        if pid in (me, pgid):
            continue
        st = stat(pid)
        if st is None or st.state in ("Z", "X") or st.pgid == pgid or st.start_ticks < since_ticks:
            continue
        fd = pidfd(pid)  # before the check: what it names cannot be replaced under us
        if fd is None:
            continue
        mark = marker(pid)
        ours = mark is not None and mark.get(MARK_INSTANCE) == instance \
            and mark.get(MARK_SERVICE) == service and mark.get(MARK_LAUNCH) == launch
        if ours or (pipe_link is not None and _holds(pid, pipe_link)):
            found.append(Escapee(pid, cmdline(pid), ours, fd))
        else:
            os.close(fd)
    return found


@dataclass
class Leftover:
    pid: int
    pgid: int
    service: str
    cmd: str
    pidfd: int
    in_group: bool


@dataclass
class LeftoverScan:
    ours: list[Leftover] = field(default_factory=list)
    strangers: list[tuple[int, int, str, str]] = field(default_factory=list)  # pid pgid cmd why


def _marked() -> Iterator[tuple[int, Stat, int, dict[str, str] | None]]:
    """Every live process but this one: its pid, stat, a pidfd opened before its marker was
    read (the caller closes it), its marker (None: unreadable)."""
    me = os.getpid()
    for pid in pids():
        if pid == me:
            continue
        st = stat(pid)
        if st is None or st.state in ("Z", "X"):
            continue
        fd = pidfd(pid)
        if fd is not None:
            yield pid, st, fd, marker(pid)


def scan_marked(instances: set[str]) -> list[Leftover]:
    """Processes anywhere whose marker names one of `instances` (dead keepers' ids), each
    with a pidfd opened before the check. One pass over /proc for all of them."""
    out: list[Leftover] = []
    for pid, st, fd, mark in _marked():
        if mark is not None and mark.get(MARK_INSTANCE) in instances:
            out.append(Leftover(pid, st.pgid, mark.get(MARK_SERVICE) or "?", cmdline(pid), fd,
                                False))
        else:
            os.close(fd)
    return out


def scan_leftovers(instance: str, groups: dict[int, str]) -> LeftoverScan:
    """Processes of the recorded groups, and processes anywhere that carry the recorded
    instance id. Ours: the environment carries the instance id. Blocking: run it in a thread."""
    scan = LeftoverScan()
    for pid, st, fd, mark in _marked():
        in_group = st.pgid in groups
        if mark is not None and mark.get(MARK_INSTANCE) == instance:
            service = mark.get(MARK_SERVICE) or groups.get(st.pgid, "?")
            scan.ours.append(Leftover(pid, st.pgid, service, cmdline(pid), fd, in_group))
            continue
        os.close(fd)
        if in_group:
            why = "its environment cannot be read" if mark is None else \
                "it does not carry the recorded launch marker"
            scan.strangers.append((pid, st.pgid, cmdline(pid), why))
    return scan



def send(fd: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        signal.pidfd_send_signal(fd, sig)


async def stop_pidfds(fds: Iterable[int], timeout_s: float) -> None:
    """SIGTERM (and SIGCONT), then SIGKILL to what is still there after `timeout_s`."""
    left = list(fds)
    for fd in left:
        send(fd, signal.SIGTERM)
        send(fd, signal.SIGCONT)
    deadline = time.monotonic() + timeout_s
    while left:
        left = [fd for fd in left if pidfd_alive(fd)]
        if not left or time.monotonic() >= deadline:
            break
        await asyncio.sleep(_POLL_S)
    for fd in left:
        send(fd, signal.SIGKILL)


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


async def connect_in(directory: Path, name: str, timeout_s: float) -> socket.socket:
    """A SOCK_SEQPACKET connection to the socket `name` in `directory`, reached through
    /proc/self/fd (a directory deeper than a socket address may be, 108 bytes, works);
    OSError (FileNotFoundError, ConnectionRefusedError: none listens there) or TimeoutError."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setblocking(False)
    try:
        dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            async with asyncio.timeout(timeout_s):
                await loop.sock_connect(sock, f"/proc/self/fd/{dirfd}/{name}")
        finally:
            os.close(dirfd)
    except BaseException:
        sock.close()
        raise
    return sock
