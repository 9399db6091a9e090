"""sd_notify without blocking: READY, STATUS, WATCHDOG, STOPPING, RELOADING.

A Unix datagram socket queues only a few messages (`net.unix.max_dgram_qlen`, often 10); a
blocking `sendto` stalls the event loop when the manager is slow to read. This sender never
blocks: the socket is non-blocking and every `sendto` also passes MSG_DONTWAIT, so a message
that does not fit (EAGAIN), or cannot be sent at all (the manager is gone), is counted in
`Notifier.dropped` (exported as `llm_supervisor_sd_notify_dropped_total`) and the next one
tries again. Drops are logged at most a few times a minute.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from .logs import LogLimiter

log = logging.getLogger(__name__)


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
