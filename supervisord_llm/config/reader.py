"""Reading a configuration: the file (a regular file of at most 1 MB, never a FIFO or a
device), and the generic validator of one TOML table (`Table`), which collects every problem
with the key's path instead of stopping at the first. Knows nothing of the sections."""

from __future__ import annotations

import codecs
import contextlib
import datetime as dt
import math
import os
import re
import reprlib
import stat
import sys
from collections.abc import Callable, Iterator
from typing import Any, Final

from ..errors import ConfigError

MAX_CONFIG_BYTES: Final = 1024 * 1024  # a config file larger than 1 MB is refused
MAX_MESSAGE_CHARS: Final = 300  # one problem, as printed and logged
_BARE_KEY_RE: Final = re.compile(r"^[A-Za-z0-9_-]+$")
_FLOAT_MAX: Final = sys.float_info.max


class _Repr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        try:
            return super().repr_int(x, level)
        except ValueError:  # more digits than str() converts (sys.get_int_max_str_digits())
            return f"an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits"

    def repr_date(self, x: dt.date, level: int) -> str:  # TOML's dates and times
        return f"a date ({x.isoformat()})"

    def repr_time(self, x: dt.time, level: int) -> str:
        return f"a time ({x.isoformat()})"

    def repr_datetime(self, x: dt.datetime, level: int) -> str:
        return f"a datetime ({x.isoformat()})"


_REPR = _Repr()
_REPR.maxstring = 100
_REPR.maxother = 100
_REPR.maxlong = 40
_REPR.maxlevel = 3


def short(value: object) -> str:
    """A value as shown in a message: repr, but short (huge strings, deep nesting)."""
    return _REPR.repr(value)


def _escape(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def key_text(key: str) -> str:
    """A key as TOML would write it: bare, or quoted with anything unprintable escaped."""
    if _BARE_KEY_RE.match(key):
        return key
    if len(key) > 64:
        key = key[:60] + "..."
    return '"' + _escape(key).replace('"', '\\"') + '"'


def one_line(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A message safe to print as one line: no line breaks or control characters, bounded."""
    text = _escape(message)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_error(problems: list[str]) -> ConfigError:
    return ConfigError([one_line(p) for p in problems])


MISSING: Final[Any] = object()  # a key that is not there


def type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


class Table:
    """One TOML table being read; collects problems instead of raising."""

    def __init__(self, data: object, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        self._first = len(problems)  # the problems of its keys come after it is made
        self.ok = isinstance(data, dict)
        if not self.ok:
            problems.append(f"{path}: must be a table, not {type_name(data)}")
        self.data: dict[str, Any] = dict(data) if isinstance(data, dict) else {}
        self.used: set[str] = set()

    def key_path(self, key: str) -> str:
        key = key_text(key)
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> None:
        if self.ok:  # in what is not a table, that is the one problem: nothing else is judged
            self.problems.append(f"{self.key_path(key)}: {message}")

    def failed(self, key: str) -> bool:
        """Whether `key` (or anything in it) has a problem of its own: a check that depends on
        its value is then skipped (it would only judge the default that stands in for it)."""
        where = self.key_path(key)
        return any(p.startswith(where) and p[len(where):len(where) + 1] in (":", ".", "[")
                   for p in self.problems[self._first:])

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key, MISSING)

    def finish(self) -> None:
        for key in self.data:
            if key not in self.used:
                self.problems.append(f"{self.key_path(key)}: unknown key")

    def string(
        self,
        key: str,
        default: Any = MISSING,
        choices: tuple[str, ...] | None = None,
        allow_empty: bool = False,
    ) -> Any:
        value = self.raw(key)
        if value is MISSING:
            if default is MISSING:
                self.error(key, "required key is missing")
            return default
        if not isinstance(value, str):
            self.error(key, f"must be a string, not {type_name(value)}")
            return default
        if "\x00" in value:
            self.error(key, "must not contain NUL characters")
            return default
        if choices is not None and value not in choices:
            self.error(key, f"must be one of {', '.join(choices)} (got {short(value)})")
            return default
        if not value and not allow_empty:
            self.error(key, "must not be empty")
            return default
        return value

    def number(
        self,
        key: str,
        default: Any = MISSING,
        *,
        integer: bool = False,
        minimum: float | None = None,
        above: float | None = None,
        maximum: float | None = None,
    ) -> Any:
        value = self.raw(key)
        if value is MISSING:
            if default is MISSING:
                self.error(key, "required key is missing")
            return default
        kind = "an integer" if integer else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.error(key, f"must be {kind}, not {type_name(value)}")
            return default
        if integer and not isinstance(value, int):
            self.error(key, f"must be an integer, not {short(value)}")
            return default
        if isinstance(value, float) and not math.isfinite(value):
            self.error(key, f"must be a finite number, not {short(value)}")
            return default
        if above is not None and not value > above:
            self.error(key, f"must be > {above:g} (got {short(value)})")
            return default
        if minimum is not None and value < minimum:
            self.error(key, f"must be >= {minimum:g} (got {short(value)})")
            return default
        if maximum is not None and value > maximum:
            self.error(key, f"must be <= {maximum:g} (got {short(value)})")
            return default
        if not integer and not -_FLOAT_MAX <= value <= _FLOAT_MAX:  # an integer no float holds
            self.error(key, f"is too large for a number (got {short(value)})")
            return default
        return value if integer else float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is MISSING:
            return default
        if not isinstance(value, bool):
            self.error(key, f"must be true or false, not {type_name(value)}")
            return default
        return value

    def string_list(self, key: str, default: Any = MISSING, allow_empty: bool = True) -> Any:
        value = self.raw(key)
        if value is MISSING:
            if default is MISSING:
                self.error(key, "required key is missing")
            return default
        if not isinstance(value, list):
            self.error(key, f"must be an array of strings, not {type_name(value)}")
            return default
        good = True
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.problems.append(
                    f"{self.key_path(key)}[{i}]: must be a string, not {type_name(item)}"
                )
                good = False
            elif "\x00" in item:
                self.problems.append(
                    f"{self.key_path(key)}[{i}]: must not contain NUL characters")
                good = False
        if good and not value and not allow_empty:
            self.error(key, "must not be empty")
            return default
        return tuple(value) if good else default

    def table(self, key: str) -> Table | None:
        value = self.raw(key)
        if value is MISSING:
            return None
        return Table(value, self.key_path(key), self.problems)

    def array_of_tables(self, key: str) -> Iterator[Table]:
        value = self.raw(key)
        if value is MISSING:
            return
        if not isinstance(value, list):
            self.error(key, f"must be an array of tables ([[{key}]]), not {type_name(value)}")
            return
        for i, item in enumerate(value):
            yield Table(item, f"{self.key_path(key)}[{i}]", self.problems)


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR,
                       "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _refuse(p: str, mode: int, what: str) -> ConfigError:
    if stat.S_ISDIR(mode):
        return config_error([f"{p}: is a directory, not a {what} file"])
    return config_error([f"{p}: is {file_kind(mode)}, not a regular file: a {what} file "
                         "must be a regular file"])


def _too_large(p: str, what: str, limit: int = MAX_CONFIG_BYTES) -> ConfigError:
    return config_error([f"{p}: larger than {limit // (1024 * 1024)} MB ({limit} bytes), the "
                         f"limit for a {what} file"])


def read_config_file(path: str | os.PathLike[str], what: str = "config",
                     limit: int = MAX_CONFIG_BYTES,
                     check: Callable[[os.stat_result], None] | None = None) -> bytes:
    """The bytes of a config file (or another file the daemon reads at start, `what`): a
    regular file of at most MAX_CONFIG_BYTES. Never blocks on a FIFO or a device and never
    reads more than the limit; raises ConfigError."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(p, st.st_mode, what)
        if st.st_size > limit:
            raise _too_large(p, what, limit)
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise config_error([f"{p}: no such file"]) from None
    except PermissionError:
        raise config_error([f"{p}: permission denied"]) from None
    except OSError as exc:
        raise config_error([f"{p}: cannot read: {exc.strerror or exc}"]) from None
    try:
        st = os.fstat(fd)  # what was opened, not what the path named a moment ago
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(p, st.st_mode, what)
        if check is not None:
            check(st)
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise config_error([f"{p}: cannot read: {exc.strerror or exc}"]) from None
    finally:
        os.close(fd)
    if size > limit:
        raise _too_large(p, what, limit)
    return b"".join(chunks)


def text_of(data: bytes, path: str) -> str:
    """A file's bytes as text: UTF-8, a leading byte order mark dropped; ConfigError naming the
    line of the first byte that is not UTF-8."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise config_error([f"{path}: line {line}: not valid UTF-8"]) from None


# An integer of more digits than Python converts (sys.get_int_max_str_digits(), 4300 by
# default): tomllib raises a bare ValueError without a position. The decimal integers outside
# comments and strings are found here, each too long one is put back as a marker, and the
# document is parsed again to learn the key each one is the value of.
_TOML_TOKEN_RE: Final = re.compile(
    r'(?P<skip>#[^\n]*|"""(?:\\.|[^\\])*?"""|\'\'\'.*?\'\'\'|"(?:\\.|[^"\\\n])*"|\'[^\'\n]*\')'
    r"|(?<![\w.+-])(?P<int>[+-]?[0-9](?:_?[0-9])*)(?![\w.:+-]|[ \t]*=)",
    re.DOTALL,
)


def _key_paths(node: object, path: str, wanted: dict[int, int]) -> Iterator[tuple[int, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _key_paths(value, f"{path}.{key_text(key)}" if path else key_text(key),
                                  wanted)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _key_paths(value, f"{path}[{i}]", wanted)
    elif type(node) is int and node in wanted:
        yield wanted[node], path


def long_integers(text: str, where: str, exc: ValueError) -> list[str]:
    """Problems for the integers in TOML `text` too long to read, each named by its key's path
    and line (what tomllib's ValueError `exc` says, when none is found)."""
    import tomllib

    limit = sys.get_int_max_str_digits()
    found: list[tuple[int, int, int, int]] = []  # (start, end, digits, line)
    for m in _TOML_TOKEN_RE.finditer(text):
        token = m.group("int")
        if token is None:
            continue
        digits = sum(c.isdigit() for c in token)
        if limit and digits > limit:
            found.append((m.start(), m.end(), digits, text.count("\n", 0, m.start()) + 1))
    if not found:
        return [f"{where}: cannot be read: {exc}"]
    marker = 7 * 10**30  # values no key of this document holds
    while any(str(marker + i) in text for i in range(len(found))):
        marker += 10**29
    wanted = {marker + i: i for i in range(len(found))}
    parts, last = [], 0
    for i, (start, end, _digits, _line) in enumerate(found):
        parts += [text[last:start], str(marker + i)]
        last = end
    paths: dict[int, str] = {}
    # a syntax error further on (or nesting too deep): the line is all there is to say
    with contextlib.suppress(ValueError, RecursionError):
        paths = dict(_key_paths(tomllib.loads("".join(parts) + text[last:]), "", wanted))
    return [f"{paths.get(i, where)}: line {line}: an integer of {digits} digits is too large "
            f"(at most {limit} digits)"
            for i, (_s, _e, digits, line) in enumerate(found)]
