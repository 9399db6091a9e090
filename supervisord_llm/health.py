"""HTTP health probes. A probe classifies, the service actor decides:

- `ok`: 2xx;
- `loading`: 503 (llama.cpp and vLLM answer 503 while loading weights);
- `refused`: nothing listening yet;
- `timeout`: no answer within the probe's timeout (a hung or SIGSTOPped server);
- `error`: any other status or failure.

During start-up, loading / refused / timeout mean "not yet"; afterwards every result but `ok`
is a failure.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from . import http1

log = logging.getLogger(__name__)


class ProbeKind(enum.StrEnum):
    OK = "ok"
    LOADING = "loading"
    REFUSED = "refused"
    TIMEOUT = "timeout"
    ERROR = "error"


@dataclass(frozen=True)
class ProbeResult:
    kind: ProbeKind
    detail: str

    @property
    def ok(self) -> bool:
        return self.kind is ProbeKind.OK

    @property
    def not_yet(self) -> bool:
        """What counts as 'still loading' during start-up."""
        return self.kind in (ProbeKind.LOADING, ProbeKind.REFUSED, ProbeKind.TIMEOUT)


MAX_BODY = 64 * 1024


class _Stale(Exception):
    """A kept-alive connection turned out closed before any answer: retry on a new one."""


class _ProbeConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to a health endpoint; one GET at a time, the response parsed by
    llhttp (`http1.ResponseParser`) and its body discarded."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser: http1.ResponseParser | None = None
        self._done: asyncio.Future[tuple[int, bool]] | None = None
        self._got = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get(self, request: bytes, deadline: float) -> asyncio.Future[tuple[int, bool]]:
        """Send the request; the future resolves with (status, reusable) at the response's
        end, or fails with _Stale (closed before any answer), ValueError, or TimeoutError at
        `deadline` (loop time; the connection is closed then). One timer on the loop, not a
        `timeout()` scope per probe: this is the path every probe takes."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._done = done = loop.create_future()
        self._timer = loop.call_at(deadline, self._expire)
        self._got = False
        self._body = 0
        self._parser = http1.ResponseParser(None, self._count, self._end)
        self.transport.write(request)
        return done

    def _expire(self) -> None:
        self._timer = None
        self._fail(TimeoutError())

    def _answered(self, status: int, keep: bool) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._done is not None and not self._done.done():
            self._done.set_result((status, keep))

    def _count(self, data: bytes) -> None:
        self._body += len(data)
        if self._body > MAX_BODY:  # a health endpoint that floods costs one read, not a core
            raise http1.ParseError(f"health response body larger than {MAX_BODY // 1024} KiB")

    def _end(self) -> None:
        parser = self._parser
        if parser is not None and parser.head is not None:
            self._answered(parser.head.status, parser.head.keep_alive)

    def data_received(self, data: bytes) -> None:
        self._got = True
        if self._parser is None or self._parser.done:
            self._fail(ValueError("data nobody asked for"))
            return
        try:
            self._parser.feed(data)
        except http1.ParseError as exc:
            self._fail(ValueError(str(exc)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        parser = self._parser
        head = parser.head if parser is not None else None
        if head is not None and head.framing == "close" and exc is None:
            self._answered(head.status, False)  # the body was delimited by the close
            return
        self._fail(_Stale("connection closed before the answer") if not self._got
                   else ConnectionResetError("connection closed mid-answer"))

    def _fail(self, exc: Exception) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()


def client_session(limit: int = 0) -> aiohttp.ClientSession:
    """An aiohttp client for the daemon's own requests (probes, hooks, engine metrics): no
    kept connections (servers restart under us), no cookies, `limit` connections at once
    (0: no limit)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=limit),
                                 cookie_jar=aiohttp.DummyCookieJar())


async def read_bounded(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """The whole body, or its first `limit` bytes and True when there was more (what is
    left is not read). One `content.read(n)` returns one read's worth, not the body."""
    body = bytearray()
    while len(body) <= limit:
        chunk = await resp.content.read(min(65536, limit + 1 - len(body)))
        if not chunk:
            return bytes(body), False
        body += chunk
    return bytes(body[:limit]), True


class HttpProber:
    """HTTP/1.1 GET probes. Plain `http://` URLs (loopback health endpoints, the common case)
    use a small client on an asyncio protocol that keeps one connection alive per endpoint: a
    probe then costs one write and one read instead of a TCP handshake and an aiohttp request
    (about 3x less CPU, which matters at 16 services). Responses are parsed by llhttp, like
    everything the daemon reads over HTTP. A kept connection found closed (the server was
    restarted) is retried once on a new connection, so it never counts as a failure.
    `https://` URLs go through aiohttp."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._idle: dict[tuple[str, int], _ProbeConnection] = {}
        self._targets: dict[str, tuple[str, int, bytes]] = {}

    def _target(self, url: str) -> tuple[str, int, bytes]:
        target = self._targets.get(url)
        if target is None:
            parts = urlsplit(url)
            host = parts.hostname or "127.0.0.1"
            port = parts.port or 80
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            host_header = f"[{host}]" if ":" in host else host
            request = (f"GET {path} HTTP/1.1\r\nHost: {host_header}:{port}\r\n"
                       "User-Agent: llm-supervisor\r\nAccept: */*\r\n\r\n").encode()
            target = (host, port, request)
            if len(self._targets) < 4096:
                self._targets[url] = target
        return target

    async def probe(self, url: str, timeout_s: float) -> ProbeResult:
        """One probe. A timeout that our own event loop explains (its timer fired late by
        more than half the timeout: the daemon was starved of CPU, and the answer may have
        been waiting unread) is no verdict on the server: the probe is made once more."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        result = await self._probe_once(url, timeout_s)
        late = loop.time() - t0 - timeout_s
        if result.kind is ProbeKind.TIMEOUT and late > max(0.02, timeout_s / 2):
            log.debug("health probe %s: our loop was %.3f s late; probing again", url, late)
            result = await self._probe_once(url, timeout_s)
        return result

    async def _probe_once(self, url: str, timeout_s: float) -> ProbeResult:
        if url.startswith("https://"):
            return await self._probe_aiohttp(url, timeout_s)
        try:
            host, port, request = self._target(url)
        except ValueError as exc:
            return ProbeResult(ProbeKind.ERROR, f"bad URL: {exc}")
        try:
            status = await self._get(host, port, request,
                                     asyncio.get_running_loop().time() + timeout_s)
        except TimeoutError:
            return ProbeResult(ProbeKind.TIMEOUT, f"no answer within {timeout_s:g} s")
        except ConnectionRefusedError:
            return ProbeResult(ProbeKind.REFUSED, "connection refused")
        except (OSError, ValueError, _Stale) as exc:
            detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            return ProbeResult(ProbeKind.ERROR, f"HTTP probe failed: {detail}")
        return _classify(status)

    async def _get(self, host: str, port: int, request: bytes, deadline: float) -> int:
        """The status of one GET; TimeoutError at `deadline` (loop time)."""
        key = (host, port)
        loop = asyncio.get_running_loop()
        for attempt in (0, 1):
            conn = self._idle.pop(key, None)
            reused = conn is not None and not conn.closed
            if conn is None or conn.closed:
                async with asyncio.timeout_at(deadline):
                    _t, conn = await loop.create_connection(_ProbeConnection, host, port)
            try:
                status, keep = await conn.get(request, deadline)
            except (_Stale, ConnectionError):
                conn.close()
                if reused and attempt == 0:
                    continue  # the server went away under a kept connection: try a new one
                raise
            except BaseException:
                conn.close()  # timeout or cancellation mid-request: the connection is done
                raise
            if keep and not conn.closed:
                old = self._idle.pop(key, None)
                if old is not None:
                    old.close()
                self._idle[key] = conn
            else:
                conn.close()
            return status
        raise _Stale("connection closed")  # pragma: no cover - the loop returns or raises

    async def _probe_aiohttp(self, url: str, timeout_s: float) -> ProbeResult:
        if self._session is None or self._session.closed:
            self._session = client_session()
        try:
            async with asyncio.timeout(timeout_s):
                async with self._session.get(url, allow_redirects=False) as resp:
                    await resp.read()
                    status = resp.status
        except TimeoutError:
            return ProbeResult(ProbeKind.TIMEOUT, f"no answer within {timeout_s:g} s")
        except aiohttp.ClientConnectorError as exc:
            err = exc.os_error
            if isinstance(err, ConnectionRefusedError):
                return ProbeResult(ProbeKind.REFUSED, "connection refused")
            return ProbeResult(ProbeKind.ERROR, f"cannot connect: {err.strerror or err}")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return ProbeResult(ProbeKind.ERROR, f"{type(exc).__name__}: {exc}".rstrip(": "))
        return _classify(status)

    async def close(self) -> None:
        for conn in self._idle.values():
            conn.close()
        self._idle.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None


_OK_200 = ProbeResult(ProbeKind.OK, "HTTP 200")


def _classify(status: int) -> ProbeResult:
    if status == 200:
        return _OK_200  # immutable: the one every healthy probe returns
    if 200 <= status < 300:
        return ProbeResult(ProbeKind.OK, f"HTTP {status}")
    if status == 503:
        return ProbeResult(ProbeKind.LOADING, "HTTP 503 (loading)")
    return ProbeResult(ProbeKind.ERROR, f"HTTP {status}")
