"""Small JSON records in `state_dir` (power limits to restore, the power state): read without
trusting them, written atomically. Blocking: call them off the loop (`asyncio.to_thread`).

A record left by a crash, a full disk or a hand may be anything: missing, empty, truncated, a
directory, a FIFO (opening one for reading would block), a symlink, huge, not JSON, `NaN`. The
reader never blocks, never raises, and says what is wrong in words the log can carry.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Final

MAX_BYTES: Final = 1024 * 1024


class Damaged(Exception):
    """The record exists but cannot be trusted; the message says why."""


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number JSON allows")


def read_json(path: Path, max_bytes: int = MAX_BYTES) -> object | None:
    """The record's JSON value; None when there is no record; `Damaged` when there is one that
    cannot be read as JSON (not a regular file, too large, unreadable, empty, truncated)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: a symlink; EACCES; ENXIO: a FIFO with no writer, ...
        raise Damaged(f"cannot be opened: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Damaged(f"is not a regular file ({_kind(st.st_mode)})")
        if st.st_size > max_bytes:
            raise Damaged(f"is larger than {max_bytes} bytes ({st.st_size})")
        data = os.read(fd, max_bytes + 1)
    except OSError as exc:
        raise Damaged(f"cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if not data.strip():
        raise Damaged("is empty")
    try:
        doc: object = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise Damaged(f"is not valid JSON ({str(exc)[:120]})") from None
    return doc


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a file"


def write_json(path: Path, doc: object) -> None:
    """Write atomically (a temporary file beside it, fsynced, renamed over it). Raises OSError
    (with a directory in the way too: nothing the supervisor did not make is removed)."""
    text = json.dumps(doc, sort_keys=True, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
