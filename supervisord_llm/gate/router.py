"""The router: one OpenAI endpoint in front of every service's gate.

A POST is routed by the `model` of its JSON body: the body is read only as far as it takes to
find the top-level `model` key (at most `max_body_bytes`), then the request, unchanged, goes
to the gate of the service that serves that model, on this same loop, with the bytes read so
far put back in front of the rest of the body (which streams). Everything a gate does (drain,
admission, the backup, hot swap, thermal pause, the power-down, models on demand) applies as
if the client had come to the gate itself. `GET /v1/models` lists every model with its
service and state; `GET /health` answers while the router runs.

Runs on the gate loop (`GateHost`); the supervisor pushes the catalogue (`set_catalog`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote_to_bytes

from .. import http1
from ..config import RouterSection
from ..logs import LogLimiter
from .proxy import Gate
from .server import BODY_BUFFER, BodyTimeout, ClientConnection, ClientGone, Request, ResponseWriter

# the bytes held by all requests whose model is being looked for, together: beyond it a
# request gets 503 (a flood of huge bodies costs a bounded amount of memory)
HELD_MAX: Final = 256 * 1024 * 1024  # counted twice over: a copy is made along the way
SMALL_BODY: Final = 4096  # a whole body this small is parsed by json (C) instead of scanned
MODEL_MAX: Final = 256
_WS: Final = re.compile(rb"[ \t\r\n]*")
_SCALAR: Final = re.compile(rb"[^ \t\r\n{}\[\]:,\"]+")
_MODELS_PATHS: Final = (b"/v1/models", b"/models")
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
KEY_MAX: Final = 64  # a top-level key longer than this (quotes included) is not `model`


class BadBody(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message


def _string_end(buf: bytes | bytearray, start: int, resume: int) -> int | None:
    """The index after the closing quote of the JSON string opening at `start`, looking from
    `resume` on; None if it is not in `buf` yet."""
    i = resume
    while True:
        j = buf.find(b'"', i)
        if j < 0:
            return None
        k, n = j - 1, 0
        while k > start and buf[k] == 0x5C:  # backslashes right before it
            n += 1
            k -= 1
        if n % 2 == 0:
            return j + 1
        i = j + 1


class ModelScan:
    """Finds the top-level `model` of a JSON object as its bytes arrive, without parsing the
    rest: strings are skipped with `find`, only the structure is followed. `feed(buf)` takes
    the whole buffer so far (it grows); returns the model, or None when more is needed;
    raises BadBody when the body is not a JSON object or its `model` is not a string."""

    __slots__ = ("_depth", "_expect_key", "_key", "_pos", "_resume", "_started")

    def __init__(self) -> None:
        self._pos = 0
        self._depth = 0
        self._started = False
        self._expect_key = False  # at depth 1, after `{` or `,`
        self._key: bytes | None = None  # the top-level key whose value comes next
        self._resume = 0  # inside an unfinished string: where to look for its end

    def feed(self, buf: bytes | bytearray) -> str | None:
        pos, n = self._pos, len(buf)
        while True:
            pos = _WS.match(buf, pos).end()  # type: ignore[union-attr]
            if pos >= n:
                break
            c = buf[pos]
            if not self._started:
                if c != 0x7B:  # {
                    raise BadBody(400, "invalid_body", "the request body must be a JSON object "
                                  "with a `model`")
                self._started = True
                self._depth = 1
                self._expect_key = True
                pos += 1
                continue
            if c == 0x22:  # "
                end = _string_end(buf, pos, max(pos + 1, self._resume))
                if end is None:
                    self._resume = n
                    break
                self._resume = 0
                start, pos = pos, end
                if self._depth != 1:
                    continue  # a string inside a value: skipped, never copied
                if self._expect_key:
                    # only a short key can be `model` (escaped, at most 32 bytes)
                    self._key = bytes(buf[start:end]) if end - start <= KEY_MAX else b"-"
                    self._expect_key = False
                elif self._key is not None:
                    if self._is_model(self._key):
                        if end - start > 4 * MODEL_MAX + 2:
                            raise BadBody(400, "invalid_model", f"`model` is longer than "
                                          f"{MODEL_MAX} characters")
                        return self._model(bytes(buf[start:end]))
                    self._key = None
                continue
            if c in (0x7B, 0x5B):  # { [
                if self._depth == 1 and self._key is not None and self._is_model(self._key):
                    raise BadBody(400, "invalid_model", "`model` must be a string")
                self._depth += 1
                self._key = None
            elif c in (0x7D, 0x5D):  # } ]
                self._depth -= 1
                if self._depth == 0:
                    raise BadBody(400, "missing_model", "the request body has no `model`")
            elif c == 0x2C:  # ,
                if self._depth == 1:
                    self._expect_key = True
                    self._key = None
            elif c == 0x3A:  # :
                pass
            else:
                m = _SCALAR.match(buf, pos)
                if m is None:
                    raise BadBody(400, "invalid_body", "the request body is not valid JSON")
                if m.end() >= n:
                    break  # it may go on in the next bytes
                if self._depth == 1 and self._key is not None and self._is_model(self._key):
                    raise BadBody(400, "invalid_model", "`model` must be a string")
                self._key = None
                pos = m.end()
                continue
            pos += 1
        self._pos = pos
        return None

    @staticmethod
    def _is_model(key: bytes) -> bool:
        if key == b'"model"':
            return True
        if b"\\" not in key:
            return False
        try:
            return bool(json.loads(key) == "model")
        except ValueError:
            return False

    @staticmethod
    def _model(token: bytes) -> str:
        try:
            value = json.loads(token)
        except ValueError:
            raise BadBody(400, "invalid_body", "the request body is not valid JSON") from None
        if not isinstance(value, str) or not value:
            raise BadBody(400, "invalid_model", "`model` must be a non-empty string")
        return value


def _first_model(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json's object hook that keeps the first `model` of an object (as the scan does)."""
    doc: dict[str, object] = {}
    for key, value in pairs:
        if key != "model" or key not in doc:
            doc[key] = value
    return doc


def model_of_small(body: bytes) -> str:
    """The `model` of a whole, small body (json, in C): with `model` twice, the first, as
    the scan of a larger body finds it."""
    try:
        if body.count(b"model") > 1:  # rare: only then the slower, pair-by-pair parse
            doc = json.loads(body, object_pairs_hook=_first_model)
        else:
            doc = json.loads(body)
    except (ValueError, RecursionError):
        raise BadBody(400, "invalid_body", "the request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadBody(400, "invalid_body", "the request body must be a JSON object with a "
                      "`model`")
    if "model" not in doc:
        raise BadBody(400, "missing_model", "the request body has no `model`")
    value = doc["model"]
    if not isinstance(value, str) or not value:
        raise BadBody(400, "invalid_model", "`model` must be a non-empty string")
    if len(value) > MODEL_MAX:
        raise BadBody(400, "invalid_model", f"`model` is longer than {MODEL_MAX} characters")
    return value


@dataclass
class RouterStats:
    """The router's own answers (not forwarded), by reason."""

    rejected: dict[str, int] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)  # its own answers, by status

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


class Router:
    """The `Handler` of the router's listener."""

    name = "router"

    def __init__(self, cfg: RouterSection, gates: dict[str, Gate],
                 limiter: LogLimiter | None = None) -> None:
        self.cfg = cfg
        self.gates = gates  # the GateHost's, by service name (read at each request)
        self.limiter = limiter or LogLimiter(__name__)
        self.routes: dict[str, str] = {}  # model -> service
        self.listing = b'{"object": "list", "data": []}'
        self.entries: dict[str, bytes] = {}  # model -> its /v1/models entry
        self.stats = RouterStats()
        self.held = 0  # bytes held by requests whose model is being looked for

    def set_catalog(self, routes: dict[str, str], entries: list[dict[str, object]]) -> None:
        """The models and where they go (from the supervisor, on this loop)."""
        self.routes = routes
        self.entries = {str(e["id"]): json.dumps(e).encode() for e in entries}
        self.listing = json.dumps({"object": "list", "data": entries}).encode()

    def reconfigure(self, cfg: RouterSection) -> None:
        self.cfg = cfg

    def count(self, code: int) -> None:
        key = str(code)
        self.stats.requests[key] = self.stats.requests.get(key, 0) + 1

    # --- a request ------------------------------------------------------------------------

    async def handle(self, req: Request, conn: ClientConnection) -> bool:
        if req.method != b"POST":
            writer = ResponseWriter(conn, req)
            if req.method in (b"GET", b"HEAD"):
                return self._get(writer, req.target.split(b"?", 1)[0])
            return self._own(writer, 405, "method_not_allowed", "the router takes POST "
                             "requests with a JSON `model`, and GET /v1/models",
                             [(b"Allow", b"GET, HEAD, POST")])
        body = req.body
        if req.expect_continue and not body.complete:
            conn.write(_CONTINUE)  # the client waits for it before it sends the body
            req.expect_continue = False  # sent: the gate must not send another
        try:
            if body.complete and 0 < body.buffered <= SMALL_BODY:
                # the common case: a small body, all here (json, in C)
                held = body.take()
                model = model_of_small(held)
            else:
                model, held = await self._find_model(req)
        except BadBody as exc:
            return self._own(ResponseWriter(conn, req), exc.status, exc.code, exc.message)
        except BodyTimeout as exc:
            self._own(ResponseWriter(conn, req), 408, "request_timeout", str(exc))
            return False
        except ClientGone:
            self.count(499)
            return False
        service = self.routes.get(model)
        gate = self.gates.get(service) if service is not None else None
        if gate is None:
            writer = ResponseWriter(conn, req)
            if service is None:
                known = ", ".join(sorted(self.routes)) or "none"
                shown = model if len(model) <= 80 else model[:80] + "..."
                return self._own(writer, 404, "model_not_found",
                                 f"the model {json.dumps(shown)} does not exist; known "
                                 f"models: {known}")
            return self._own(writer, 503, "service_unavailable",
                             f"{service} (serving {model}) is being removed; retry shortly",
                             [(b"Retry-After", b"5")])
        req.body.unread(held)
        return await gate.handle(req, conn, model)

    async def _find_model(self, req: Request) -> tuple[str, bytes]:
        """Read the body until its `model` is known; the bytes read, to be put back."""
        body = req.body
        timeout = self.cfg.body_timeout_s
        if body.complete and not body.buffered:
            raise BadBody(400, "missing_model", "the request has no body; the router routes "
                          "by the `model` of a JSON body")
        buf = bytearray()
        scan = ModelScan()
        limit = self.cfg.max_body_bytes
        first = True
        try:
            while True:
                await body.fill(BODY_BUFFER, timeout)
                data = body.take()
                # what this request holds: the bytes read, and as much again for a moment
                # (the buffer grows by copying, and is copied once more to be put back)
                if self.held + 2 * len(data) > HELD_MAX:
                    raise BadBody(503, "router_busy", "the router holds too many large "
                                  "request bodies now; retry shortly")
                self.held += 2 * len(data)
                buf += data
                del data
                if body.complete and not buf:
                    raise BadBody(400, "missing_model", "the request body is empty")
                if first and body.complete and len(buf) <= SMALL_BODY:
                    return model_of_small(bytes(buf)), bytes(buf)
                first = False
                model = scan.feed(buf)
                if model is not None:
                    if len(model) > MODEL_MAX:
                        raise BadBody(400, "invalid_model", f"`model` is longer than "
                                      f"{MODEL_MAX} characters")
                    return model, bytes(buf)
                if body.complete:
                    raise BadBody(400, "missing_model", "the request body has no `model` "
                                  "(or is not complete JSON)")
                if len(buf) >= limit:
                    raise BadBody(413, "model_not_found_in_body",
                                  f"no `model` in the first {limit} bytes of the body; put "
                                  "`model` first, or raise router.max_body_bytes")
        finally:
            self.held -= 2 * len(buf)

    def _get(self, writer: ResponseWriter, path: bytes) -> bool:
        if path in _MODELS_PATHS:
            self.count(200)
            writer.simple(200, self.listing)
            return writer.keep_alive
        for prefix in _MODELS_PATHS:
            if path.startswith(prefix + b"/"):
                name = unquote_to_bytes(path[len(prefix) + 1:]).decode("utf-8", "replace")
                entry = self.entries.get(name)
                if entry is None:
                    return self._own(writer, 404, "model_not_found",
                                     "no such model; GET /v1/models lists them")
                self.count(200)
                writer.simple(200, entry)
                return writer.keep_alive
        if path in (b"/health", b"/healthz"):
            self.count(200)
            writer.simple(200, b'{"status": "ok"}')
            return writer.keep_alive
        return self._own(writer, 404, "not_found", "the router serves GET /v1/models and "
                         "POST requests with a JSON `model` (/v1/chat/completions, "
                         "/v1/completions, /v1/embeddings, ...)")

    def _own(self, writer: ResponseWriter, status: int, code: str, message: str,
             headers: http1.Headers | None = None) -> bool:
        """An answer of the router's own (nothing forwarded)."""
        self.count(status)
        if status >= 400:
            self.stats.reject(code)
        kind = "invalid_request_error" if status < 500 else "service_unavailable"
        writer.simple(status, http1.error_body(message, kind, code), headers)
        return writer.keep_alive and writer.req.body.complete

