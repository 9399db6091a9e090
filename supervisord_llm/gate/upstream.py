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
from typing import Final, cast

from ..http1 import ParseError, ResponseHead, ResponseParser

CONNECT_TIMEOUT_S: Final = 10.0


class UpstreamError(Exception):
    """The upstream failed (refused, reset, closed early, spoke invalid HTTP)."""


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self._pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None
        self.got_bytes = False  # any byte of the current response arrived
        self._parser: ResponseParser | None = None
        self._head_fut: asyncio.Future[ResponseHead] | None = None
        self._done: asyncio.Future[None] | None = None
        self._sink: Callable[[bytes], None] | None = None
        self._pending: list[bytes] = []
        self._ended = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._reading_paused = False  # (pause/resume only on a change: each is a syscall)

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
        try:
            parser.feed(data)
        except ParseError as exc:
            self._fail(UpstreamError(str(exc)))
            return
        if self._sink is None and parser.head is not None and not self._ended:
            self.pause()  # a body beyond this read waits until the client's response starts

    def eof_received(self) -> bool | None:
        return None  # close: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._can_write.set()
        parser = self._parser
        head = parser.head if parser is not None else None
        if parser is not None and head is not None and head.framing == "close" \
                and not parser.done and exc is None:
            self._ended = True  # a close-delimited body ends here
            self._finish()
        else:
            why = f": {exc}" if exc else ""
            self._fail(UpstreamError(f"the server closed the connection{why}"), abort=False)
        self._pool.forget(self)

    # --- the parser's callbacks -------------------------------------------------------------

    def _on_head(self, head: ResponseHead) -> None:
        fut = self._head_fut
        if fut is not None and not fut.done():
            fut.set_result(head)

    def _on_body(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink(data)
        else:
            self._pending.append(data)

    def _on_end(self) -> None:
        self._ended = True
        if self._sink is not None:
            self._finish()

    # --- the request ---------------------------------------------------------------------

    def request(self, head: bytes, *, head_request: bool,
                body: bytes | None = None) -> asyncio.Future[ResponseHead]:
        """Send a request head (and `body`, a whole one held: in the same write); the future
        resolves with the response head."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._head_fut = loop.create_future()
        self._done = loop.create_future()
        self._sink = None
        self._pending = []
        self._ended = False
        self.got_bytes = False
        self._parser = ResponseParser(self._on_head, self._on_body, self._on_end,
                                      head_request=head_request)
        self._reading(True)  # paused at the previous head (if it was)
        self.transport.write(head + body if body else head)
        return self._head_fut

    async def send(self, data: bytes) -> None:
        """Request body bytes (framed by the caller); waits while the server does not read."""
        if self.closed or self.transport is None:
            raise UpstreamError("the server closed the connection during the request body")
        self.transport.write(data)
        if not self._can_write.is_set():
            await self._can_write.wait()

    def start_body(self, sink: Callable[[bytes], None]) -> asyncio.Future[None]:
        """Pass the response body to `sink` from now on; the future resolves at its end
        (or with the error that cut it)."""
        assert self._done is not None
        self._sink = sink
        pending, self._pending = self._pending, []
        for data in pending:
            sink(data)
        if self._ended:
            self._finish()
        else:
            self._reading(True)
        return self._done

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

    def cancel(self, exc: BaseException) -> None:
        """The client went away: end the wait with `exc` and drop the connection."""
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)
        self.close()

    def close(self) -> None:
        self._sink = None
        if self.transport is not None:
            self.transport.close()

    def _finish(self) -> None:
        self._sink = None
        parser = self._parser
        keep = parser is not None and parser.head is not None and parser.head.keep_alive
        done = self._done
        if done is not None and not done.done():
            done.set_result(None)
        if keep and not self.closed:
            self._parser = None
            self._pool.release(self)
        else:
            self.close()

    def _fail(self, exc: UpstreamError, abort: bool = True) -> None:
        for fut in (self._head_fut, self._done):
            if fut is not None and not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved: whoever waits sees it; nobody waiting is fine
        self._sink = None
        if abort and self.transport is not None:
            self.transport.abort()


class UpstreamPool:
    """Idle keep-alive connections per (host, port)."""

    def __init__(self, max_idle: int = 256, idle_s: float = 2.0) -> None:
        # idle_s stays under the keep-alive timeouts of the servers behind the gate (uvicorn,
        # which vLLM uses, closes idle connections after 5 s): a pooled connection is never
        # one the server is closing at that moment.
        self._idle: dict[tuple[str, int], list[UpstreamConnection]] = {}
        self._all: set[UpstreamConnection] = set()
        self.max_idle = max_idle
        self.idle_s = idle_s

    async def acquire(self, host: str, port: int, fresh: bool = False) -> UpstreamConnection:
        """A recent idle connection (`reused` set), or a new one (always, with `fresh`: the
        retry after a kept-alive connection turned out closed, when the others kept with it
        are likely closed too)."""
        key = (host, port)
        idle = None if fresh else self._idle.get(key)
        loop = asyncio.get_running_loop()
        now = loop.time()
        while idle:
            conn = idle.pop()
            if conn.idle_timer is not None:
                conn.idle_timer.cancel()
                conn.idle_timer = None
            if not conn.closed and now - conn.idle_since < self.idle_s:
                conn.reused = True
                return conn
            conn.close()
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
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self.max_idle:
            conn.close()
            return
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        conn.idle_timer = loop.call_later(self.idle_s, conn.close)  # not kept for ever
        idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        if conn.idle_timer is not None:
            conn.idle_timer.cancel()
            conn.idle_timer = None
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
