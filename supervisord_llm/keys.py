"""API keys: the keys file (`[auth] keys_file`), read, checked, changed and written.

The file is TOML, one `[[key]]` table per key:

    [[key]]
    id = "alice"                     # shown in logs, metrics, the audit log
    sha256 = "<64 hex>"              # SHA-256 of the secret; the secret is never stored
    models = ["*"]                   # or the model names it may use
    requests_per_minute = 60         # optional limits
    tokens_per_minute = 100000
    max_concurrency = 4
    expires = 2027-01-01T00:00:00Z   # optional
    previous_sha256 = "<64 hex>"     # a rotation: the old secret, valid until
    previous_until = 2026-12-08T12:00:00Z

A file with a problem is refused whole (every problem named by its key path); the keys in
force stay. `llmctl key ...` rewrites it atomically (`root:<control_group>`, 0640): comments
are not kept. Standard library only; file I/O blocks (the daemon calls it off its loop)."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from .config.reader import MISSING, Table, config_error, read_config_file, short, text_of
from .errors import ConfigError

ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_HEX_RE: Final = re.compile(r"^[0-9a-f]{64}$")
_DURATION_RE: Final = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?$")
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
MAX_KEYS: Final = 10_000
MAX_MODELS: Final = 1_000
MAX_LIMIT: Final = 1_000_000_000
MAX_RPM: Final = 1_000_000  # the front keeps the start time of each (8 bytes)
MAX_RPM_TOTAL: Final = 10_000_000  # all keys together: 80 MB at most
MAX_FILE_BYTES: Final = 4 * 1024 * 1024  # a keys file
# the keys as the front is told them (one message on its control socket, 4 MiB at most)
MAX_DOC_BYTES: Final = 3 * 1024 * 1024
SECRET_PREFIX: Final = "sk-llm-"  # noqa: S105 (the start of every secret made)


@dataclass(frozen=True)
class ApiKey:
    id: str
    sha256: str
    models: tuple[str, ...] = ("*",)
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrency: int | None = None
    expires: float | None = None  # epoch seconds
    previous_sha256: str | None = None
    previous_until: float | None = None  # epoch seconds

    def to_doc(self) -> dict[str, Any]:
        """What the front needs of it (never more than the hashes)."""
        return {"id": self.id, "sha256": self.sha256, "models": list(self.models),
                "rpm": self.requests_per_minute or 0, "tpm": self.tokens_per_minute or 0,
                "concurrency": self.max_concurrency or 0, "expires": self.expires or 0.0,
                "previous": self.previous_sha256, "previous_until": self.previous_until or 0.0}


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def _when(value: object) -> dt.datetime | None:
    """A TOML date-time with an offset, or a date (its start, UTC); None if neither."""
    if isinstance(value, dt.datetime):
        return value if value.tzinfo is not None else None
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
    return None


def _time(t: Table, key: str) -> float | None:
    value = t.raw(key)
    if value is MISSING:
        return None
    when = _when(value)
    if when is None:
        if isinstance(value, dt.datetime):
            t.error(key, f"give the time with its offset ({value.isoformat()}Z for UTC): a "
                    "time without one means another moment on each machine")
        else:
            t.error(key, "must be a date-time (2027-01-01T00:00:00Z) or a date (2027-01-01), "
                    f"not {short(value)}")
        return None
    return when.timestamp()


def _limit(t: Table, key: str, maximum: int = MAX_LIMIT) -> int | None:
    value = t.number(key, None, integer=True, minimum=1, maximum=maximum)
    return int(value) if value is not None else None


def _key(t: Table) -> ApiKey | None:
    key_id = t.string("id")
    if isinstance(key_id, str) and not ID_RE.match(key_id):
        t.error("id", f"must be 1-64 letters, digits, '_', '.', '@', '-' (got {short(key_id)})")
        key_id = None
    digest = t.string("sha256")
    if isinstance(digest, str) and not _HEX_RE.match(digest):
        t.error("sha256", "must be the SHA-256 of the secret, 64 lowercase hex digits "
                "(`printf %s SECRET | sha256sum`)")
        digest = None
    models = t.string_list("models", ("*",), allow_empty=False)
    if isinstance(models, tuple):
        if len(models) > MAX_MODELS:
            t.error("models", f"at most {MAX_MODELS} names")
        for i, name in enumerate(models):
            if not name or len(name) > 256 or not name.isprintable():
                t.problems.append(f"{t.key_path('models')}[{i}]: must be a model name (1-256 "
                                  "printable characters) or \"*\"")
    rpm = _limit(t, "requests_per_minute", MAX_RPM)
    tpm = _limit(t, "tokens_per_minute")
    conc = _limit(t, "max_concurrency")
    expires = _time(t, "expires")
    previous = t.string("previous_sha256", None)
    if isinstance(previous, str) and not _HEX_RE.match(previous):
        t.error("previous_sha256", "must be 64 lowercase hex digits")
        previous = None
    until = _time(t, "previous_until")
    if previous is not None and until is None and not t.failed("previous_until"):
        t.error("previous_until", "required with previous_sha256: until when the old secret "
                "stays valid")
    if until is not None and previous is None and not t.failed("previous_sha256"):
        t.error("previous_sha256", "previous_until is given without it")
    t.finish()
    if not isinstance(key_id, str) or not isinstance(digest, str) or not t.ok:
        return None
    return ApiKey(key_id, digest, tuple(models) if isinstance(models, tuple) else ("*",),
                  rpm, tpm, conc, expires, previous, until)


def parse_keys(text: str, where: str = "<keys>") -> tuple[ApiKey, ...]:
    """Every key of a keys file's text; ConfigError with every problem."""
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise config_error([f"{where}: TOML syntax error: {exc}"]) from None
    except (ValueError, RecursionError) as exc:
        raise config_error([f"{where}: cannot be read: {exc}"]) from None
    return build_keys(doc, where)


def build_keys(doc: Mapping[str, Any], where: str) -> tuple[ApiKey, ...]:
    problems: list[str] = []
    root = Table(dict(doc), "", problems)
    keys = [k for k in map(_key, root.array_of_tables("key")) if k is not None]
    root.finish()
    raw = doc.get("key")
    if isinstance(raw, list) and len(raw) > MAX_KEYS:
        problems.append(f"key: {len(raw)} keys, at most {MAX_KEYS}")
    ids: dict[str, int] = {}
    hashes: dict[str, str] = {}
    for i, k in enumerate(keys):
        if k.id in ids:
            problems.append(f"key[{i}].id: {short(k.id)} is already used by key[{ids[k.id]}]")
        ids.setdefault(k.id, i)
        for field, digest in (("sha256", k.sha256), ("previous_sha256", k.previous_sha256)):
            if digest is None:
                continue
            if digest in hashes:
                problems.append(f"key[{i}].{field}: the same secret as {hashes[digest]}")
            hashes.setdefault(digest, f"key[{i}] ({k.id})")
    total = sum(k.requests_per_minute or 0 for k in keys)
    if total > MAX_RPM_TOTAL:
        problems.append(f"key: the requests_per_minute of all keys add up to {total}, at most "
                        f"{MAX_RPM_TOTAL} (the front keeps 8 bytes per request of each limit)")
    if not problems and (size := doc_size(keys)) > MAX_DOC_BYTES:
        problems.append(f"key: the keys take {size} bytes as the front process is told them, "
                        f"at most {MAX_DOC_BYTES}: fewer keys, or shorter lists of models")
    if problems:
        raise config_error([f"{where}: {p}" for p in problems])
    return tuple(keys)


def doc_size(keys: tuple[ApiKey, ...] | list[ApiKey]) -> int:
    return len(json.dumps([k.to_doc() for k in keys]))


def load_keys(path: str) -> tuple[ApiKey, ...]:
    """The keys of the file at `path`; none if it does not exist yet (`llmctl key new`
    makes it). ConfigError for anything else wrong: the caller keeps the keys in force."""
    if not os.path.lexists(path):
        return ()
    def owner_and_mode(st: os.stat_result) -> None:  # (of the file read: fstat)
        if st.st_mode & 0o022:
            who = "others" if st.st_mode & 0o002 else "its group"
            raise config_error([f"{path}: writable by {who} ({st.st_mode & 0o777:o}): anyone "
                                "who can write it can add a key; chmod 640 it (llmctl key "
                                "writes it so)"])
        if st.st_uid not in (0, os.geteuid()):
            raise config_error([f"{path}: owned by uid {st.st_uid}, not root: whoever owns it "
                                "can add a key; chown root it"])

    data = read_config_file(path, "keys", MAX_FILE_BYTES, check=owner_and_mode)
    return parse_keys(text_of(data, path), path)


def _toml_time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def render_keys(keys: tuple[ApiKey, ...]) -> str:
    out = ["# llm-supervisor API keys: written by `llmctl key` (hand edits: then `llmctl "
           "reload`).", "# Each sha256 is the SHA-256 of a secret; the secrets are not kept.",
           ""]
    for k in keys:
        out.append("[[key]]")
        out.append(f"id = {json.dumps(k.id)}")
        out.append(f"sha256 = {json.dumps(k.sha256)}")
        out.append(f"models = [{', '.join(json.dumps(m) for m in k.models)}]")
        for name, value in (("requests_per_minute", k.requests_per_minute),
                            ("tokens_per_minute", k.tokens_per_minute),
                            ("max_concurrency", k.max_concurrency)):
            if value is not None:
                out.append(f"{name} = {value}")
        if k.expires is not None:
            out.append(f"expires = {_toml_time(k.expires)}")
        if k.previous_sha256 is not None and k.previous_until is not None:
            out.append(f"previous_sha256 = {json.dumps(k.previous_sha256)}")
            out.append(f"previous_until = {_toml_time(k.previous_until)}")
        out.append("")
    return "\n".join(out)


def write_keys(path: str, keys: tuple[ApiKey, ...], gid: int | None) -> None:
    """Replace the file atomically: a new file beside it (0640, root:`gid`), synced, renamed
    over it, the directory synced. OSError out; the old file stays whole."""
    text = render_keys(keys)
    try:
        parse_keys(text, path)  # never write what would be refused
    except ConfigError as exc:
        raise ValueError("the change would make a keys file that cannot be read back: "
                         + "; ".join(exc.problems[:3])) from None
    if len(text.encode()) > MAX_FILE_BYTES:
        raise ValueError(f"the keys file would be larger than {MAX_FILE_BYTES // 2**20} MB, "
                         "the most it may hold: revoke keys, or list fewer models")
    path = os.path.realpath(path)  # (a symlink to the file stays one)
    d = os.path.dirname(path)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    try:
        try:
            if gid is not None and os.geteuid() == 0:
                os.fchown(fd, 0, gid)
            os.fchmod(fd, 0o640)
            data = text.encode()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `12h`, `30d`, `2w` -> seconds; ValueError otherwise."""
    m = _DURATION_RE.match(text.strip().lower())
    if m is None:
        raise ValueError(f"not a duration: {text[:40]!r} (like 90s, 15m, 12h, 30d)")
    value = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if value > 100 * 365 * 86400:
        raise ValueError(f"too long: {text[:40]!r}")
    return value


def parse_expires(text: str, now: float) -> float:
    """`--expires`: a date-time with its offset, a date (its start, UTC), or a duration from
    now (`30d`); ValueError otherwise."""
    try:
        return now + parse_duration(text)
    except ValueError as exc:
        if "too long" in str(exc):
            raise ValueError(f"--expires: {text.strip()[:40]!r} is more than 100 years "
                             "away") from None
    raw = text.strip()
    try:
        when = dt.datetime.fromisoformat(raw.replace("z", "Z"))
        if len(raw) == 10:  # a date: its start, UTC
            when = when.replace(tzinfo=dt.UTC)
        if when.tzinfo is None:
            raise ValueError(f"--expires: give {raw[:40]!r} with its offset (Z for UTC)")
        ts = when.timestamp()
    except (ValueError, OverflowError) as exc:
        if "with its offset" in str(exc):
            raise
        raise ValueError(f"--expires: {raw[:40]!r} is not a date-time with its offset "
                         "(2027-01-01T00:00:00Z), a date (2027-01-01) or a duration "
                         "(30d)") from None
    if ts > now + 100 * 365 * 86400:
        raise ValueError(f"--expires: {raw[:40]!r} is more than 100 years away")
    return ts


# --- the changes llmctl asks for (pure: keys in, keys out) -------------------------------------


def add_key(keys: tuple[ApiKey, ...], key: ApiKey) -> tuple[ApiKey, ...]:
    if any(k.id == key.id for k in keys):
        raise ValueError(f"key {key.id!r} exists already: `llmctl key rotate {key.id}` gives "
                          "it a new secret, `llmctl key revoke` removes it")
    if len(keys) >= MAX_KEYS:
        raise ValueError(f"{MAX_KEYS} keys already, the most a keys file holds")
    return (*keys, key)


def revoke_key(keys: tuple[ApiKey, ...], key_id: str) -> tuple[ApiKey, ...]:
    left = tuple(k for k in keys if k.id != key_id)
    if len(left) == len(keys):
        raise ValueError(f"no key {key_id!r} (`llmctl key list` shows them)")
    return left


def rotate_key(keys: tuple[ApiKey, ...], key_id: str, digest: str, overlap_s: float,
               now: float) -> tuple[ApiKey, ...]:
    """The key's secret replaced; the old one stays valid `overlap_s` (0: not at all). A
    secret still in its overlap from an earlier rotation is replaced by this one's."""
    out = []
    found = False
    for k in keys:
        if k.id == key_id:
            found = True
            out.append(replace(k, sha256=digest,
                               previous_sha256=k.sha256 if overlap_s > 0 else None,
                               previous_until=now + overlap_s if overlap_s > 0 else None))
        else:
            out.append(k)
    if not found:
        raise ValueError(f"no key {key_id!r} (`llmctl key list` shows them)")
    return tuple(out)


def expired_rotations(keys: tuple[ApiKey, ...], now: float) -> tuple[ApiKey, ...]:
    """The keys without the old secrets whose overlap is over (kept tidy on each write)."""
    return tuple(replace(k, previous_sha256=None, previous_until=None)
                 if k.previous_until is not None and k.previous_until <= now else k
                 for k in keys)
