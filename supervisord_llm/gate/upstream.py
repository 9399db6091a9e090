"""The gate's upstream HTTP/1.1 client: keep-alive connections per backend, responses parsed by
llhttp, and a response body handed to the client's connection from `data_received` (no task
wake-up per chunk). The upstream is paused while the client's connection cannot take more
(back-pressure), so a client that stops reading costs at most a few buffers, however much the
backend sends and however it frames it.

One request at a time per connection; the response's framing is whatever the backend chose
(length, chunked, close-delimited); what the client gets is framed anew by the server side.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Final, Protocol, cast

from ..http1 import ParseError, ResponseHead, ResponseParser

CONNECT_TIMEOUT_S: Final = 10.0


class UpstreamError(Exception):
    """The upstream failed (refused, reset, closed early, spoke invalid HTTP)."""


class Receiver(Protocol):
    """Who gets the answer to a request (the gate's exchange). Called on the loop, never from
    inside the parser: `on_head` once the response head is complete (the receiver then calls
    `start_body`), `on_end` once the body is complete (the connection is back in the pool or
    closed by then), `on_error` if it fails before that (the connection is dropped). After
    one of the last two, nothing more."""

    def on_head(self, head: ResponseHead) -> None: ...
    def on_end(self) -> None: ...
    def on_error(self, exc: UpstreamError) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self._pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.got_bytes = False  # any byte of the current response arrived
        self._parser: ResponseParser | None = None
        self._rx: Receiver | None = None
        self._head_told = False
        self._sink: Callable[[bytes], None] | None = None
        self._pending: list[bytes] = []
        self._ended = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._reading_paused = False  # (pause/resume only on a change: each is a syscall)
        self._spoilt = False  # the server sent what nobody asked for: not used again

    # --- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast("asyncio.Transport", transport)  # (uvloop's are not subclasses)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or parser.done:
            self._fail(UpstreamError("the server sent data it was not asked for"))
            return
        self.got_bytes = True
        error = None
        try:
            parser.feed(data)
        except ParseError as exc:
            if parser.done:
                self._spoilt = True  # the answer is whole; what came after it is not used
            else:
                error = UpstreamError(str(exc))  # (told after the head, if that came whole)
        rx = self._rx
        if rx is not None and not self._head_told and parser.head is not None:
            self._head_told = True
            rx.on_head(parser.head)  # start_body, now or once the request body is sent
            if self._sink is None and not self._ended and self._rx is rx:
                self.pause()  # the rest waits until the client's response starts
        elif error is None and self._ended and self._sink is not None:
            self._finish()
        if error is not None:
            self._fail(error)

    def eof_received(self) -> bool | None:
        return None  # close: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._can_write.set()
        parser = self._parser
        head = parser.head if parser is not None else None
        if parser is not None and head is not None and head.framing == "close" \
                and not parser.done and exc is None and self._rx is not None:
            self._ended = True  # a close-delimited body ends here
            if self._sink is not None:
                self._finish()
        else:
            why = f": {exc}" if exc else ""
            self._fail(UpstreamError(f"the server closed the connection{why}"), abort=False)
        self._pool.forget(self)

    # --- the parser's callbacks -------------------------------------------------------------

    def _on_body(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink(data)
        else:
            self._pending.append(data)

    def _on_end(self) -> None:
        self._ended = True  # finished once the read is parsed (data_received)

    # --- the request ---------------------------------------------------------------------

    def request(self, head: bytes, rx: Receiver, *, head_request: bool,
                body: bytes | None = None) -> None:
        """Send a request head (and `body`, a whole one held: in the same write); `rx` hears
        of the response."""
        assert self.transport is not None
        self._rx = rx
        self._head_told = False
        self._sink = None
        self._pending = []
        self._ended = False
        self.got_bytes = False
        parser = self._parser
        if parser is None or head_request or not parser.again():
            # (the head is told once the read is parsed: data_received)
            self._parser = ResponseParser(None, self._on_body, self._on_end,
                                          head_request=head_request)
        self._reading(True)  # paused at the previous head (if it was)
        self.transport.write(head + body if body else head)

    async def send(self, data: bytes) -> None:
        """Request body bytes (framed by the caller); waits while the server does not read."""
        if self.closed or self.transport is None:
            raise UpstreamError("the server closed the connection during the request body")
        self.transport.write(data)
        if not self._can_write.is_set():
            await self._can_write.wait()

    def start_body(self, sink: Callable[[bytes], None]) -> None:
        """Pass the response body to `sink` from now on (what came already first); the end
        (or the error that cuts it) goes to the receiver."""
        self._sink = sink
        pending, self._pending = self._pending, []
        for data in pending:
            sink(data)
        if self._ended:
            self._finish()
        else:
            self._reading(True)

    def _reading(self, on: bool) -> None:
        if self.transport is None or self.closed or self._reading_paused != on:
            return
        self._reading_paused = not on
        if on:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    def pause(self) -> None:
        self._reading(False)

    def resume(self) -> None:
        if self._sink is not None:
            self._reading(True)

    def close(self) -> None:
        """Drop the connection (mid-request: the server must see the end of it); the
        receiver hears nothing more."""
        self._sink = None
        self._rx = None
        if self.transport is not None:
            self.transport.close()

    def _finish(self) -> None:
        self._sink = None
        rx, self._rx = self._rx, None
        parser = self._parser
        keep = parser is not None and parser.head is not None and parser.head.keep_alive
        if keep and not self.closed and not self._spoilt:
            self._pool.release(self)  # first: the receiver's next request may take it
        else:
            self.close()
        if rx is not None:
            rx.on_end()

    def _fail(self, exc: UpstreamError, abort: bool = True) -> None:
        rx, self._rx = self._rx, None
        self._sink = None
        if abort and self.transport is not None:
            self.transport.abort()
        if rx is not None:
            rx.on_error(exc)


class UpstreamPool:
    """Idle keep-alive connections per (host, port). One sweep every `idle_s / 2` closes
    those idle for longer than `idle_s` (a timer per connection would be two timer calls per
    request); none older is ever handed out."""

    def __init__(self, max_idle: int = 256, idle_s: float = 4.0) -> None:
        # idle_s stays under the keep-alive timeouts of the servers behind the gate (5 s:
        # uvicorn's, which vLLM and SGLang use, and llama-server's): a pooled connection is
        # not one the server is closing at that moment (and a request whose whole body is
        # held is sent again on a new connection if it was: `_Exchange.failed`). Longer is
        # fewer connects in a burst after a pause (2 s before: most of 64 streams opened
        # after a 2-second lull connected anew).
        self._idle: dict[tuple[str, int], list[UpstreamConnection]] = {}
        self._all: set[UpstreamConnection] = set()
        self.max_idle = max_idle
        self.idle_s = idle_s
        self._sweep: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it serves (first use)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def take(self, host: str, port: int) -> UpstreamConnection | None:
        """A recent idle connection to (host, port) (`reused` set), or None."""
        idle = self._idle.get((host, port))
        if not idle:
            return None
        now = self.loop.time()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.idle_s \
                    and conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                return conn
            conn.close()
        return None

    async def acquire(self, host: str, port: int, fresh: bool = False) -> UpstreamConnection:
        """A recent idle connection (`reused` set), or a new one (always, with `fresh`: the
        retry after a kept-alive connection turned out closed, when the others kept with it
        are likely closed too)."""
        if not fresh:
            conn = self.take(host, port)
            if conn is not None:
                return conn
        key = (host, port)
        loop = self.loop
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _t, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self, key), host, port)
        except TimeoutError:
            raise UpstreamError(f"cannot connect to {host}:{port}: no answer within "
                                f"{CONNECT_TIMEOUT_S:g} s") from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {host}:{port}: "
                                f"{exc.strerror or exc}") from None
        self._all.add(conn)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """The response is complete and the connection may be used again."""
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = []
        if len(idle) >= self.max_idle:
            conn.close()
            return
        loop = self.loop
        conn.idle_since = loop.time()
        idle.append(conn)
        if self._sweep is None:
            self._sweep = loop.call_later(self.idle_s / 2, self._swept)

    def _swept(self) -> None:
        self._sweep = None
        now = self.loop.time()
        left = False
        for idle in self._idle.values():
            # oldest first: released ones are appended, taken ones popped from the end
            while idle and now - idle[0].idle_since >= self.idle_s:
                idle.pop(0).close()
            left = left or bool(idle)
        if left:
            self._sweep = self.loop.call_later(self.idle_s / 2, self._swept)

    def forget(self, conn: UpstreamConnection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
