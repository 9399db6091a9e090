"""Logging set-up: `journal` (one line, `<N>` priority prefix that journald understands),
`text` (timestamped), `json` (one object per line)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable

_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


def priority(level: int) -> int:
    for lvl in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if level >= lvl:
            return _PRIORITY[lvl]
    return 7


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        return f"<{priority(record.levelno)}>{msg}"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return f"{ts}.{int(record.msecs):03d} {record.levelname:<7} {msg}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(fmt: str, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter({"journal": JournalFormatter(), "json": JsonFormatter()}.get(
        fmt, TextFormatter()))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


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

    def exception(self, key: str, msg: str, *args: object) -> bool:
        return self.log(key, logging.ERROR, msg, *args, exc_info=True)


class StrangerFilter(logging.Filter):
    """For a library logger that strangers can make talk (aiohttp's server logger on the
    metrics listener logs a traceback per malformed request): one line per record instead of
    a traceback, and at most `burst` lines a minute."""

    def __init__(self, what: str, burst: int = 5, window_s: float = 60.0) -> None:
        super().__init__()
        self.what = what
        self._limiter = LogLimiter(__name__, burst, window_s)

    def filter(self, record: logging.LogRecord) -> bool:
        ok, note = self._limiter.allow(record.name)
        if not ok:
            return False
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            first = " ".join(str(exc).split())[:200]
            text = f"{text}: {type(exc).__name__}: {first}"
        record.msg = f"{self.what}: {text}{note}"
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        if record.levelno > logging.INFO:
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True
