"""sd_notify without blocking: READY, STATUS, WATCHDOG, STOPPING, RELOADING, and the file
descriptor store (FDSTORE, FDSTOREREMOVE; `listen_fds` takes back what it kept); and the few
questions the daemon asks its service manager (its own unit, the job on it).

A Unix datagram socket queues only a few messages (`net.unix.max_dgram_qlen`, often 10); a
blocking `sendto` stalls the event loop when the manager is slow to read. This sender never
blocks: the socket is non-blocking and every `sendto` also passes MSG_DONTWAIT, so a message
that does not fit (EAGAIN), or cannot be sent at all (the manager is gone), is counted in
`Notifier.dropped` (exported as `llm_supervisor_sd_notify_dropped_total`) and the next one
tries again. Drops are logged at most a few times a minute.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import shutil
import signal
import socket
import time
from pathlib import Path

from .logs import LogLimiter

log = logging.getLogger(__name__)

# the daemon's stop and reload signals: blocked from its entry point (entry.py) until the
# event loop's handlers are in place
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Notifier:
    """sd_notify(3) over NOTIFY_SOCKET. Counters, read by the metrics (plain ints, changed
    only on the loop): `sent`, messages the socket took; `dropped`, messages that were not
    sent (the manager's queue was full or the socket failed), whatever they carried
    (WATCHDOG=1 included: the next ping tries again); `last_error`, why the last one was
    dropped."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        self.address: str | None = env.get("NOTIFY_SOCKET") or None
        self._sock: socket.socket | None = None
        self.sent = 0
        self.dropped = 0
        self.last_error: str | None = None
        self._limiter = LogLimiter(__name__, burst=3, window_s=60.0)
        self.watchdog_usec: int | None = None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)
        if self.address is not None:
            if self.address.startswith("@"):
                self.address = "\0" + self.address[1:]
            elif not self.address.startswith("/"):
                log.warning("NOTIFY_SOCKET %r is not supported; not notifying", self.address)
                self.address = None
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Ping at half the watchdog timeout, as sd_watchdog_enabled(3) advises."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def notify(self, *fields: str) -> bool:
        if self._sock is None or self.address is None:
            return False
        payload = "\n".join(fields).encode("utf-8", "replace")
        try:
            self._sock.sendto(payload, socket.MSG_DONTWAIT, self.address)
        except (BlockingIOError, InterruptedError):
            self._dropped(fields, "the service manager's queue is full")
            return False
        except OSError as exc:
            self._dropped(fields, exc.strerror or str(exc))
            return False
        self.sent += 1
        return True

    def _dropped(self, fields: tuple[str, ...], why: str) -> None:
        self.dropped += 1
        self.last_error = why
        what = fields[0].partition("=")[0] if fields else "?"
        self._limiter.warning("drop", "sd_notify: %s not sent (%s); %d dropped so far",
                              what, why, self.dropped)

    def store_fd(self, fd: int, name: str) -> bool:
        """Park a copy of `fd` in the service's file descriptor store (FileDescriptorStoreMax
        in the unit): systemd keeps it across a restart of the daemon and hands it back
        (`listen_fds`); it closes it when the unit stops for good."""
        return self._send(f"FDSTORE=1\nFDNAME={name}", (fd,))

    def remove_fd(self, name: str) -> bool:
        return self._send(f"FDSTOREREMOVE=1\nFDNAME={name}", ())

    def _send(self, text: str, fds: tuple[int, ...]) -> bool:
        if self._sock is None or self.address is None:
            return False
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] \
            if fds else []
        try:
            self._sock.sendmsg([text.encode()], anc, socket.MSG_DONTWAIT, self.address)
        except (BlockingIOError, InterruptedError):
            self._dropped((text,), "the service manager's queue is full")
            return False
        except OSError as exc:
            self._dropped((text,), exc.strerror or str(exc))
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 pair it with the READY=1 that follows.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def listen_fds(env: dict[str, str] | None = None) -> dict[str, list[int]]:
    """The file descriptors systemd handed this process (`LISTEN_FDS`, `LISTEN_FDNAMES`, for
    this pid only), by name; made close-on-exec, and the variables removed so that nothing
    this process starts takes them for its own."""
    environ = os.environ if env is None else env
    try:
        if int(environ.get("LISTEN_PID", "0")) != os.getpid():
            return {}
        n = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(key, None)
    out: dict[str, list[int]] = {}
    for i in range(max(0, min(n, 4096))):
        fd = 3 + i
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue
        out.setdefault(names[i] if i < len(names) else "unknown", []).append(fd)
    return out


def own_unit() -> str | None:
    """The systemd service this process runs as (its cgroup's last part), or None: not a
    service, or not under systemd."""
    if not os.environ.get("INVOCATION_ID") or not Path("/run/systemd/system").is_dir():
        return None
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name = line.rpartition("/")[2]
        if name.endswith(".service"):
            return name
    return None


def can_run_units() -> bool:
    """Whether the daemon can put its models' keepers in transient units of their own."""
    return own_unit() is not None and os.geteuid() == 0 and shutil.which("systemd-run") \
        is not None and shutil.which("systemctl") is not None


async def job_of(unit: str, timeout_s: float = 1.0) -> str | None:
    """The type of the job systemd runs on `unit` now (`restart`, `stop`, ...), from
    `systemctl list-jobs` (systemd 252 tells a restart from a stop there only); None when
    none, or when it cannot tell in time."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "systemctl", "list-jobs", "--no-legend", "--no-pager", "--plain",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            stdin=asyncio.subprocess.DEVNULL)
    except OSError:
        return None
    try:
        async with asyncio.timeout(timeout_s):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None
    for line in out.decode(errors="replace").splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == unit:
            return fields[2]
    return None


FRONT_LEASE = "front-lease"  # the front process's lease, in the daemon's fd store

# environment a transient unit gets from systemd itself, never from us
_OWN_ENV = ("INVOCATION_ID", "JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
            "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "MANAGERPID", "SYSTEMD_EXEC_PID")


class Systemd:
    """The daemon's service manager, for its models' keepers: a transient unit per keeper
    (`systemd-run`), and the leases' write ends in the daemon's file descriptor store."""

    def __init__(self, notifier: Notifier, stored: dict[str, list[int]]) -> None:
        self.notifier = notifier
        self._stored = {name: list(fds) for name, fds in stored.items()
                        if name.startswith("lease-") or name == FRONT_LEASE}

    def store(self, fd: int, name: str) -> None:
        if not self.notifier.store_fd(fd, name):
            log.error("lease %s not parked in systemd's file descriptor store: a restart of "
                      "llm-supervisor would end its model after adopt_grace_s", name)

    def take(self, name: str) -> int | None:
        fds = self._stored.get(name)
        if not fds:
            return None
        fd = fds.pop()
        for extra in fds:  # one lease per keeper
            os.close(extra)
        del self._stored[name]
        return fd

    def forget(self, name: str) -> None:
        self.notifier.remove_fd(name)

    def leftover(self) -> list[str]:
        """Leases in the store that no keeper claimed (its directory gone): dropped."""
        names = [n for n in self._stored if n.startswith("lease-")]
        for name in names:
            for fd in self._stored.pop(name):
                os.close(fd)
            self.forget(name)
        return names

    async def start_unit(self, unit: str, description: str, argv: list[str],
                         env: dict[str, str], stop_timeout_s: float, *,
                         properties: tuple[str, ...] = ()) -> None:
        from .errors import SpawnError

        args = ["systemd-run", "--quiet", "--collect", "--no-block", f"--unit={unit}",
                "--service-type=exec", f"--description={description}",
                "-p", "KillMode=mixed", "-p", f"TimeoutStopSec={stop_timeout_s + 30:g}s",
                "-p", "LimitNOFILE=65536", "-p", "SyslogIdentifier=llm-supervisor",
                "-p", "OOMScoreAdjust=0"]
        for prop in properties:  # after the defaults: the last assignment holds
            args += ["-p", prop]
        for key, value in env.items():
            if key in _OWN_ENV or "\n" in value or "=" in key or not key:
                continue
            args.append(f"--setenv={key}={value}")
        args += ["--", *argv]
        try:
            proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            raise SpawnError(f"cannot run systemd-run: {exc.strerror or exc}") from None
        try:
            async with asyncio.timeout(30):
                _, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise SpawnError(f"systemd-run {unit}: no answer within 30 s") from None
        if proc.returncode != 0:
            text = err.decode(errors="replace").strip().splitlines()
            raise SpawnError(f"systemd-run {unit}: {text[-1] if text else proc.returncode}")

    async def stop_unit(self, unit: str) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                "systemctl", "stop", "--no-block", unit, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            async with asyncio.timeout(10):
                await proc.wait()
        except (OSError, TimeoutError):
            log.warning("could not ask systemd to stop %s", unit)
