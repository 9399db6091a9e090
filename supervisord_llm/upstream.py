"""The gate's upstream HTTP/1.1 client: keep-alive connections per backend, and a response
body that is passed to the client from `data_received`, without a task wake-up per chunk and
without re-chunking (a chunked upstream body is forwarded frame by frame as it arrives; only
its terminating chunk is held back, for the downstream writer to write its own).

It speaks exactly what the gate needs: one request at a time per connection, `Content-Length`,
chunked or close-delimited responses, a request body streamed with the client's framing.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from dataclasses import dataclass

MAX_HEAD = 64 * 1024
HIGH_WATER = 256 * 1024  # downstream buffer above which the upstream is paused


class UpstreamError(Exception):
    """The upstream failed (refused, reset, closed early, spoke nonsense)."""


@dataclass
class Head:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    framing: str  # length | chunked | close | none
    length: int = 0
    keep_alive: bool = True


@dataclass
class Body:
    """Where the body goes: `write` for raw bytes, `done` at the end (error or None)."""

    write: Callable[[bytes], None]
    done: Callable[[Exception | None], None]


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, release: Callable[[UpstreamProtocol], None]) -> None:
        self._release = release
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._head_fut: asyncio.Future[Head] | None = None
        self._buf = bytearray()
        self._head: Head | None = None
        self._body: Body | None = None
        self._left = 0  # bytes of the current length body or chunk (+CRLF) still to pass on
        self._line = bytearray()  # a partial chunk-size line, held back
        self._trailers = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.boundary = True  # the downstream has received only whole chunk frames
        self.idle_since = 0.0
        self.reused = False
        self._pending = b""  # body bytes that came before start_body

    # --- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
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
        if self._head is None:
            if self._head_fut is None:
                self._abort(UpstreamError("data from an idle upstream connection"))
                return
            self._buf += data
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD:
                    self._abort(UpstreamError("response head too large"))
                return
            try:
                head = _parse_head(bytes(self._buf[:end]))
            except ValueError as exc:
                self._abort(UpstreamError(str(exc)))
                return
            rest = bytes(self._buf[end + 4:])
            self._buf.clear()
            if 100 <= head.status < 200:  # an interim response (100 Continue, 103): skip it
                if rest:
                    self.data_received(rest)
                return
            self._head = head
            self._left = head.length if head.framing == "length" else 0
            if not self._head_fut.done():
                self._head_fut.set_result(head)
            if rest:
                self._pending = rest
            return
        self._feed(data)

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        err = UpstreamError(f"upstream closed the connection{f': {exc}' if exc else ''}")
        if self._head_fut is not None and not self._head_fut.done():
            self._head_fut.set_exception(err)
        elif self._body is not None:
            body, self._body = self._body, None
            if self._head is not None and self._head.framing == "close":
                body.done(None)  # a close-delimited body ends here
            else:
                body.done(err)
        self._can_write.set()
        self._release(self)

    # --- the request ------------------------------------------------------------------------

    def send_head(self, head: bytes) -> asyncio.Future[Head]:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._head_fut = loop.create_future()
        self._head = None
        self._body = None
        self._pending = b""
        self._line.clear()
        self._trailers = False
        self.boundary = True
        self.transport.write(head)
        return self._head_fut

    async def send_body(self, data: bytes) -> None:
        assert self.transport is not None
        if self.closed:
            raise UpstreamError("upstream closed the connection during the request body")
        self.transport.write(data)
        if not self._can_write.is_set():
            await self._can_write.wait()

    def start_body(self, body: Body) -> None:
        """Pass the response body to `body` from now on."""
        head = self._head
        assert head is not None
        self._body = body
        if head.framing == "none" or (head.framing == "length" and head.length == 0):
            self._finish()
            return
        pending, self._pending = self._pending, b""
        if pending:
            self._feed(pending)

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        self._body = None
        if self.transport is not None:
            self.transport.close()

    # --- the body ----------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        head, body = self._head, self._body
        if body is None or head is None:
            self._pending += data
            return
        if head.framing == "length":
            take = data[:self._left]
            self._left -= len(take)
            body.write(take)
            if self._left == 0:
                self._finish()
            return
        if head.framing == "close":
            body.write(data)
            return
        self._feed_chunked(data, body)

    def _feed_chunked(self, data: bytes, body: Body) -> None:
        pos, n = 0, len(data)
        start = 0  # start of the bytes to pass on
        while pos < n:
            if self._left:
                take = min(self._left, n - pos)
                pos += take
                self._left -= take
                self.boundary = self._left == 0
                continue
            # at a chunk-size line (or in the trailers after the last chunk)
            nl = data.find(b"\n", pos)
            if pos > start:
                body.write(data[start:pos])
            if nl < 0:
                self._line += data[pos:]
                return
            line = bytes(self._line) + data[pos:nl + 1]
            self._line.clear()
            pos = start = nl + 1
            if self._trailers:
                if line in (b"\r\n", b"\n"):
                    self._finish()
                    return
                continue
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self._abort(UpstreamError(f"bad chunk size line {line[:40]!r}"))
                return
            if size == 0:
                self._trailers = True  # the terminating chunk is not passed on
                continue
            body.write(line)
            self.boundary = False
            self._left = size + 2
        if pos > start:
            body.write(data[start:pos])

    def _finish(self) -> None:
        body, self._body = self._body, None
        head = self._head
        if body is not None:
            body.done(None)
        self._head_fut = None
        if head is not None and head.keep_alive and not self.closed:
            self._release(self)
        else:
            self.close()

    def _abort(self, exc: Exception) -> None:
        if self._head_fut is not None and not self._head_fut.done():
            self._head_fut.set_exception(exc)
        body, self._body = self._body, None
        if body is not None:
            body.done(exc)
        if self.transport is not None:
            self.transport.abort()


def _parse_head(raw: bytes) -> Head:
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP/1.x response: {lines[0][:60]!r}")
    status = int(parts[1])
    reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
    keep = parts[0] == b"HTTP/1.1"
    headers: list[tuple[str, str]] = []
    length: int | None = None
    chunked = False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key = name.strip().decode("latin-1")
        val = value.strip().decode("latin-1")
        low = key.lower()
        if low == "content-length":
            length = int(val)
        elif low == "transfer-encoding":
            chunked = "chunked" in val.lower()
        elif low == "connection":
            tokens = {t.strip().lower() for t in val.split(",")}
            if "close" in tokens:
                keep = False
            elif "keep-alive" in tokens:
                keep = True
        headers.append((key, val))
    if status in (204, 304) or 100 <= status < 200:
        framing = "none"
    elif chunked:
        framing = "chunked"
    elif length is not None:
        framing = "length"
    else:
        framing = "close"
        keep = False
    return Head(status, reason, headers, framing, length or 0, keep)


class UpstreamPool:
    """Idle keep-alive connections per (host, port)."""

    def __init__(self, max_idle: int = 256, idle_s: float = 2.0) -> None:
        # idle_s stays under the keep-alive timeouts of the servers behind the gate (uvicorn,
        # which vLLM uses, closes idle connections after 5 s): a pooled connection is never
        # one the server is closing at that moment.
        self._idle: dict[tuple[str, int], list[UpstreamProtocol]] = {}
        self._keys: dict[UpstreamProtocol, tuple[str, int]] = {}
        self._busy: set[UpstreamProtocol] = set()
        self.max_idle = max_idle
        self.idle_s = idle_s

    async def acquire(self, host: str, port: int) -> UpstreamProtocol:
        """A connection: a recent idle one, or a new one. Second value: whether reused."""
        idle = self._idle.get((host, port))
        now = asyncio.get_running_loop().time()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.idle_s:
                self._busy.add(conn)
                conn.reused = True
                return conn
            self.discard(conn)
        loop = asyncio.get_running_loop()
        key = (host, port)
        try:
            _t, proto = await loop.create_connection(lambda: UpstreamProtocol(self._released),
                                                     host, port)
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {host}:{port}: "
                                f"{exc.strerror or exc}") from exc
        self._keys[proto] = key
        self._busy.add(proto)
        return proto

    def _released(self, conn: UpstreamProtocol) -> None:
        key = self._keys.get(conn)
        self._busy.discard(conn)
        if key is None:
            return
        idle = self._idle.setdefault(key, [])
        if conn.closed:
            self._keys.pop(conn, None)
            if conn in idle:
                idle.remove(conn)
            return
        if len(idle) >= self.max_idle:
            self._keys.pop(conn, None)
            conn.close()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        idle.append(conn)

    def discard(self, conn: UpstreamProtocol) -> None:
        """A connection in an unknown state (client went away mid-request): close it."""
        self._busy.discard(conn)
        self._keys.pop(conn, None)
        conn.close()

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        for conn in list(self._busy):
            conn.close()
        self._idle.clear()
        self._busy.clear()
