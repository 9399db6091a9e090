"""The router: one OpenAI endpoint in front of every service's gate.

A POST is routed by the `model` of its JSON body: the body is read only as far as it takes to
find the top-level `model` key (at most `max_body_bytes`), then the request, unchanged, goes
to the gate of the service that serves that model, on this same loop, with the bytes read so
far put back in front of the rest of the body (which streams, scanned on the way to the end
of the object: a body with `model` twice is refused, as servers read the last one).
Everything a gate does (drain, admission, the backup, hot swap, thermal pause, the
power-down, models on demand) applies as if the client had come to the gate itself.
`GET /v1/models` lists every model with its service and state; `GET /health` answers while
the router runs.

Runs on the gate loop (`GateHost`); the supervisor pushes the catalogue (`set_catalog`).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote_to_bytes

from .. import http1
from ..config import RouterSection
from ..logs import LogLimiter
from .door import Door, Key, Paths, Refusal, header_pairs
from .proxy import Gate, answer_refusal
from .server import (
    BODY_BUFFER,
    BodyRefused,
    BodyTimeout,
    ClientConnection,
    ClientGone,
    Request,
    ResponseWriter,
)

# the bytes held by all requests whose model is being looked for, together: beyond it a
# request gets 503 (a flood of huge bodies costs a bounded amount of memory)
HELD_MAX: Final = 256 * 1024 * 1024  # counted twice over: a copy is made along the way
SMALL_BODY: Final = 4096  # a whole body this small is parsed by json (C) instead of scanned
MODEL_MAX: Final = 256
# the longest MODEL_MAX characters can be written in JSON (each a \uXXXX\uXXXX pair): the
# scan keeps that much of a `model` string, decodes it, and counts characters, as json does
_MODEL_RAW_MAX: Final = 12 * MODEL_MAX
# The scan passes over most of a body in C, with possessive regexes (no backtracking): each
# stops where the bytes at hand end or where Python must look (a bracket that changes the
# depth, a top-level key that may be `model`, a string that goes on in the next read).
_WS: Final = re.compile(rb"[ \t\r\n]*+")
_SCALAR: Final = re.compile(rb"[^ \t\r\n{}\[\]:,\"]++")
# The inside of a string, up to its closing quote (exclusive). Fast: runs to each quote
# (`[^"]`, a memchr-like loop in sre), over those escaped by exactly one backslash, to one
# with no backslash before it (the end); exact, and several times slower per byte: escape by
# escape, where a quote follows a run of two or more backslashes. Both are exact where they
# match (a quote ends a string unless an odd run of backslashes is right before it).
_INSIDE_FAST = rb'(?:[^"]*+(?<=[^\\]\\)")*+[^"]*+(?<!\\)'
_INSIDE_EXACT = rb'[^"\\]*+(?:\\.[^"\\]*+)*+'
_STR = rb'"(?:' + _INSIDE_FAST + rb'"|' + _INSIDE_EXACT + rb'")'  # a whole string
_FLAT = rb'(?:[^"\[\]{}]++|' + _STR + rb")*+"  # values without brackets
_LEAF = rb"\[" + _FLAT + rb"\]|\{" + _FLAT + rb"\}"  # an array or object with no other inside
# inside a nested value: all but the brackets around non-leaf values
_NESTED: Final = re.compile(rb"(?:[^\"\[\]{}]++|" + _STR + rb"|" + _LEAF + rb")*+", re.DOTALL)
# at the top level, after `{` or `,`: members `"key": value,` whose key is plainly not `model`
# (no escapes) and whose value is a string, a scalar or a leaf
_MEMBERS: Final = re.compile(
    rb'(?:[ \t\r\n]*+"(?!model")[^"\\]*+"[ \t\r\n]*+:[ \t\r\n]*+(?:' + _STR
    + rb'|[^ \t\r\n{}\[\]:,"]++|' + _LEAF + rb")[ \t\r\n]*+,)*+", re.DOTALL)
# from inside a string: to its closing quote, or to the end of the bytes (the fast way, when
# they do not end with a backslash), or to a backslash that is the last byte (exact)
_IN_STRING: Final = re.compile(
    rb'(?:' + _INSIDE_FAST + rb'(?="|\Z)|' + _INSIDE_EXACT + rb")", re.DOTALL)
_MODELS_PATHS: Final = (b"/v1/models", b"/models")
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
KEY_MAX: Final = 64  # a top-level key longer than this (quotes included) is not `model`
_SKIP, _KEY, _VALUE = 1, 2, 3  # the string being read: passed over, a top-level key, the model


class BadBody(BodyRefused):
    """A body the router refuses (400 `invalid_body`, `missing_model`, `invalid_model`...)."""


def _twice() -> BadBody:
    return BadBody(400, "invalid_body", "the request body has more than one top-level "
                   "`model`; servers read the last one, the router would route by the first")


class ModelScan:
    """Follows a JSON object as its bytes arrive, chunk by chunk, without parsing it: strings
    are passed over (`find`, or one regex match in C inside nested values), only the top-level
    keys are read. `feed(chunk)` sets `model` once the top-level `model` is read and `done`
    at the end of the object; it raises BadBody when the body is not one JSON object, has no
    top-level `model`, a `model` that is not a non-empty string, or `model` twice (also
    written with escapes). Nothing is copied but a top-level key (KEY_MAX) or the model, so
    the scan holds a few hundred bytes whatever the body; each byte is looked at once."""

    __slots__ = ("_depth", "_escaped", "_expect_key", "_in", "_key_is_model", "_partial",
                 "done", "model")

    def __init__(self) -> None:
        self.model: str | None = None
        self.done = False  # the top-level object has ended
        self._depth = 0
        self._expect_key = False  # at depth 1, after `{` or `,`
        self._key_is_model = False  # at depth 1: the value that comes is the model's
        self._in = 0  # inside a string (_SKIP, _KEY, _VALUE) that goes on in the next chunk
        self._escaped = False  # ...and the last chunk ended with a backslash that escapes
        self._partial: bytearray | None = None  # the key or model read so far

    def feed(self, data: bytes) -> None:
        n = len(data)
        pos = 0
        if self._in:
            pos = self._string(data, 0)
            if pos < 0:
                return
        while True:
            if self._depth > 1:
                pos = _NESTED.match(data, pos).end()  # type: ignore[union-attr]
            else:
                if self._expect_key:
                    pos = _MEMBERS.match(data, pos).end()  # type: ignore[union-attr]
                pos = _WS.match(data, pos).end()  # type: ignore[union-attr]
            if pos >= n:
                return
            c = data[pos]
            if self._depth == 0:
                if self.done:
                    raise BadBody(400, "invalid_body", "the request body goes on after its "
                                  "JSON object")
                if c != 0x7B:  # {
                    raise BadBody(400, "invalid_body", "the request body must be a JSON object "
                                  "with a `model`")
                self._depth = 1
                self._expect_key = True
            elif c == 0x22:  # "
                if self._depth > 1:
                    self._in = _SKIP
                elif self._expect_key:
                    self._in = _KEY
                    self._partial = bytearray()
                elif self._key_is_model:
                    self._in = _VALUE
                    self._partial = bytearray()
                else:
                    self._in = _SKIP
                pos = self._string(data, pos + 1)
                if pos < 0:
                    return
                continue
            elif c in (0x7B, 0x5B):  # { [
                if self._depth == 1 and self._key_is_model:
                    raise BadBody(400, "invalid_model", "`model` must be a string")
                self._depth += 1
            elif c in (0x7D, 0x5D):  # } ]
                self._depth -= 1
                if self._depth == 0:
                    if self.model is None:
                        raise BadBody(400, "missing_model", "the request body has no `model`")
                    self.done = True
                elif self._depth == 1:
                    self._key_is_model = False
            elif c == 0x2C:  # , (at depth 1: the regex passes over the others)
                self._expect_key = True
                self._key_is_model = False
            elif c != 0x3A:  # a number, true, false, null (or something invalid)
                if self._key_is_model:
                    raise BadBody(400, "invalid_model", "`model` must be a string")
                m = _SCALAR.match(data, pos)
                if m is None:
                    raise BadBody(400, "invalid_body", "the request body is not valid JSON")
                pos = m.end()  # it may go on in the next chunk: more of the same
                continue
            pos += 1

    def _string(self, data: bytes, pos: int) -> int:
        """Inside a string from `pos`: the index after its closing quote, or -1 if it goes on
        past `data` (then `_in` and `_escaped` say where the next chunk starts)."""
        n = len(data)
        i = pos
        if self._escaped:  # data[pos] is escaped by the backslash that ended the last chunk
            if pos >= n:
                return -1
            self._escaped = False
            i += 1
        # up to the closing quote, or to a backslash that is the last byte, or to the end
        end = _IN_STRING.match(data, i).end()  # type: ignore[union-attr]
        if end < n and data[end] == 0x22:
            self._keep(data, pos, end)
            self._string_read()
            return end + 1
        self._escaped = end < n  # the backslash at the end escapes the next chunk's first
        self._keep(data, pos, n)
        return -1

    def _keep(self, data: bytes, start: int, end: int) -> None:
        """Keep data[start:end] of a key or the model (bounded), nothing of other strings."""
        partial = self._partial
        if self._in == _SKIP or partial is None:
            return
        if len(partial) + end - start > (KEY_MAX - 2 if self._in == _KEY else _MODEL_RAW_MAX):
            if self._in == _VALUE:
                raise BadBody(400, "invalid_model", f"`model` is longer than {MODEL_MAX} "
                              "characters")
            self._partial = None  # too long to be `model`
            return
        partial += data[start:end]

    def _string_read(self) -> None:
        kind, self._in = self._in, 0
        partial, self._partial = self._partial, None
        if kind == _KEY:
            self._expect_key = False
            self._key_is_model = partial is not None and self._is_model(b'"%s"' % partial)
            if self._key_is_model and self.model is not None:
                raise _twice()
        elif kind == _VALUE:
            assert partial is not None
            self.model = self._model(b'"%s"' % partial)
            self._key_is_model = False

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
        if len(value) > MODEL_MAX:
            raise BadBody(400, "invalid_model", f"`model` is longer than {MODEL_MAX} "
                          "characters")
        return value


class _Twice(dict[str, object]):
    """An object that had `model` more than once (json's object hook makes it)."""


def _pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    doc = dict(pairs)
    if len(doc) < len(pairs) and sum(1 for key, _v in pairs if key == "model") > 1:
        return _Twice(doc)
    return doc


def model_of_small(body: bytes) -> str:
    """The `model` of a whole, small body (json, in C); `model` twice at the top level is
    refused, as the scan of a larger body refuses it."""
    try:
        if body.count(b"model") > 1 or b"\\u" in body:
            # rare: `model` twice, or a key that may be `model` written with escapes: only
            # then the slower parse that sees every key of every object
            doc = json.loads(body, object_pairs_hook=_pairs)
        else:
            doc = json.loads(body)
    except (ValueError, RecursionError):
        raise BadBody(400, "invalid_body", "the request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadBody(400, "invalid_body", "the request body must be a JSON object with a "
                      "`model`")
    if isinstance(doc, _Twice):  # the top-level object: the hook makes it last
        raise _twice()
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
                 limiter: LogLimiter | None = None, door: Door | None = None) -> None:
        self.cfg = cfg
        self.door = door if door is not None else Door()
        self.paths = Paths(cfg.allow_paths)
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
        served: dict[str, list[str]] = {}
        for model, service in routes.items():
            served.setdefault(service, []).append(model)
        self.door.served = {k: tuple(v) for k, v in served.items()}

    def reconfigure(self, cfg: RouterSection) -> None:
        if cfg.allow_paths != self.cfg.allow_paths:
            self.paths = Paths(cfg.allow_paths)
        self.cfg = cfg

    def count(self, code: int) -> None:
        key = str(code)
        self.stats.requests[key] = self.stats.requests.get(key, 0) + 1

    # --- a request ------------------------------------------------------------------------

    def begin(self, req: Request, conn: ClientConnection
              ) -> Coroutine[Any, Any, bool] | None:
        """A small body that came whole (the common case) is routed at once, and the gate
        goes on by callbacks where it can; anything else is the coroutine `handle`."""
        body = req.body
        if req.method != b"POST":
            return self.handle(req, conn)
        refusal = self.door.enter(req, conn, self.paths)
        if refusal is not None:
            conn.finished(self._refuse(ResponseWriter(conn, req), refusal, conn))
            return None
        if not body.complete or not 0 < body.buffered <= SMALL_BODY:
            return self.handle(req, conn)
        held = body.take()
        try:
            model = model_of_small(held)
        except BodyRefused as exc:
            keep = self._own(ResponseWriter(conn, req), exc.status, exc.code, exc.message)
            conn.finished(keep)
            return None
        gate = self._gate_of(model, req)
        if gate is None:
            conn.finished(self._no_gate(ResponseWriter(conn, req), model))
            return None
        body.unread(held)
        return gate.begin(req, conn, model)

    def _refuse(self, writer: ResponseWriter, refusal: Refusal,
                conn: ClientConnection) -> bool:
        self.count(refusal.status)
        self.stats.reject(refusal.code)
        return answer_refusal(writer, refusal, conn)

    def _gate_of(self, model: str, req: Request) -> Gate | None:
        ticket = req.ticket
        if ticket is not None:
            ticket.model = model
            key = ticket.key
            if key is not None and not key.may_use(model):
                key.reject("model_not_found")
                return None  # exactly as if it did not exist
        service = self.routes.get(model)
        return self.gates.get(service) if service is not None else None

    def _no_gate(self, writer: ResponseWriter, model: str) -> bool:
        ticket = writer.req.ticket
        key = ticket.key if ticket is not None else None
        service = self.routes.get(model)
        if service is None or (key is not None and not key.may_use(model)):
            known = ", ".join(sorted(m for m in self.routes
                                     if key is None or key.may_use(m))) or "none"
            shown = model if len(model) <= 80 else model[:80] + "..."
            return self._own(writer, 404, "model_not_found",
                             f"the model {json.dumps(shown)} does not exist; known "
                             f"models: {known}")
        return self._own(writer, 503, "service_unavailable",
                         f"{service} (serving {model}) is being removed; retry shortly",
                         [(b"Retry-After", b"5")])

    async def handle(self, req: Request, conn: ClientConnection) -> bool:
        if req.method != b"POST":
            writer = ResponseWriter(conn, req)
            path = req.target.split(b"?", 1)[0]
            get = req.method in (b"GET", b"HEAD")
            if not get or path not in (b"/health", b"/healthz"):  # (the router's own: no key)
                refusal = self.door.enter(req, conn, self.paths)
                if refusal is not None:
                    return self._refuse(writer, refusal, conn)
            if get:
                return self._get(writer, path)
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
        except BodyRefused as refused:  # the router's BadBody, or a bad chunk size
            return self._own(ResponseWriter(conn, req), refused.status, refused.code,
                             refused.message)
        except BodyTimeout as slow:  # (a name per except: mypyc types it once)
            self._own(ResponseWriter(conn, req), 408, "request_timeout", str(slow))
            return False
        except ClientGone:
            self._gone(req, conn)
            return False
        except asyncio.CancelledError:  # the client left (its connection is lost)
            self._gone(req, conn)
            raise
        gate = self._gate_of(model, req)
        if gate is None:
            return self._no_gate(ResponseWriter(conn, req), model)
        req.body.unread(held)
        return await gate.handle(req, conn, model)

    async def _find_model(self, req: Request) -> tuple[str, bytes]:
        """Read the body until its `model` is known; the bytes read, to be put back. The
        scan goes on over the rest of the body as it arrives (`RequestBody.check`), until the
        end of the JSON object: a second top-level `model`, however late, fails the body
        before its last byte is passed on, so that the server never gets it whole (the gate
        closes the upstream connection and answers 400 `invalid_body`)."""
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
                if body.complete and not buf:
                    raise BadBody(400, "missing_model", "the request body is empty")
                if first:
                    first = False
                    if body.complete and len(buf) <= SMALL_BODY:
                        return model_of_small(bytes(buf)), bytes(buf)
                    scan.feed(data)
                    body.check = scan.feed  # from now on each read is scanned as it arrives
                del data
                model = scan.model
                if model is not None:  # (its length checked: ModelScan._model)
                    if body.complete and not scan.done:
                        raise BadBody(400, "invalid_body", "the request body is not complete "
                                      "JSON")
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

    def _gone(self, req: Request, conn: ClientConnection) -> None:
        """The client left while the router read the body: counted, its ticket closed (its
        key's slot freed, its audit line written)."""
        self.count(499)
        if req.ticket is not None:
            req.ticket.close(499, req.body.received, conn.sent)

    def _get(self, writer: ResponseWriter, path: bytes) -> bool:
        ticket = writer.req.ticket
        key = ticket.key if ticket is not None else None
        if path in _MODELS_PATHS:
            return self._ok(writer, self.listing if key is None or key.models is None
                            else self._listing(key))
        for prefix in _MODELS_PATHS:
            if path.startswith(prefix + b"/"):
                name = unquote_to_bytes(path[len(prefix) + 1:]).decode("utf-8", "replace")
                entry = self.entries.get(name)
                if entry is None or (key is not None and not key.may_use(name)):
                    return self._own(writer, 404, "model_not_found",
                                     "no such model; GET /v1/models lists them")
                return self._ok(writer, entry)
        if path in (b"/health", b"/healthz"):
            return self._ok(writer, b'{"status": "ok"}')
        return self._own(writer, 404, "not_found", "the router serves GET /v1/models and "
                         "POST requests with a JSON `model` (/v1/chat/completions, "
                         "/v1/completions, /v1/embeddings, ...)")

    def _listing(self, key: Key) -> bytes:
        """GET /v1/models for a key with a list of models: only those (made once for each
        catalogue)."""
        if key.listing_of is not self.listing:
            entries = [e for m, e in self.entries.items() if key.may_use(m)]
            key.listing = b'{"object": "list", "data": [' + b", ".join(entries) + b"]}"
            key.listing_of = self.listing
        return key.listing

    def _ok(self, writer: ResponseWriter, body: bytes) -> bool:
        self.count(200)
        ticket = writer.req.ticket
        writer.simple(200, body, header_pairs(ticket.rate) if ticket is not None and ticket.rate
                      else None)
        if ticket is not None:
            ticket.end = "done"
            ticket.close(200, 0, writer.conn.sent)
        return writer.keep_alive

    def _own(self, writer: ResponseWriter, status: int, code: str, message: str,
             headers: http1.Headers | None = None) -> bool:
        """An answer of the router's own (nothing forwarded)."""
        self.count(status)
        if status >= 400:
            self.stats.reject(code)
        kind = "invalid_request_error" if status < 500 else "service_unavailable"
        ticket = writer.req.ticket
        if ticket is not None and ticket.rate is not None:
            headers = [*(headers or []), *header_pairs(ticket.rate)]
        writer.simple(status, http1.error_body(message, kind, code), headers)
        if ticket is not None:
            ticket.close(status, writer.req.body.received, writer.conn.sent)
        return writer.keep_alive and writer.req.body.complete

