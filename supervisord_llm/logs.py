"""Logging: the three formats, and the pipeline that takes every line to stderr.

Formats: `journal` (one line, `<N>` priority prefix that journald understands), `text`
(timestamped), `json` (one object per line).

The pipeline (`LogPipeline`): the daemon's own records and the output of its services go
into a bounded queue, and one writer thread writes them to stderr. The event loop never
writes to stderr itself, so a journal that does not read (journald restarting, a full pipe)
costs the loop nothing: no missed watchdog ping, no `llmctl status` left waiting. What does not
fit is dropped, counted (`LogPipeline.dropped`) and reported in one line once the journal
reads again ("N log lines dropped: the journal did not keep up"). See docs/design.md,
"Logging".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}

LINE_CAP = 8 * 1024  # bytes of one written line, newline excluded; longer ones are cut
LINE_CUT = " [line cut]"  # the marker at the end of a cut line
QUEUE_BYTES = 2 * 1024 * 1024  # the queue, lines plus their bookkeeping
RESERVE_BYTES = 512 * 1024  # of which only ERROR and CRITICAL lines may use the last part
EXIT_FLUSH_S = 2.0  # how long the exit waits for the queue to be written
LINE_OVERHEAD = 128  # what a queued line costs beyond its bytes (objects, deque slot)
_BATCH_BYTES = 64 * 1024  # written in one os.write


def priority(level: int) -> int:
    for lvl in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if level >= lvl:
            return _PRIORITY[lvl]
    return 7


def cut_text(text: str, limit: int | None, marker: str = LINE_CUT) -> str:
    """`text` if it fits in `limit` bytes of UTF-8, else its head and `marker`, together
    within `limit` bytes (cut on a character boundary)."""
    if limit is None or len(text) * 4 <= limit:  # fast path: 4 bytes a character at most
        return text
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    mark = marker.encode()
    return _cut_bytes(data, max(0, limit - len(mark))).decode("utf-8", "replace") + marker


def _cut_bytes(data: bytes, n: int) -> bytes:
    """The first `n` bytes of `data` or fewer, never splitting a UTF-8 sequence."""
    if n >= len(data):
        return data
    while n > 0 and (data[n] & 0xC0) == 0x80:  # data[n] continues a sequence: step back
        n -= 1
    return data[:n]


class _CappedFormatter(logging.Formatter):
    """A formatter whose lines fit in `line_cap` bytes (None: no cap)."""

    def __init__(self, line_cap: int | None = None) -> None:
        super().__init__()
        self.line_cap = line_cap


class JournalFormatter(_CappedFormatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += " | " + self.formatException(record.exc_info)
        if "\n" in msg:  # one record, one journal entry
            msg = msg.replace("\n", " | ")
        return cut_text(f"<{priority(record.levelno)}>{msg}", self.line_cap)


class TextFormatter(_CappedFormatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return cut_text(f"{ts}.{int(record.msecs):03d} {record.levelname:<7} {msg}",
                        self.line_cap)


class JsonFormatter(_CappedFormatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        doc = {"ts": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name, "msg": msg}
        exc = self.formatException(record.exc_info) if record.exc_info else None
        if exc is not None:
            doc["exc"] = exc
        line = json.dumps(doc, ensure_ascii=False)
        if self.line_cap is None or len(line) * 4 <= self.line_cap \
                or len(line.encode("utf-8", "replace")) <= self.line_cap:
            return line
        # Too long: cut the message (and the traceback) so that the object stays whole.
        # Escapes (control characters) can make the line longer than its text: halve
        # until it fits.
        budget = self.line_cap - 256
        while True:
            doc["msg"] = cut_text(msg, max(budget, 0))
            if exc is not None:
                doc["exc"] = cut_text(exc, max(budget // 4, 0))
            line = json.dumps(doc, ensure_ascii=False)
            if budget <= 0 or len(line.encode("utf-8", "replace")) <= self.line_cap:
                return line
            budget //= 2


def make_formatter(fmt: str, line_cap: int | None = LINE_CAP) -> logging.Formatter:
    """The formatter for `journal`, `json` or (anything else) `text`."""
    cls = {"journal": JournalFormatter, "json": JsonFormatter}.get(fmt, TextFormatter)
    return cls(line_cap)


# --- the pipeline ------------------------------------------------------------------------------


def fd_writer(fd: int) -> Callable[[bytes], None]:
    """A blocking write of all of `data` to `fd` (waits if `fd` was left non-blocking)."""

    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
                poller.poll()
                continue
            view = view[n:]

    return write


def stream_writer(stream: TextIO) -> Callable[[bytes], None]:
    """Writes to `stream`'s file descriptor, or through the stream if it has none."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fd = -1
    if fd >= 0:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            stream.flush()  # whatever the stream holds goes first
        return fd_writer(fd)

    def write(data: bytes) -> None:
        stream.write(data.decode("utf-8", "replace"))
        stream.flush()

    return write


def _plain_notice(n: int) -> bytes:
    return f"{n} log line{'s' if n != 1 else ''} dropped: the journal did not keep up".encode()


class LogPipeline:
    """A bounded queue of log lines and one writer thread.

    - Bounded in bytes: each queued line costs its length plus LINE_OVERHEAD, and the queue
      holds at most `max_bytes` (the batch being written included). A line is capped at
      `line_cap` bytes, its end replaced by LINE_CUT.
    - Lines below `urgent_level` (INFO, WARNING, the services' output) may fill the queue only
      up to `max_bytes - reserve_bytes`; beyond that the *newest* line is dropped: refusing a
      line costs nothing (it is not even formatted), what is queued stays a contiguous
      stretch of history, and the notice marks the gap where it is.
    - ERROR and CRITICAL lines (`urgent_level`) may use the reserve, and when even that is
      full they take the room of the oldest queued lower lines: an urgent line is dropped
      only when the queue holds nothing but urgent lines.
    - Every dropped line is counted in `dropped` (`dropped_urgent` for urgent ones). Once a
      line below urgent fits again, or the queue has been written out, one notice line
      says how many were dropped since the last notice.
    - `put` and `drop` never block on the writer (a short lock, no I/O); `flush(timeout)`
      waits at most `timeout` and does not wait again for a writer still stuck since an
      earlier flush gave up.

    `write` is a blocking write of a whole chunk (tests pass one that blocks); it runs only
    on the writer thread, a daemon thread, so a stuck stderr never holds the exit.
    """

    def __init__(self, write: Callable[[bytes], None], *, max_bytes: int = QUEUE_BYTES,
                 reserve_bytes: int = RESERVE_BYTES, line_cap: int = LINE_CAP,
                 urgent_level: int = logging.ERROR,
                 notice: Callable[[int], bytes | str] = _plain_notice,
                 name: str = "log-writer") -> None:
        if not 0 <= reserve_bytes < max_bytes:
            raise ValueError("need 0 <= reserve_bytes < max_bytes")
        self._write = write
        self.max_bytes = max_bytes
        self.reserve_bytes = reserve_bytes
        self.line_cap = line_cap
        self.urgent_level = urgent_level
        self._notice = notice
        self._normal_limit = max_bytes - reserve_bytes
        self._cond = threading.Condition(threading.Lock())
        self._normal: deque[tuple[int, bytes]] = deque()
        self._urgent: deque[tuple[int, bytes]] = deque()
        self._seq = 0
        self._bytes = 0  # queued + being written, LINE_OVERHEAD included
        self._busy = False  # a batch is being written
        self._unreported = 0  # dropped since the last notice
        self._closed = False
        self._stuck = False  # a flush gave up, and nothing was written since
        # counters (read without the lock: plain ints)
        self.accepted = 0  # lines queued (notices included)
        self.written = 0  # lines written
        self.dropped = 0  # lines dropped: queue full, closed, or a failed write
        self.dropped_urgent = 0  # of which ERROR/CRITICAL
        self.write_errors = 0  # writes that failed (their lines are counted in dropped)
        self.notices = 0  # "N log lines dropped" notices queued or written
        self.peak_bytes = 0  # the most the queue ever held
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- producers (any thread, the event loop included) ---------------------------------------

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def has_room(self, level: int) -> bool:
        """A hint, without the lock: whether a short line at `level` would be queued now.
        Callers use it to skip formatting a line that would be dropped (then `drop()` it)."""
        if self._closed:
            return False
        return level >= self.urgent_level or self._bytes + LINE_OVERHEAD < self._normal_limit

    def drop(self, level: int = logging.INFO) -> None:
        """Count a line that was not queued (see `has_room`)."""
        with self._cond:
            self._count_drop(level >= self.urgent_level, 1)

    def put(self, line: str | bytes, level: int = logging.INFO) -> bool:
        """Queue one line (without its newline); False if it was dropped."""
        data = line.encode("utf-8", "replace") if isinstance(line, str) else line
        data = self._capped(data) + b"\n"
        size = len(data) + LINE_OVERHEAD
        urgent = level >= self.urgent_level
        with self._cond:
            if self._closed:
                self._count_drop(urgent, 1)
                return False
            if urgent:
                while self._bytes + size > self.max_bytes and self._normal:
                    _, old = self._normal.popleft()  # the oldest lower line makes room
                    self._bytes -= len(old) + LINE_OVERHEAD
                    self._count_drop(False, 1)
                if self._bytes + size > self.max_bytes:
                    self._count_drop(True, 1)
                    return False
            else:
                if self._bytes + size > self._normal_limit:
                    self._count_drop(False, 1)
                    return False
                if self._unreported:
                    self._queue_notice()
            self._queue(data, size, urgent)
            self._cond.notify_all()
        return True

    def _capped(self, data: bytes) -> bytes:
        if len(data) <= self.line_cap:
            return data
        mark = LINE_CUT.encode()
        return _cut_bytes(data, max(0, self.line_cap - len(mark))) + mark

    def _count_drop(self, urgent: bool, n: int) -> None:
        self.dropped += n
        if urgent:
            self.dropped_urgent += n
        if not self._closed:
            self._unreported += n

    def _queue(self, data: bytes, size: int, urgent: bool) -> None:
        self._seq += 1
        (self._urgent if urgent else self._normal).append((self._seq, data))
        self._bytes += size
        self.accepted += 1
        self.peak_bytes = max(self.peak_bytes, self._bytes)

    def _render_notice(self, n: int) -> bytes:
        try:
            text = self._notice(n)
        except Exception:  # a notice must never take the pipeline down
            text = _plain_notice(n)
        data = text.encode("utf-8", "replace") if isinstance(text, str) else text
        return self._capped(data) + b"\n"

    def _queue_notice(self) -> None:
        """Queue the notice ahead of the line that follows the gap (lock held)."""
        data = self._render_notice(self._unreported)
        size = len(data) + LINE_OVERHEAD
        if self._bytes + size <= self.max_bytes:  # else: told later, with a larger count
            self._unreported = 0
            self.notices += 1
            self._queue(data, size, True)

    # --- the writer thread ---------------------------------------------------------------------

    def _take(self) -> tuple[list[bytes], int]:
        """The oldest lines, in the order they were queued, up to _BATCH_BYTES (lock held)."""
        out: list[bytes] = []
        size = 0
        normal, urgent = self._normal, self._urgent
        while (normal or urgent) and size < _BATCH_BYTES:
            lane = urgent if urgent and (not normal or urgent[0][0] < normal[0][0]) else normal
            data = lane.popleft()[1]
            out.append(data)
            size += len(data) + LINE_OVERHEAD
        return out, size

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._normal or self._urgent or self._unreported or self._closed):
                    self._cond.wait()
                if self._normal or self._urgent:
                    batch, size = self._take()
                elif self._unreported:  # all written: say what was dropped meanwhile
                    notice = self._render_notice(self._unreported)
                    self._unreported = 0
                    self.notices += 1
                    self.accepted += 1
                    batch, size = [notice], len(notice) + LINE_OVERHEAD
                    self._bytes += size
                else:  # closed and empty
                    self._cond.notify_all()
                    return
                self._busy = True
            ok = True
            try:
                self._write(b"".join(batch))
            except Exception:  # EPIPE, EBADF, a closed stream: these lines are lost
                ok = False
            with self._cond:
                self._busy = False
                self._bytes -= size
                if ok:
                    self.written += len(batch)
                    self._stuck = False
                else:
                    self.write_errors += 1
                    self.dropped += len(batch)
                self._cond.notify_all()

    # --- the exit --------------------------------------------------------------------------

    def _pending(self) -> bool:
        return bool(self._normal or self._urgent or self._unreported or self._busy)

    def flush(self, timeout: float = EXIT_FLUSH_S) -> bool:
        """Wait (blocking: at exit, or off the loop) until everything queued is written, at
        most `timeout` seconds. True if it was; False at the deadline, and at once while
        the writer is still stuck since an earlier flush gave up."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending():
                left = deadline - time.monotonic()
                if self._stuck or left <= 0:
                    self._stuck = True
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = EXIT_FLUSH_S) -> bool:
        """Flush (at most `timeout`), then refuse new lines (counted as dropped) and let the
        writer thread end once the queue is written. Returns what flush returned."""
        ok = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        return ok

    @property
    def closed(self) -> bool:
        return self._closed

    def counters(self) -> dict[str, int]:
        """The counters, for metrics (`dropped` -> llm_supervisor_log_lines_dropped_total)."""
        return {"accepted": self.accepted, "written": self.written, "dropped": self.dropped,
                "dropped_urgent": self.dropped_urgent, "write_errors": self.write_errors,
                "notices": self.notices, "queued_bytes": self._bytes,
                "peak_bytes": self.peak_bytes}


class PipelineHandler(logging.Handler):
    """A logging handler that formats on the calling thread and queues into a LogPipeline.
    A record that would be dropped is not formatted; a record that cannot be formatted is
    logged as such (never a traceback on stderr from the calling thread, as
    `Handler.handleError` would write)."""

    def __init__(self, pipeline: LogPipeline, exit_timeout: float = EXIT_FLUSH_S) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.exit_timeout = exit_timeout

    def emit(self, record: logging.LogRecord) -> None:
        pipe = self.pipeline
        if not pipe.has_room(record.levelno):
            pipe.drop(record.levelno)
            return
        try:
            line = self.format(record)
        except Exception as exc:
            line = self._unformattable(record, exc)
        pipe.put(line, record.levelno)

    def _unformattable(self, record: logging.LogRecord, exc: Exception) -> str:
        what = cut_text(f"a log record of {record.name} could not be formatted "
                        f"({type(exc).__name__}: {exc}): {record.msg!r} % {record.args!r}",
                        LINE_CAP // 2)
        try:
            return self.format(logging.makeLogRecord(
                {"name": record.name, "levelno": logging.ERROR, "levelname": "ERROR",
                 "msg": what, "created": record.created, "msecs": record.msecs}))
        except Exception:
            return what

    def flush(self) -> None:
        """At exit (`logging.shutdown`): write what is queued, waiting at most
        `exit_timeout`."""
        if not self.pipeline.closed:
            self.pipeline.flush(self.exit_timeout)

    def close(self) -> None:
        self.pipeline.close(self.exit_timeout)
        super().close()


_installed: LogPipeline | None = None


def pipeline() -> LogPipeline | None:
    """The pipeline `setup_logging` installed (None before): its counters, `flush`, `close`."""
    return _installed


def setup_logging(fmt: str, level: int = logging.INFO, stream: TextIO | None = None, *,
                  max_bytes: int = QUEUE_BYTES, reserve_bytes: int = RESERVE_BYTES,
                  line_cap: int = LINE_CAP) -> LogPipeline:
    """Route every record of the process through a LogPipeline writing to `stream`
    (stderr). Returns the pipeline, also available as `pipeline()`. A pipeline installed by
    an earlier call is closed (flushed first, within EXIT_FLUSH_S)."""
    global _installed
    target = sys.stderr if stream is None else stream
    formatter = make_formatter(fmt, line_cap)

    def notice(n: int) -> str:
        return formatter.format(logging.LogRecord(
            __name__, logging.WARNING, __file__, 0,
            "%d log line%s dropped: the journal did not keep up", (n, "s" if n != 1 else ""),
            None))

    pipe = LogPipeline(stream_writer(target), max_bytes=max_bytes,
                       reserve_bytes=reserve_bytes, line_cap=line_cap, notice=notice)
    handler = PipelineHandler(pipe)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        if isinstance(h, PipelineHandler):
            h.close()
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    _installed = pipe
    return pipe


def forward_output(logger: logging.Logger) -> Callable[[str, str], None]:
    """What a service writes, one line at a time, as `[service] line` INFO records of
    `logger`. A line that the installed pipeline would drop is only counted: no record is
    built, so a service that floods its output costs the loop little."""

    def forward(service: str, line: str) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        pipe = _installed
        if pipe is not None and not pipe.has_room(logging.INFO):
            pipe.drop(logging.INFO)
            return
        logger.info("[%s] %s", service, line)

    return forward


def error_line(message: str, journal: bool) -> str:
    """A fatal start-up error as one stderr line."""
    return f"<3>llm-supervisor: {message}" if journal else f"llm-supervisor: {message}"


class LogLimiter:
    """Logs what strangers can cause (bad requests, slow clients, failing upstreams) at a
    bounded rate: per key, at most `burst` lines per `window_s`; the first line of the next
    window says how many were left out."""

    def __init__(self, name: str, burst: int = 5, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logging.getLogger(name)
        self.burst = burst
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int, int]] = {}  # key: (start, logged, dropped)

    def allow(self, key: str) -> tuple[bool, str]:
        """Whether a line for `key` may be logged now, and a note on what was left out."""
        now = self._clock()
        note = ""
        with self._lock:
            start, logged, dropped = self._windows.get(key, (now, 0, 0))
            if now - start >= self.window_s:
                if dropped:
                    note = (f" ({dropped} similar message{'s' if dropped != 1 else ''} left "
                            f"out in the last {now - start:.0f} s)")
                start, logged, dropped = now, 0, 0
            if logged >= self.burst:
                self._windows[key] = (start, logged, dropped + 1)
                return False, ""
            self._windows[key] = (start, logged + 1, dropped)
            if len(self._windows) > 1024:  # keys are ours, but never let the dict grow
                self._windows.pop(next(iter(self._windows)))
        return True, note

    def log(self, key: str, level: int, msg: str, *args: object, exc_info: bool = False
            ) -> bool:
        ok, note = self.allow(key)
        if ok:
            self.logger.log(level, msg + note.replace("%", "%%"), *args, exc_info=exc_info)
        return ok

    def info(self, key: str, msg: str, *args: object) -> bool:
        return self.log(key, logging.INFO, msg, *args)

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self.log(key, logging.WARNING, msg, *args)

    def error(self, key: str, msg: str, *args: object) -> bool:
        return self.log(key, logging.ERROR, msg, *args)

    def exception(self, key: str, msg: str, *args: object) -> bool:
        return self.log(key, logging.ERROR, msg, *args, exc_info=True)


