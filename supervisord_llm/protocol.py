"""The control protocol: newline-delimited JSON over a Unix stream socket.

Request `{"v": 1, "id": 7, "cmd": "status", "args": {}}`; reply
`{"v": 1, "id": 7, "ok": true, "data": {...}}` or
`{"v": 1, "id": 7, "ok": false, "error": {"code": "...", "message": "..."}}`.
Imported by both the daemon and llmctl; standard library only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

VERSION: Final = 1
MAX_MESSAGE: Final = 64 * 1024

COMMANDS: Final = frozenset({
    "status", "start", "stop", "restart", "reset", "reload", "drain", "resume", "swap",
    "checkpoint", "power-event",
})
MUTATING: Final = COMMANDS - {"status"}

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


def _valid_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    return value is None or (isinstance(value, str) and len(value) <= 256)


def parse_request(line: bytes) -> Request:
    """Decode one request line; raises ProtocolError (-> `bad_request`) on anything wrong."""
    try:
        doc = json.loads(line)
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
