"""The audit log's writer, in the front process: one JSON line per request (made by
`gate/door.py`), to a file or to the journal.

The lines come in batches (`put_batch`: the door gathers them on the loop, every 0.1 s or
512 lines) and go, joined, to a writer thread. At most MAX_PENDING bytes wait: beyond, lines
are dropped and counted (`dropped`, a metric and an alert), never waited for: a full disk or
a stuck journald never blocks the loop. `reopen()` (SIGHUP, `llmctl reload`: after logrotate moved
the file) opens the path again."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections import deque
from typing import Final

log = logging.getLogger(__name__)

MAX_PENDING: Final = 16 * 1024 * 1024  # bytes of lines waiting for the writer
JOURNAL_SOCKET: Final = "/run/systemd/journal/socket"
IDENTIFIER: Final = "llm-supervisor-audit"


class AuditLog:
    def __init__(self, path: str, gid: int | None = None,
                 journal_socket: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self.gid = gid
        self.journal_socket = journal_socket
        self.added = 0  # bytes of lines taken (on the loop)
        self.done = 0  # bytes of them written or dropped (by the writer thread)
        self.accepted = 0
        self.written = 0
        self.dropped_full = 0  # (on the loop) no room: the writer is behind
        self.dropped_failed = 0  # (the writer) a write failed
        self.errors = 0
        self._cond = threading.Condition()
        self._batches: deque[tuple[str, int]] = deque()
        self._fd = -1
        self._sock: socket.socket | None = None
        self._reopen = True
        self._closed = False
        self._torn = False  # a write stopped within a line: the next begins on a new one
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    # --- on the loop --------------------------------------------------------------------------

    def put_batch(self, lines: list[str]) -> None:
        """Lines gathered elsewhere (the door, on the loop), written as one batch; dropped
        whole, and counted, when the writer is that far behind."""
        size = sum(map(len, lines)) + len(lines)
        if self.added - self.done + size > MAX_PENDING or self._closed:
            self.dropped_full += len(lines)
            return
        self.added += size
        self.accepted += len(lines)
        with self._cond:
            self._batches.append(("\n".join(lines) + "\n", len(lines)))
            self._cond.notify()

    def add(self, line: str) -> None:
        """One line (a batch of one)."""
        self.put_batch([line])

    def reopen(self) -> None:
        with self._cond:
            self._reopen = True
            self._cond.notify()

    def close(self, timeout_s: float = 2.0) -> None:
        """Write what waits (at most `timeout_s`), then stop."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout_s)

    def counters(self) -> dict[str, int]:
        return {"accepted": self.accepted, "written": self.written,
                "dropped": self.dropped_full + self.dropped_failed, "errors": self.errors}

    # --- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._batches and not self._closed and not self._reopen:
                    self._cond.wait()
                if self._reopen:
                    self._reopen = False
                    self._open()
                if not self._batches:
                    if self._closed:
                        break
                    continue
                text, n = self._batches.popleft()
            ok = self._write(text.encode("utf-8", "replace"))
            with self._cond:
                self.done += len(text)
                if ok:
                    self.written += n
                else:
                    self.dropped_failed += n
                    self.errors += 1
        if self._fd >= 0:
            os.close(self._fd)
        if self._sock is not None:
            self._sock.close()

    def _open(self) -> None:
        if self.path == "journal":
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                         | os.O_NOFOLLOW | os.O_NONBLOCK, 0o640)
        except OSError as exc:
            if self._fd >= 0:
                log.error("audit: cannot open %s again: %s; the lines go on to the file that "
                          "was open (llmctl reload tries again)", self.path,
                          exc.strerror or exc)
            else:
                log.error("audit: cannot open %s: %s; audit lines are dropped until it can be "
                          "(llmctl reload tries again)", self.path, exc.strerror or exc)
            return
        if self.gid is not None and os.geteuid() == 0:
            with contextlib.suppress(OSError):
                os.fchown(fd, 0, self.gid)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd

    def _write(self, data: bytes) -> bool:
        if self.path == "journal":
            return self._journal(data)
        if self._fd < 0:
            return False
        if self._torn:
            data = b"\n" + data
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError:
            if len(view) != len(data):
                self._torn = True  # (else it stays as it was)
            return False
        self._torn = False
        return True

    def _journal(self, data: bytes) -> bool:
        sock = self._sock
        if sock is None:
            return False
        ok = True
        for line in data.splitlines():
            msg = (b"SYSLOG_IDENTIFIER=" + IDENTIFIER.encode() + b"\nPRIORITY=6\nMESSAGE=" + line
                   + b"\n")
            try:
                sock.sendto(msg, self.journal_socket)
            except OSError:
                ok = False
        return ok
