"""The gate's side toward clients: an HTTP/1.1 server on llhttp with a bound on everything a
client controls.

- `Listener` accepts connections itself, so that it can stop accepting: at
  `max_connections` open connections new ones wait in the kernel's backlog; when the process
  is out of file descriptors it backs off (0.1 s doubling to 2 s) instead of spinning, and
  says so in one line at a bounded rate.
- `ClientConnection` parses requests (pipelined ones are queued and run in order), applies
  `header_timeout_s` to each request head (and to an idle keep-alive connection),
  `body_timeout_s` between reads of a body, `send_timeout_s` to a client that accepts nothing,
  and keeps at most `BODY_BUFFER` of a body and `SEND_BUFFER` of a response buffered: above
  that it stops reading from the client, or tells the upstream to stop (back-pressure).
- What it cannot take (a bad head or chunk size, more than `PIPELINE_MAX` pipelined requests)
  is answered in its turn, after the requests before it, and the connection then closes; a bad
  chunk size in a body being read is answered by the handler reading it (`BodyRefused`).
- A protocol upgrade (`Connection: upgrade`, `Upgrade: h2c` or `websocket`) is not made: the
  request goes on as HTTP/1.1, body included (the proxy drops the upgrade headers), as nginx
  does with h2c. CONNECT is refused (501).
- Trailers of a chunked request are dropped; they never become headers of anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import logging
import socket
import sys
import termios
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, Protocol, cast

import httptools

from .. import http1
from ..errors import StartupError
from ..logs import LogLimiter
from .door import Ticket

log = logging.getLogger(__name__)

BODY_BUFFER: Final = 64 * 1024  # request body bytes held before reading from the client stops
SEND_BUFFER: Final = 64 * 1024  # response bytes held for a client before the upstream pauses
PIPELINE_MAX: Final = 8  # requests queued behind the one being answered, on one connection
FRESH_GRACE_S: Final = 1.0  # a listener closing: a new connection's first request may come
# answered before the client's body came whole (a refusal, a 503): what it still sends is read
# and discarded (a close over unread bytes sends a reset, which can destroy the answer in the
# client's kernel before it is read), until it stops for LINGER_IDLE_S, at most LINGER_S and
# LINGER_BYTES (nginx's lingering close)
LINGER_S: Final = 10.0
LINGER_IDLE_S: Final = 2.0
LINGER_BYTES: Final = 64 * 1024 * 1024
_ACCEPT_BATCH: Final = 32
_TOO_MANY_BODY: Final = http1.error_body(
    "too many connections from this address at once; close some and retry",
    "rate_limit_error", "too_many_connections")
_TOO_MANY: Final = (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
                    % len(_TOO_MANY_BODY) + _TOO_MANY_BODY)
_ACCEPT_RETRY_S: Final[tuple[float, ...]] = (0.1, 2.0)
_OUT_OF_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class ClientGone(Exception):
    """The client closed the connection (or was dropped) before the response was complete."""


class BodyTimeout(Exception):
    """The client stopped sending its request body for `body_timeout_s`."""


class BodyRefused(Exception):
    """The request body cannot be passed on (a bad chunk size; the router's check found it
    unfit): the handler answers `status` with the OpenAI error body (`code`, `message`)
    unless its response has begun, and the connection closes. Nothing of the body is passed
    on after this: what was held is dropped, what comes is discarded."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _Stop(http1.ParseError):
    """Raised from an llhttp callback to stop parsing what remains of a read (the connection
    takes no more requests)."""

    def __init__(self) -> None:
        super().__init__("stopped", 0)


class Limits(Protocol):
    """The bounds a listener applies (a gate's `[service.gate]` section has them)."""

    @property
    def header_timeout_s(self) -> float: ...
    @property
    def body_timeout_s(self) -> float: ...
    @property
    def send_timeout_s(self) -> float: ...
    @property
    def max_connections(self) -> int: ...
    @property
    def max_connections_per_client(self) -> int | None: ...


class Writable(Protocol):
    """A response streaming to a client: told when the client's connection can take more
    (True) or cannot (False: its upstream waits)."""

    def writable(self, ok: bool) -> None: ...


class Gone(Protocol):
    """A request answered by callbacks, told if its client leaves before the answer ends."""

    def client_gone(self) -> None: ...


class Handler(Protocol):
    """What a connection hands each request to (a gate; the metrics endpoint)."""

    name: str
    limiter: LogLimiter

    @property
    def cfg(self) -> Limits: ...

    def begin(self, req: Request, conn: ClientConnection
              ) -> Coroutine[Any, Any, bool] | None:
        """Answer `req`: None when answered by callbacks (the handler calls
        `conn.finished(keep)` at its end, and sets `conn.on_gone` to hear of the client
        leaving), else the coroutine that answers it (run as a task; True if the connection
        may serve another request)."""

    def count(self, code: int) -> None: ...


class RequestBody:
    """A request body as it arrives: at most BODY_BUFFER held, then the client waits.

    `check`, when set, sees every chunk as it arrives, before anyone can take it; a
    BodyRefused from it fails the body (the router's scan for a second `model`)."""

    buffered = 0
    received = 0
    _error: BaseException | None = None
    _waiter: asyncio.Future[None] | None = None
    check: Callable[[bytes], None] | None = None

    def __init__(self, conn: ClientConnection, expected: bool) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self.complete = not expected

    def feed(self, data: bytes) -> None:
        if self._error is not None:
            return  # failed: nothing more is held
        if self.check is not None:
            try:
                self.check(data)
            except BodyRefused as exc:
                self.fail(exc)
                return
        self._chunks.append(data)
        self.buffered += len(data)
        self.received += len(data)
        if self.buffered >= BODY_BUFFER:
            self._conn.body_full(self)
        self._wake()

    def end(self) -> None:
        self.complete = True
        # reading goes on: the body held is bounded now, and a client that leaves, or sends
        # its next request, must be seen (it may have filled the buffer in the read that
        # ended the body, which paused reading)
        self._conn.resume_reading("body")
        if self._waiter is not None:
            self._wake()

    def fail(self, exc: BaseException) -> None:
        """The body will not come whole: whoever reads it gets `exc` at once, and what is
        held is dropped (none of it is passed on any more)."""
        if not self.complete and self._error is None:
            self._error = exc
            self._chunks.clear()
            self.buffered = 0
            self._conn.resume_reading("body")
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, timeout_s: float) -> None:
        self._conn.resume_reading("body")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout_s):
                await self._waiter
        except TimeoutError:
            raise BodyTimeout(f"no request body data for {timeout_s:g} s") from None
        finally:
            self._waiter = None

    async def fill(self, limit: int, timeout_s: float) -> None:
        """Wait until the body is complete or `limit` bytes are held."""
        while not self.complete and self.buffered < limit:
            if self._error is not None:
                raise self._error
            await self._wait(timeout_s)
        if self._error is not None:
            raise self._error

    def unread(self, data: bytes) -> None:
        """Put bytes taken from the front of the body back (the router read them to find
        the `model`): the proxy reads them first."""
        if data:
            self._chunks.appendleft(data)
            self.buffered += len(data)

    def take(self) -> bytes:
        """Everything held now."""
        if self._error is not None:
            raise self._error
        data = b"".join(self._chunks)
        self._chunks.clear()
        self.buffered = 0
        self._conn.resume_reading("body")
        return data

    async def read(self, timeout_s: float) -> bytes:
        """The next bytes of the body; b"" at its end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.complete:
                return b""
            await self._wait(timeout_s)
        data = self._chunks.popleft()
        self.buffered -= len(data)
        if self.buffered < BODY_BUFFER:
            self._conn.resume_reading("body")
        return data


class _NoBody(RequestBody):
    """The body of a request without one (no Content-Length, no Transfer-Encoding): complete,
    empty, and shared by every such request (nothing is ever held in it; most requests are
    these, and this is their path)."""

    def __init__(self) -> None:  # (no connection: nothing here ever pauses reading)
        self.complete = True

    def feed(self, data: bytes) -> None:
        raise AssertionError("a request without a body got body bytes")

    def end(self) -> None:
        pass

    def fail(self, exc: BaseException) -> None:
        pass  # complete: nothing to fail

    async def fill(self, limit: int, timeout_s: float) -> None:
        pass

    def unread(self, data: bytes) -> None:
        if data:
            raise AssertionError("bytes put back into a request without a body")

    def take(self) -> bytes:
        return b""

    async def read(self, timeout_s: float) -> bytes:
        return b""


NO_BODY: Final = _NoBody()


@dataclass(slots=True)
class Request:
    method: bytes
    target: bytes
    version: str
    headers: http1.Headers
    keep_alive: bool
    body: RequestBody
    chunked: bool
    content_length: int | None
    expect_continue: bool
    ticket: Ticket | None = None  # the front door's (keys or the audit on)


class ResponseWriter:
    """Writes one response to the client: the head, then the body framed for this client
    (Content-Length, chunked for HTTP/1.1, or close-delimited for HTTP/1.0)."""

    status = 0
    started = False
    finished = False
    chunked = False
    sent_body = b""  # the last bytes sent, to know where an SSE event ends
    event_stream = False
    _held: bytes | None = None  # the head, sent with the first body bytes

    def __init__(self, conn: ClientConnection, req: Request) -> None:
        self.conn = conn
        self.req = req
        self.keep_alive = req.keep_alive
        self.no_body = req.method == b"HEAD"

    def start(self, status: int, reason: bytes, headers: http1.Headers,
              length: int | None, *, body_allowed: bool = True, hold: bool = False) -> None:
        """The response head; `hold`: kept until the first body bytes, `finish` or `flush`,
        to go out in one write with them (one system call for a small response)."""
        ctype = http1.header(headers, b"content-type") or b""
        self.start_lines(status, reason, [k + b": " + v for k, v in headers], ctype, length,
                         body_allowed=body_allowed, hold=hold)

    def start_lines(self, status: int, reason: bytes, lines: list[bytes], ctype: bytes,
                    length: int | None, *, body_allowed: bool = True,
                    hold: bool = False) -> None:
        """`start` with the header lines made (`Name: value`; `lines` is taken) and the
        Content-Type found."""
        self.status = status
        lines.insert(0, b"HTTP/1.1 %d %s" % (status, reason or b""))
        if not self.req.body.complete or self.conn.last:
            # answered before the whole body came, or the listener closes: it ends here
            self.keep_alive = False
        if not body_allowed:
            self.no_body = True
            if length is not None:
                lines.append(b"Content-Length: %d" % length)
        elif length is not None:
            lines.append(b"Content-Length: %d" % length)
        elif self.req.version == "1.1":
            self.chunked = True
            lines.append(b"Transfer-Encoding: chunked")
        else:
            self.keep_alive = False  # an HTTP/1.0 client reads the body up to the close
        if not self.keep_alive:
            lines.append(b"Connection: close")
        self.event_stream = ctype[:17].lower() == b"text/event-stream"
        self.started = True
        lines.append(b"\r\n")
        head = b"\r\n".join(lines)
        if hold:
            self._held = head
        else:
            self.conn.write(head)

    def flush(self) -> None:
        """Send a held head now."""
        if self._held is not None:
            self.conn.write(self._held)
            self._held = None

    def write(self, data: bytes) -> None:
        if not data or self.no_body:
            return
        self.sent_body = data[-2:]
        framed = http1.chunk(data) if self.chunked else data
        if self._held is not None:
            framed = self._held + framed
            self._held = None
        self.conn.write(framed)

    def finish(self) -> None:
        last = http1.LAST_CHUNK if self.chunked and not self.finished else b""
        if self._held is not None:
            last = self._held + last
            self._held = None
        if last:
            self.conn.write(last)
        self.finished = True

    def simple(self, status: int, body: bytes, headers: http1.Headers | None = None,
               content_type: bytes = b"application/json") -> None:
        """A whole response of the server's own (errors, metrics)."""
        hdrs = [(b"Content-Type", content_type), (b"Cache-Control", b"no-store"),
                *(headers or [])]
        self.start(status, http1.REASONS.get(status, b""), hdrs, len(body), hold=True)
        if not self.no_body and body:
            self.write(body)
        self.flush()
        self.finished = True


class ClientConnection(asyncio.Protocol):
    def __init__(self, listener: Listener, client: str = "") -> None:
        self.listener = listener
        self.client = client  # its address, as counted against max_connections_per_client
        self.sent = 0  # bytes written to it
        self.handler = listener.handler
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.peer_bytes = b""
        self._parser = httptools.HttpRequestParser(self)
        self._limit = http1.HeadLimit()
        self.in_head = False
        self._url = b""
        self._headers: http1.Headers = []
        self._parsing: Request | None = None  # the request whose body is arriving
        self._active: Request | None = None
        self._pipeline: deque[Request] = deque()
        self._paused: set[str] = set()
        self._loop = asyncio.get_running_loop()
        # the header timeout: a timer runs while a head is awaited; a request that begins
        # only clears the deadline, and the timer, when it fires, re-arms for a later one
        # (no timer call per request on a busy keep-alive connection)
        self._timer: asyncio.TimerHandle | None = None
        self._head_deadline: float | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._send_mark = 0
        self._eof = False
        self._closing = False
        self._halted = False  # no more requests are read: what the client sends is discarded
        self._final: tuple[int, bytes] | None = None  # our answer after those queued, then close
        self._upgrading: Request | None = None  # its head asked for an upgrade (not made)
        self._priming = False  # a made-up head that puts a new parser inside a body
        self.gone = False
        self._task: asyncio.Task[None] | None = None
        self._begin: Request | None = None  # its head came: begun once the read is parsed
        # set by a handler answering by callbacks: told if the client leaves first
        self.on_gone: Gone | None = None
        # set by the proxy while an upstream response streams to this client
        self.on_writable: Writable | None = None
        self.writing_paused = False
        self._requests = 0  # requests begun on this connection
        self._close_after = False  # the listener closed: close after the request under way
        self.last = False  # the listener closes: the answer under way or next is the last
        self._fresh_timer: asyncio.TimerHandle | None = None
        self._linger_until = 0.0  # lingering (see LINGER_S): until when at most, else 0
        self._linger_left = 0
        self._linger_mark = 0.0  # the last read while lingering
        self._linger_timer: asyncio.TimerHandle | None = None

    # --- asyncio ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast("asyncio.Transport", transport)  # (uvloop's are not subclasses)
        self.transport = transport
        transport.set_write_buffer_limits(high=SEND_BUFFER)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer = str(peer[0])
            self.peer_bytes = self.peer.encode()
        self.listener.opened(self)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self._cancel_timers()
        gone = ClientGone("client closed the connection")
        if self._parsing is not None:
            self._parsing.body.fail(gone)
        for req in self._pipeline:
            req.body.fail(gone)
            self.handler.count(499)  # its client left before its turn came
        self._pipeline.clear()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the handler sees CancelledError: slot freed, upstream closed
        gone_hook, self.on_gone = self.on_gone, None
        if gone_hook is not None:
            gone_hook.client_gone()  # the same, for a request answered by callbacks
        self.listener.closed(self)

    def eof_received(self) -> bool:
        if self._linger_until:
            self.close()  # (lingering: the client has sent all it will)
            return False
        # The client closed its side. Like nginx, take it as gone (a request in progress is
        # cancelled, its slot freed, the upstream closed): a client that sends FIN instead of
        # RST must not keep a slot until the model answers, nor a half-sent body until
        # body_timeout_s.
        self._eof = True
        return False

    def data_received(self, data: bytes) -> None:
        if self._linger_until:
            self._lingered(len(data))
            return
        try:
            while data and not (self._closing or self._halted):
                try:
                    http1.feed(self._parser, data, self._limit, self)
                    return
                except http1.Upgrade as exc:
                    data = data[exc.offset:]  # the rest is HTTP/1.1 still: the body first
                    self._not_upgraded()
                except _Stop:
                    return
                except http1.ParseError as bad:  # (a name per except: mypyc types it once)
                    self._refuse(bad.status, str(bad))
                    return
        finally:
            # a request whose head came in this read begins now, outside llhttp's callbacks,
            # with as much of its body as the read held (often all of it: no wait for it)
            req, self._begin = self._begin, None
            if req is not None and not self.gone:
                self._start(req)

    def _not_upgraded(self) -> None:
        """llhttp stopped after the head of a request asking for a protocol upgrade, and skipped
        its body (httptools tells it to). The upgrade is not made (the proxy drops `Upgrade`
        and the `Connection` tokens): a new parser goes on with the same connection, primed
        with a head of the same framing so that it reads the body into the same request."""
        req, self._upgrading = self._upgrading, None
        self._parser = httptools.HttpRequestParser(self)
        if req is None or self._parsing is not req:
            return  # no body: the next request follows
        framing = b"Transfer-Encoding: chunked" if req.chunked \
            else b"Content-Length: %d" % (req.content_length or 0)
        self._priming = True
        try:
            self._parser.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n\r\n")
        finally:
            self._priming = False

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.on_writable is not None:
            self.on_writable.writable(False)
        else:
            # our own answers (the router's, refusals) go out whatever the client reads: no
            # more requests are read until it takes them (the buffer stays bounded)
            self.pause_reading("writing")
        self._arm_send_timer()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        self.resume_reading("writing")
        if self.on_writable is not None:
            self.on_writable.writable(True)

    # --- llhttp callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._priming:
            return
        self._requests += 1
        self.in_head = True
        self._url = b""
        self._headers = []
        self._limit.reset()

    def on_url(self, url: bytes) -> None:
        if self._priming:
            return
        self._limit.part(len(url))
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:  # trailers of a chunked body are dropped here
            self._limit.header(name, value)
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._priming:
            return  # the made-up head: the body that follows is the upgrading request's
        self.in_head = False
        p = self._parser
        upgrade = p.should_upgrade()
        if upgrade and p.get_method() == b"CONNECT":
            raise http1.ParseError("CONNECT is not supported", 501)
        headers = self._headers
        chunked = expect = False
        cl = None
        for k, v in headers:  # (one pass: this is every request's path)
            name = k.lower()
            if name == b"content-length":
                if cl is None:
                    cl = v
            elif name == b"transfer-encoding":
                # chunked, once, and nothing else: another coding (gzip, chunked with
                # parameters) leaves the body's length unknown, or would pass coded bytes on
                # as the body (RFC 9112 6.1: 501)
                if chunked or v.strip().lower() != b"chunked":
                    raise http1.ParseError(
                        f"unsupported Transfer-Encoding {v[:40].decode(errors='replace')!r}"
                        " (only chunked is)", 501)
                chunked = True
            elif name == b"expect":
                expect = expect or v.lower() == b"100-continue"
        length = int(cl) if cl is not None and not chunked else None
        body = RequestBody(self, expected=True) if chunked or length else NO_BODY
        req = Request(p.get_method(), self._url, p.get_http_version(), headers,
                      p.should_keep_alive(), body, chunked, length, expect)
        if self._active is not None and len(self._pipeline) >= PIPELINE_MAX:
            self._overflow(f"more than {PIPELINE_MAX} requests pipelined")
            raise _Stop  # nothing after it is parsed
        if upgrade:
            self._upgrading = req  # its body, if any, is read by the next parser
        self._parsing = req
        if self._active is None:
            self._head_deadline = None  # (the header timer: a head came)
            self._active = req
            self._begin = req  # begun once this read is parsed (data_received)
        else:
            # pipelined: runs after the current one. Reading goes on (bounded), so that a
            # client that leaves is seen: a paused socket would not tell us.
            self._pipeline.append(req)

    def on_body(self, data: bytes) -> None:
        if self._parsing is not None:
            self._parsing.body.feed(data)

    def on_message_complete(self) -> None:
        req = self._parsing
        if req is not None:
            if req is self._upgrading and not req.body.complete:
                return  # llhttp skipped its body: the next parser reads it
            req.body.end()
            self._parsing = None

    # --- requests -------------------------------------------------------------------------------

    def _start(self, req: Request) -> None:
        self._active = req
        try:
            coro = self.handler.begin(req, self)
        except Exception:
            self.handler.limiter.exception(
                "handler", "%s gate: internal error handling a request", self.handler.name)
            self.abort()
            return
        if coro is None:
            return  # answered by callbacks: `finished` follows
        began = [False]  # (a compiled coroutine has no state to ask: the task says it began)
        task = self._loop.create_task(self._run(coro, began, req))
        self._task = task
        self.listener.tasks.add(task)
        task.add_done_callback(self.listener.tasks.discard)
        task.add_done_callback(functools.partial(self._never_ran, coro, began, req))

    def _never_ran(self, coro: Coroutine[Any, Any, bool], began: list[bool], req: Request,
                   _task: object) -> None:
        """The task ended before it began (its client left in the same turn of the loop):
        the handler never saw the request; it is counted here, as its client's leaving."""
        if not began[0]:
            coro.close()  # (never awaited: closed, so that it is not warned about)
            self.handler.count(499)
            if req.ticket is not None:
                req.ticket.close(499, req.body.received, self.sent)

    async def _run(self, coro: Coroutine[Any, Any, bool], began: list[bool],
                   req: Request) -> None:
        began[0] = True
        keep = False
        try:
            keep = await coro
        except asyncio.CancelledError:
            # the client left: a handler that did not close the request's ticket (it must not
            # hold its key's slot for ever)
            if req.ticket is not None:
                req.ticket.close(499, req.body.received, self.sent)
            raise
        except Exception:
            self.handler.limiter.exception(
                "handler", "%s gate: internal error handling a request", self.handler.name)
        self._task = None
        self.finished(keep)

    def finished(self, keep: bool) -> None:
        """The request being answered has its answer (`keep`: the connection may serve
        another): the next one pipelined begins, or the connection waits for one, or
        closes."""
        req = self._active
        self.on_writable = None
        self.on_gone = None
        self._active = None
        if req is not None and req.ticket is not None and req.ticket.end != "closed":
            # (a handler that failed on the way: its ticket must not hold its key's slot)
            req.ticket.end = "error"
            req.ticket.close(500, req.body.received, self.sent)
        if self.gone or req is None:
            return
        if not keep or not req.keep_alive or not req.body.complete or self._eof \
                or self._closing or self._close_after:
            if not req.body.complete and not self._eof:
                self._linger()  # (the client is still sending its body)
            else:
                self.close()
            return
        if self._pipeline:
            self._start(self._pipeline.popleft())
            return
        if self._final is not None:  # our own answer to what came after them
            self._send_final()
            return
        if self._halted:
            self.close()
            return
        self._arm_header_timer()  # idle keep-alive: the next head must come in time

    def _refuse(self, status: int, why: str) -> None:
        """A request we cannot parse: answered in its turn (after the requests before it),
        then the connection closes. A bad chunk size in the body of the request being
        answered is its handler's to answer (the body fails with BodyRefused)."""
        self.handler.limiter.info("bad_request", "%s gate: bad request from %s: %s",
                                  self.handler.name, self.peer or "?", why)
        self._halted = True
        code = "not_implemented" if status == 501 else "bad_request"
        message = f"not implemented: {why}" if status == 501 else f"bad request: {why}"
        req, self._parsing = self._parsing, None
        if req is not None:
            if req is self._active:
                req.body.fail(BodyRefused(status, code, message))
                return
            self._unqueue(req)
        self._answer_last(status, http1.error_body(message, "invalid_request_error", code))

    def _overflow(self, why: str) -> None:
        """A pipelined request beyond what the connection holds: those before it are
        answered, it gets a 503 (to be sent again, on this connection after the answers or on
        another), and the connection closes."""
        self.handler.limiter.info("pipeline", "%s gate: %s sent %s; answering those before, "
                                  "then closing", self.handler.name, self.peer or "?", why)
        self._halted = True
        req, self._parsing = self._parsing, None
        if req is not None:
            self._unqueue(req)
        self._answer_last(503, http1.error_body(
            f"{why} on one connection: send it again once the answers before it have come, "
            "or on another connection", "service_unavailable", "pipeline_full"))

    def _unqueue(self, req: Request) -> None:
        """`req` (the last pipelined) will not be run."""
        if self._pipeline and self._pipeline[-1] is req:
            self._pipeline.pop()
        req.body.fail(ClientGone("not run"))

    def _answer_last(self, status: int, body: bytes) -> None:
        """Our own answer, after those of the requests before it; then close."""
        head = http1.encode_head(
            b"HTTP/1.1 %d %s" % (status, http1.REASONS.get(status, b"")),
            [(b"Content-Type", b"application/json"), (b"Content-Length", b"%d" % len(body)),
             (b"Connection", b"close")])
        self._final = (status, head + body)
        if self._active is None:
            self._send_final()

    def _send_final(self) -> None:
        if self._final is not None:
            status, response = self._final
            self._final = None
            self.handler.count(status)
            self.write(response)
        self.close()

    # --- output ---------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not self.gone and not t.is_closing():
            self.sent += len(data)
            t.write(data)

    def _linger(self) -> None:
        """Close, the client still sending a body: our side first (FIN after the answer),
        what comes is read and discarded (LINGER_S), then the close."""
        t = self.transport
        if t is None or t.is_closing() or not t.can_write_eof():
            self.close()
            return
        self._closing = True
        self._cancel_timers(keep_send=True)
        now = self._loop.time()
        self._linger_until = now + LINGER_S
        self._linger_left = LINGER_BYTES
        try:
            t.write_eof()
        except (OSError, RuntimeError):
            self.close()
            return
        if self._paused:  # (a body held: its reading waited for it to be taken)
            self._paused.clear()
            t.resume_reading()
        self._linger_timer = self._loop.call_at(min(now + LINGER_IDLE_S, self._linger_until),
                                                self._linger_check)
        self._linger_mark = now

    def _lingered(self, n: int) -> None:
        self._linger_left -= n
        self._linger_mark = self._loop.time()
        if self._linger_left <= 0:
            self.close()

    def _linger_check(self) -> None:
        self._linger_timer = None
        now = self._loop.time()
        if now >= self._linger_until or now - self._linger_mark >= LINGER_IDLE_S:
            self.close()
            return
        self._linger_timer = self._loop.call_at(
            min(self._linger_mark + LINGER_IDLE_S, self._linger_until), self._linger_check)

    def close(self) -> None:
        """Close after what is buffered has been sent (a client that takes none of it for
        send_timeout_s is dropped: the send timer stays)."""
        self._closing = True
        self._cancel_timers(keep_send=True)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    def close_when_idle(self) -> None:
        """The listener is closing: finish the request in progress, then close. A connection
        accepted a moment before, whose first request (or the head under way) has not been
        read yet, gets FRESH_GRACE_S for it: it is answered, not cut (the listening socket
        lives on in a front that takes over, and the client did nothing wrong)."""
        if self._active is None and not self._closing and self.transport is not None \
                and (self._requests == 0 or self.in_head):
            self._close_after = self.last = True
            self._fresh_timer = self._loop.call_later(FRESH_GRACE_S, self._fresh_expired)
            return
        self._closing = self.last = True
        if self._active is None:
            self.close()

    def _fresh_expired(self) -> None:
        self._fresh_timer = None
        if self._active is not None or self._pipeline or self._closing:
            return
        if self.in_head or self._unread():
            # its request is under way, or came and is not read yet (a busy loop runs its
            # timers before its reads; closing over unread bytes would send a reset): it is
            # answered; the header timeout bounds a head that does not come whole
            self._fresh_timer = self._loop.call_later(FRESH_GRACE_S, self._fresh_expired)
            return
        self.close()

    def _unread(self) -> bool:
        """Bytes from the client wait in the socket, not yet read."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return False
        try:
            count = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return False
        return int.from_bytes(count, sys.byteorder, signed=True) > 0

    # --- flow control and timers ---------------------------------------------------------

    def body_full(self, body: RequestBody) -> None:
        """A request body holds BODY_BUFFER: reading waits for the proxy to take it. A
        pipelined request's body cannot be taken yet, and reading must go on (waiting would
        stop us from seeing the client leave): that request is refused in its turn."""
        if self._active is not None and body is self._active.body:
            self.pause_reading("body")
        else:
            self._overflow(f"a pipelined request with a body over {BODY_BUFFER // 1024} KiB")
            raise _Stop

    def pause_reading(self, why: str) -> None:
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._paused.add(why)

    def resume_reading(self, why: str) -> None:
        if why not in self._paused:
            return
        self._paused.discard(why)
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _arm_header_timer(self) -> None:
        loop = self._loop
        deadline = self._head_deadline = loop.time() + self.handler.cfg.header_timeout_s
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        self._head_deadline = None

    def _header_timeout(self) -> None:
        self._timer = None
        deadline = self._head_deadline
        if deadline is None or self._active is not None:
            return
        if self._loop.time() < deadline:  # a request came and went since: a later deadline
            self._timer = self._loop.call_at(deadline, self._header_timeout)
            return
        if self.in_head:  # a request had begun: tell the client why
            self.handler.limiter.info("header_timeout", "%s gate: %s did not send a request "
                                      "head within %g s; closing", self.handler.name,
                                      self.peer or "?", self.handler.cfg.header_timeout_s)
            self.handler.count(408)
            body = http1.error_body("request head not received in time",
                                    "invalid_request_error", "request_timeout")
            self.write(http1.encode_head(b"HTTP/1.1 408 Request Timeout", [
                (b"Content-Type", b"application/json"),
                (b"Content-Length", b"%d" % len(body)), (b"Connection", b"close")]) + body)
        self.close()

    def _arm_send_timer(self) -> None:
        if self._send_timer is not None or self.transport is None:
            return
        self._send_mark = self.transport.get_write_buffer_size()
        self._send_timer = asyncio.get_running_loop().call_later(
            self.handler.cfg.send_timeout_s, self._send_timeout)

    def _send_timeout(self) -> None:
        self._send_timer = None
        t = self.transport
        if t is None or self.gone or not self.writing_paused:
            return
        size = t.get_write_buffer_size()
        if size < self._send_mark:  # slow, but it reads: give it another period
            self._arm_send_timer()
            return
        self.handler.limiter.info("send_timeout", "%s gate: %s accepted no response data "
                                  "for %g s; dropping it", self.handler.name, self.peer or "?",
                                  self.handler.cfg.send_timeout_s)
        self.abort()

    def _cancel_timers(self, keep_send: bool = False) -> None:
        self._head_deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._fresh_timer is not None:
            self._fresh_timer.cancel()
            self._fresh_timer = None
        if self._send_timer is not None and not keep_send:
            self._send_timer.cancel()
            self._send_timer = None
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None


class Listener:
    """Accepts client connections for one gate, at most `max_connections` at a time."""

    def __init__(self, handler: Handler, host: str, port: int, backlog: int = 1024) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.backlog = backlog
        self.connections: set[ClientConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._socks: list[socket.socket] = []
        self._accepting = False
        self._retry: asyncio.TimerHandle | None = None
        self._retry_s = _ACCEPT_RETRY_S[0]
        self._pending = 0  # accepted, transport not made yet
        self._closed = False
        self.per_client: dict[str, int] = {}  # open connections by client address
        self.turned_away = 0  # connections closed at once: their client had too many
        self._all_closed: asyncio.Event | None = None

    def bind(self) -> None:
        """Bind every address `host` resolves to (like asyncio.create_server); OSError out."""
        self._socks = bind_sockets(self.host, self.port, self.backlog)

    def use(self, socks: list[socket.socket]) -> None:
        """Listen on sockets bound elsewhere (the daemon binds, the front serves)."""
        for sock in socks:
            sock.setblocking(False)
        self._socks = list(socks)

    def start(self) -> None:
        self._accepting = False
        self._resume_accepting()

    def _resume_accepting(self) -> None:
        if self._accepting or self._closed:
            return
        loop = asyncio.get_running_loop()
        for sock in self._socks:
            loop.add_reader(sock.fileno(), self._accept, sock)
        self._accepting = True

    def _pause_accepting(self) -> None:
        if not self._accepting:
            return
        loop = asyncio.get_running_loop()
        for sock in self._socks:
            loop.remove_reader(sock.fileno())
        self._accepting = False

    def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        max_conn = self.handler.cfg.max_connections
        for _ in range(_ACCEPT_BATCH):
            if len(self.connections) + self._pending >= max_conn:
                self._pause_accepting()  # the rest wait in the backlog
                return
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self.handler.limiter.warning(
                        "accept", "%s gate: cannot accept connections: %s; retrying in %g s",
                        self.handler.name, exc.strerror, self._retry_s)
                    self._pause_accepting()
                    self._retry = loop.call_later(self._retry_s, self._after_retry)
                    self._retry_s = min(self._retry_s * 2, _ACCEPT_RETRY_S[1])
                    return
                continue  # ECONNABORTED and friends: that client is gone
            self._retry_s = _ACCEPT_RETRY_S[0]
            client = ""
            per_client = self.handler.cfg.max_connections_per_client
            if per_client is not None:
                client = str(addr[0]) if isinstance(addr, tuple) and addr else ""
                have = self.per_client.get(client, 0)
                if have >= per_client:
                    self._turn_away(conn, client, per_client)
                    continue
                self.per_client[client] = have + 1
            conn.setblocking(False)
            self._pending += 1
            task = loop.create_task(self._connect(conn, client))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _turn_away(self, conn: socket.socket, client: str, limit: int) -> None:
        """A client over max_connections_per_client: a 429 if the socket takes it at once,
        then the close (nothing is read, no transport is made)."""
        self.turned_away += 1
        self.handler.limiter.warning(
            "per_client", "%s gate: %s has %d connections open, the most one client may: "
            "new ones are closed", self.handler.name, client or "?", limit)
        with contextlib.suppress(OSError):
            conn.setblocking(False)
            conn.send(_TOO_MANY)
        conn.close()

    def _uncount(self, client: str) -> None:
        if client:
            n = self.per_client.get(client, 0) - 1
            if n > 0:
                self.per_client[client] = n
            else:
                self.per_client.pop(client, None)

    async def _connect(self, conn: socket.socket, client: str) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: ClientConnection(self, client), conn)
        except OSError:
            conn.close()
            self._uncount(client)
        finally:
            self._pending -= 1
            self._maybe_resume()
            self._maybe_all_closed()

    def _after_retry(self) -> None:
        self._retry = None
        self._resume_accepting()

    def opened(self, conn: ClientConnection) -> None:
        self.connections.add(conn)
        if self._closed:
            # accepted before the listener closed, its transport made after: like the others,
            # its first request is answered (closed at once, over a request that had come,
            # the client got a reset)
            conn.close_when_idle()

    def closed(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        self._uncount(conn.client)
        self._maybe_all_closed()
        self._maybe_resume()

    def _maybe_all_closed(self) -> None:
        if not self.connections and not self._pending and self._all_closed is not None:
            self._all_closed.set()

    def _maybe_resume(self) -> None:
        if (not self._accepting and self._retry is None and not self._closed
                and len(self.connections) + self._pending < self.handler.cfg.max_connections):
            self._resume_accepting()

    def _close_socks(self) -> None:
        for sock in self._socks:
            sock.close()
        self._socks = []

    async def close(self, grace_s: float) -> None:
        """Stop accepting; let requests in progress finish for up to `grace_s`."""
        self._closed = True
        self._pause_accepting()
        if self._retry is not None:
            self._retry.cancel()
        self._close_socks()
        self._all_closed = asyncio.Event()
        for conn in list(self.connections):
            conn.close_when_idle()
        if self.connections or self._pending:  # (those accepted: their transports to come)
            try:
                async with asyncio.timeout(grace_s):
                    await self._all_closed.wait()
            except TimeoutError:
                for conn in list(self.connections):
                    conn.abort()
        for task in list(self.tasks):
            task.cancel()


def bind_sockets(host: str, port: int, backlog: int = 1024) -> list[socket.socket]:
    """Listening sockets on every address `host` resolves to (like asyncio.create_server);
    OSError out (none left open)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen = set()
    socks: list[socket.socket] = []
    try:
        for family, stype, proto, _name, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, stype, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def serve_sockets(handler: Handler, socks: list[socket.socket], backlog: int = 1024
                  ) -> Listener:
    """A started listener for `handler` on sockets bound elsewhere."""
    host, port = socks[0].getsockname()[:2]
    listener = Listener(handler, host, port, backlog)
    listener.use(socks)
    listener.start()
    return listener


def open_listener(handler: Handler, host: str, port: int, what: str,
                  backlog: int = 1024) -> Listener:
    """A started listener for `handler`, or StartupError ("cannot listen on WHAT: ...")."""
    listener = Listener(handler, host, port, backlog)
    try:
        listener.bind()
    except OSError as exc:
        raise StartupError(f"cannot listen on {what}: {exc.strerror or exc}") from None
    listener.start()
    return listener
