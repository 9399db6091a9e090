"""The control protocol: newline-delimited JSON over a Unix stream socket.

Request `{"v": 1, "id": 7, "cmd": "status", "args": {}}`; reply
`{"v": 1, "id": 7, "ok": true, "data": {...}}` or
`{"v": 1, "id": 7, "ok": false, "error": {"code": "...", "message": "..."}}`.
Imported by both the daemon and llmctl; standard library only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Final

VERSION: Final = 1
MAX_MESSAGE: Final = 64 * 1024

COMMANDS: Final = frozenset({
    "status", "start", "stop", "restart", "reset", "reload", "drain", "resume", "swap",
    "checkpoint", "power-event", "handover", "key-new", "key-revoke", "key-rotate", "key-list",
})
MUTATING: Final = COMMANDS - {"status"}
MAX_TIMEOUT_S: Final = 86400.0
POWER_EVENTS: Final = ("on-battery", "on-line", "low-battery", "fsd")

# The arguments each command takes; anything else is a bad_request, before anything is done.
ARGS: Final[dict[str, frozenset[str]]] = {
    "status": frozenset({"service"}),
    "start": frozenset({"services", "all"}),
    "stop": frozenset({"services", "all", "wait", "timeout_s"}),
    "restart": frozenset({"services", "all", "wait", "timeout_s"}),
    "reset": frozenset({"services", "all"}),
    "drain": frozenset({"services", "all", "timeout_s"}),
    "resume": frozenset({"services", "all"}),
    "swap": frozenset({"service", "timeout_s"}),
    "reload": frozenset(),
    "checkpoint": frozenset({"name"}),
    "power-event": frozenset({"event", "force"}),
    "handover": frozenset(),
    "key-new": frozenset({"id", "models", "rpm", "tpm", "concurrency", "expires"}),
    "key-revoke": frozenset({"id"}),
    "key-rotate": frozenset({"id", "overlap_s"}),
    "key-list": frozenset(),
}
KEY_ID_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz" "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                "0123456789_.@-")
MAX_OVERLAP_S: Final = 365 * 86400.0

# error codes
BAD_REQUEST: Final = "bad_request"
UNKNOWN_COMMAND: Final = "unknown_command"
UNKNOWN_SERVICE: Final = "unknown_service"
PERMISSION_DENIED: Final = "permission_denied"
TIMEOUT: Final = "timeout"
FAILED: Final = "failed"
CONFIG_ERROR: Final = "config_error"
UNSUPPORTED: Final = "unsupported"
INTERNAL: Final = "internal"
BUSY: Final = "busy"  # too many control connections at once; nothing was done


@dataclass(frozen=True)
class Request:
    id: int | str | None
    cmd: str
    args: dict[str, Any]


class ProtocolError(Exception):
    def __init__(self, message: str, req_id: int | str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.req_id = req_id


@dataclass(frozen=True)
class Args:
    """A command's arguments, checked: types, ranges, and no key the command does not take."""

    services: tuple[str, ...] = ()
    all: bool = False
    wait: bool = True
    timeout_s: float | None = None  # None: the command's own default
    service: str | None = None
    event: str | None = None
    force: bool = False  # power-event on-line: the operator's override
    name: str | None = None  # checkpoint: the one hook to run
    key_id: str | None = None  # key-*: the key's id
    models: tuple[str, ...] = ("*",)  # key-new
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    expires: str | None = None  # key-new: a date-time, a date or a duration (the daemon's)
    overlap_s: float = 3600.0  # key-rotate: how long the old secret stays valid


def _short(value: object) -> str:
    """A JSON value as shown in an error message, bounded."""
    try:
        text = json.dumps(value)
    except (ValueError, TypeError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _name(value: object, key: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 256:
        raise ProtocolError(f"args.{key} must be a service name, not {_short(value)}")
    return value


def parse_args(cmd: str, args: dict[str, Any]) -> Args:
    """Check every argument of `cmd` (a known command); raises ProtocolError naming the first
    problem. Nothing has been done when this raises."""
    allowed = ARGS.get(cmd, frozenset())
    unknown = sorted(set(args) - allowed)
    if unknown:
        takes = ", ".join(sorted(allowed)) or "no arguments"
        names = ", ".join(k if k.isidentifier() else _short(k) for k in unknown[:10])
        raise ProtocolError(f"unknown args for {cmd}: {names} "
                            f"({cmd} takes {takes})")
    out: dict[str, Any] = {}
    for key in ("all", "wait"):
        if key in args:
            value = args[key]
            if not isinstance(value, bool):
                raise ProtocolError(f"args.{key} must be true or false, not {_short(value)}")
            out[key] = value
    if "timeout_s" in args and args["timeout_s"] is not None:
        value = args["timeout_s"]
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT_S):
            raise ProtocolError(f"args.timeout_s must be a number of seconds in "
                                f"(0, {MAX_TIMEOUT_S:g}], not {_short(value)}")
        out["timeout_s"] = float(value)
    if "service" in args:
        value = args["service"]
        if value is not None or cmd == "swap":
            out["service"] = _name(value, "service")
    elif cmd == "swap":
        raise ProtocolError("args.service is required: the service to swap")
    if "services" in args:
        raw = args["services"]
        if not isinstance(raw, list):
            raise ProtocolError(f"args.services must be a list of service names, not "
                                f"{_short(raw)}")
        out["services"] = tuple(dict.fromkeys(_name(v, "services[]") for v in raw))
    if "services" in ARGS.get(cmd, ()):
        if out.get("all") and out.get("services"):
            raise ProtocolError("give service names or all, not both")
        if not out.get("all") and not out.get("services"):
            raise ProtocolError("name at least one service (or all: true)")
    if cmd == "power-event":
        value = args.get("event")
        if value not in POWER_EVENTS:
            raise ProtocolError(f"args.event must be one of {', '.join(POWER_EVENTS)}, not "
                                f"{_short(value)}")
        out["event"] = value
        force = args.get("force", False)
        if not isinstance(force, bool):
            raise ProtocolError(f"args.force must be true or false, not {_short(force)}")
        if force and value != "on-line":
            raise ProtocolError("args.force goes with the on-line event only (the operator "
                                "says the power is back)")
        out["force"] = force
    if cmd.startswith("key-") and cmd != "key-list":
        _key_args(cmd, args, out)
    if cmd == "checkpoint" and args.get("name") is not None:
        value = args["name"]
        if not isinstance(value, str) or not value or len(value) > 256:
            raise ProtocolError(f"args.name must be a checkpoint name, not {_short(value)}")
        out["name"] = value
    return Args(**out)


def _key_args(cmd: str, args: dict[str, Any], out: dict[str, Any]) -> None:
    value = args.get("id")
    if not isinstance(value, str) or not 0 < len(value) <= 64 \
            or not set(value) <= KEY_ID_CHARS or not value[0].isalnum():
        raise ProtocolError(f"args.id must be a key id (1-64 letters, digits, '_', '.', '@', "
                            f"'-', from a letter or digit), not {_short(value)}")
    out["key_id"] = value
    if "models" in args:
        raw = args["models"]
        if not isinstance(raw, list) or not raw or len(raw) > 1000 or not all(
                isinstance(m, str) and 0 < len(m) <= 256 and m.isprintable() for m in raw):
            raise ProtocolError(f"args.models must be a list of model names (1-256 printable "
                                f"characters; or [\"*\"]), not {_short(raw)}")
        out["models"] = tuple(dict.fromkeys(raw))
    for key in ("rpm", "tpm", "concurrency"):
        if args.get(key) is not None:
            value = args[key]
            top = 1_000_000 if key == "rpm" else 1_000_000_000
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not 0 < value <= top:
                raise ProtocolError(f"args.{key} must be a whole number from 1 to {top}, not "
                                    f"{_short(value)}")
            out[key] = value
    if args.get("expires") is not None:
        value = args["expires"]
        if not isinstance(value, str) or not 0 < len(value) <= 64:
            raise ProtocolError(f"args.expires must be a date-time, a date or a duration, not "
                                f"{_short(value)}")
        out["expires"] = value
    if "overlap_s" in args:
        value = args["overlap_s"]
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or not 0 <= value <= MAX_OVERLAP_S):
            raise ProtocolError(f"args.overlap_s must be a number of seconds in [0, "
                                f"{MAX_OVERLAP_S:g}], not {_short(value)}")
        out["overlap_s"] = float(value)


def _valid_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    return value is None or (isinstance(value, str) and len(value) <= 256)


class _Duplicate(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON objects with a key given twice are refused (which `cmd` would win?)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def parse_request(line: bytes) -> Request:
    """Decode one request line; raises ProtocolError (-> `bad_request`) on anything wrong."""
    try:
        doc = json.loads(line, object_pairs_hook=_no_duplicates)
    except _Duplicate as exc:
        raise ProtocolError(f"key {_short(exc.key)} given twice in one object") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("not valid JSON: send one JSON object per line") from None
    if not isinstance(doc, dict):
        raise ProtocolError("a request must be a JSON object")
    req_id = doc.get("id")
    if not _valid_id(req_id):
        raise ProtocolError("id must be an integer, a string or null")
    assert req_id is None or isinstance(req_id, (int, str))
    if doc.get("v") != VERSION:
        raise ProtocolError(f"unsupported protocol version {doc.get('v')!r} (this daemon "
                            f"speaks v={VERSION})", req_id)
    cmd = doc.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise ProtocolError("cmd must be a non-empty string", req_id)
    args = doc.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ProtocolError("args must be a JSON object", req_id)
    unknown = set(doc) - {"v", "id", "cmd", "args"}
    if unknown:
        raise ProtocolError(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}", req_id)
    return Request(req_id, cmd, args)


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False, default=str).encode() + b"\n"


def ok_reply(req_id: int | str | None, data: Any) -> bytes:
    return encode({"v": VERSION, "id": req_id, "ok": True, "data": data})


def error_reply(req_id: int | str | None, code: str, message: str) -> bytes:
    return encode({"v": VERSION, "id": req_id, "ok": False,
                   "error": {"code": code, "message": message}})


def request(cmd: str, args: dict[str, Any] | None = None, req_id: int = 1) -> bytes:
    return encode({"v": VERSION, "id": req_id, "cmd": cmd, "args": args or {}})
