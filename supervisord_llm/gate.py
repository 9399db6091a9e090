"""The request gate: a reverse proxy in front of a service's backend that knows every request
in flight, so that the supervisor can stop taking new requests without cutting any off.

All gates run on one event loop in a thread of their own (`GateHost`), so that a flood of
requests never delays the supervisor's loop (watchdog, sensor polls, health checks) by more
than the interpreter's thread switch interval. The supervisor drives them only through
`GateHost` methods, which hop onto the gate loop; it reads their counters directly (ints and
locked histograms, consistent under the GIL).

Per gate:
- states `open` (proxy to the current upstream), `draining` (the operator closed it; admitted
  requests run to completion) and `closed` (the service is not ready): new requests get 503
  at once with `Retry-After` and an OpenAI-style JSON error, or go to the backup service;
- admission: at most `max_concurrency` in flight; then a FIFO queue of `max_queue` with a
  deadline of `queue_timeout_s`; beyond the queue, 429 with `Retry-After`. The limit can be
  changed at run time;
- streaming both ways without buffering (SSE chunks are written as they arrive); a client that
  disconnects cancels the upstream request; a backend that dies mid-stream ends an SSE stream
  with an error event and any other body with a cut connection, so the client always knows.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .config import GateSection
from .errors import StartupError
from .upstream import HIGH_WATER, Body, UpstreamError, UpstreamPool, UpstreamProtocol

log = logging.getLogger(__name__)
T = TypeVar("T")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "proxy-connection",
})
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0)
TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0)
RETRY_AFTER = {"closed": "5", "draining": "10", "queue_full": "1", "queue_timeout": "1"}


class Histogram:
    """Fixed-bucket histogram, written on the gate loop and read by the metrics collector."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[tuple[str, float]], float, int]:
        """Cumulative buckets as Prometheus wants them, the sum and the count."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out, total, running


@dataclass
class GateStats:
    requests: dict[str, int] = field(default_factory=dict)  # by status code
    rejected: dict[str, int] = field(default_factory=dict)  # by reason
    duration: Histogram = field(default_factory=lambda: Histogram(DURATION_BUCKETS))
    ttfb: Histogram = field(default_factory=lambda: Histogram(TTFB_BUCKETS))

    def count(self, code: int) -> None:
        key = str(code)
        self.requests[key] = self.requests.get(key, 0) + 1

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


Upstream = tuple[str, int]


class _Rejected(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _granted(fut: asyncio.Future[None]) -> bool:
    return fut.done() and not fut.cancelled() and fut.exception() is None


def error_response(status: int, reason: str, message: str) -> web.Response:
    kind = "rate_limit_error" if status == 429 else "service_unavailable"
    body = json.dumps({"error": {"message": message, "type": kind, "code": reason}})
    headers = {"Retry-After": RETRY_AFTER.get(reason, "5"), "Cache-Control": "no-store"}
    return web.Response(status=status, text=body, content_type="application/json",
                        headers=headers)


class Gate:
    """One gate. Every method runs on the gate loop."""

    def __init__(self, name: str, cfg: GateSection, session: aiohttp.ClientSession,
                 pool: UpstreamPool | None = None) -> None:
        self.name = name
        self.cfg = cfg
        self.session = session
        self.pool = pool
        self.limit = cfg.max_concurrency
        self.max_queue = cfg.max_queue
        self.state = "closed"  # open | draining | closed
        self.drained = False  # the operator's drain: stays until resume
        self.upstream: Upstream | None = None
        self.backup: Upstream | None = None
        self.inflight = 0
        self.by_upstream: dict[Upstream, int] = {}
        self.stats = GateStats()
        self._queue: deque[asyncio.Future[None]] = deque()
        self._idle: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    # --- control (called on the gate loop) ------------------------------------------------

    def set_upstreams(self, upstream: Upstream | None, backup: Upstream | None) -> None:
        """The service is ready at `upstream` (None: not ready); its backup at `backup`."""
        self.upstream = upstream
        self.backup = backup
        self._refresh()

    def drain(self) -> None:
        self.drained = True
        self._refresh()

    def resume(self) -> None:
        self.drained = False
        self._refresh()

    def reconfigure(self, cfg: GateSection) -> None:
        """New limits from a reload (same listen address)."""
        self.cfg = cfg
        self.max_queue = cfg.max_queue
        self.set_limit(cfg.max_concurrency)

    def set_limit(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._hand_out()

    def _refresh(self) -> None:
        if self.drained:
            self.state = "draining"
        elif self.upstream is None:
            self.state = "closed"
        else:
            self.state = "open"
        if self.state != "open":
            # queued requests were never admitted: they re-decide (backup, or 503) now
            while self._queue:
                fut = self._queue.popleft()
                if not fut.done():
                    fut.set_exception(_Rejected(self.state))
        self._wake_idle()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def is_idle(self) -> bool:
        return self.inflight == 0

    async def wait_idle(self, predicate: Callable[[], bool]) -> None:
        if predicate():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (predicate, fut)
        self._idle.append(entry)
        try:
            await fut
        finally:
            if entry in self._idle:
                self._idle.remove(entry)

    def _wake_idle(self) -> None:
        for predicate, fut in list(self._idle):
            if not fut.done() and predicate():
                fut.set_result(None)

    # --- admission -------------------------------------------------------------------------

    def _target(self) -> Upstream | None:
        if self.state == "open" and self.upstream is not None:
            return self.upstream
        return self.backup

    async def _admit(self) -> None:
        """Take a slot (inflight + 1), waiting in the FIFO queue if need be."""
        if self.inflight < self.limit and not self._queue:
            self.inflight += 1
            return
        if len(self._queue) >= self.max_queue:
            raise _Rejected("queue_full")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(fut)
        try:
            async with asyncio.timeout(self.cfg.queue_timeout_s):
                await fut
        except TimeoutError:
            if _granted(fut):
                return  # the slot came just as the deadline passed: take it
            raise _Rejected("queue_timeout") from None
        except asyncio.CancelledError:
            if _granted(fut):  # the client left after being given a slot: give it back
                self._release()
            raise
        finally:
            if not fut.done():
                fut.cancel()
            with contextlib.suppress(ValueError):
                self._queue.remove(fut)

    def _release(self) -> None:
        self.inflight -= 1
        self._hand_out()

    def _hand_out(self) -> None:
        while self._queue and self.inflight < self.limit:
            fut = self._queue.popleft()
            if not fut.done():
                self.inflight += 1  # handed over: the waiter owns this slot
                fut.set_result(None)
        self._wake_idle()

    # --- the proxy ---------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        for _ in range(3):
            target = self._target()
            if target is None:
                return self._reject(503, self.state)
            try:
                await self._admit()
            except _Rejected as exc:
                if exc.reason in ("queue_full", "queue_timeout"):
                    return self._reject(429, exc.reason)
                continue  # drained or closed while queued: decide again (backup, or 503)
            break
        else:
            return self._reject(503, self.state)
        target = self._target()
        if target is None:  # the state changed while this request waited
            self._release()
            return self._reject(503, self.state)
        self.by_upstream[target] = self.by_upstream.get(target, 0) + 1
        try:
            return await self._proxy(request, target, started)
        finally:
            left = self.by_upstream[target] - 1
            if left:
                self.by_upstream[target] = left
            else:
                del self.by_upstream[target]
            self.stats.duration.observe(time.perf_counter() - started)
            self._release()

    def _reject(self, status: int, reason: str) -> web.Response:
        self.stats.reject(reason)
        self.stats.count(status)
        messages = {
            "closed": f"{self.name} is not ready (starting or restarting); retry shortly",
            "draining": f"{self.name} is draining and takes no new requests",
            "queue_full": f"{self.name} is at capacity; retry shortly",
            "queue_timeout": f"{self.name} is at capacity and the request waited too long",
        }
        return error_response(status, reason, messages.get(reason, reason))

    async def _proxy(self, request: web.Request, target: Upstream,
                     started: float) -> web.StreamResponse:
        if request.version < aiohttp.HttpVersion11 or self.pool is None:
            return await self._proxy_aiohttp(request, target, started)
        return await self._proxy_raw(request, target, started)

    def _request_head(self, request: web.Request, target: Upstream, chunked: bool) -> bytes:
        lines = [f"{request.method} {request.raw_path} HTTP/1.1",
                 f"Host: {target[0]}:{target[1]}"]
        # Expect: the gate's server side already answered "100 Continue" to the client
        drop = set(HOP_BY_HOP) | {"host", "content-length", "x-forwarded-for", "expect"}
        for value in request.headers.getall("Connection", ()):
            drop.update(v.strip().lower() for v in value.split(","))
        for key, value in request.headers.items():
            if key.lower() not in drop:
                lines.append(f"{key}: {value}")
        prior = request.headers.get("X-Forwarded-For")
        peer = request.remote
        if peer:
            lines.append(f"X-Forwarded-For: {prior}, {peer}" if prior else
                         f"X-Forwarded-For: {peer}")
        elif prior:
            lines.append(f"X-Forwarded-For: {prior}")
        if chunked:
            lines.append("Transfer-Encoding: chunked")
        elif request.content_length is not None:
            lines.append(f"Content-Length: {request.content_length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")

    async def _proxy_raw(self, request: web.Request, target: Upstream,
                         started: float) -> web.StreamResponse:
        """The fast path: our own upstream client; the response body goes from the upstream
        socket to the client's as it arrives, chunk frames passed through unchanged."""
        assert self.pool is not None
        has_body = request.body_exists
        chunked = has_body and request.content_length is None
        conn: UpstreamProtocol | None = None
        response: web.StreamResponse | None = None
        finished = False
        try:
            for attempt in (0, 1):
                conn = await self.pool.acquire(*target)
                head_fut = conn.send_head(self._request_head(request, target, chunked))
                try:
                    if has_body:
                        async for data in request.content.iter_any():
                            await conn.send_body(
                                f"{len(data):x}\r\n".encode() + data + b"\r\n"
                                if chunked else data)
                        if chunked:
                            await conn.send_body(b"0\r\n\r\n")
                    head = await head_fut
                    break
                except UpstreamError:
                    retry = conn.reused and not has_body and attempt == 0
                    self.pool.discard(conn)
                    conn = None
                    if not retry:
                        raise
            assert conn is not None
            response = web.StreamResponse(status=head.status, reason=head.reason,
                                          headers=_upstream_headers(head.headers))
            raw = head.framing in ("chunked", "length", "none")
            if head.framing == "chunked":
                response.enable_chunked_encoding()
            elif head.framing == "length":
                response.content_length = head.length
            await response.prepare(request)
            self.stats.ttfb.observe(time.perf_counter() - started)
            transport = request.transport
            loop = asyncio.get_running_loop()
            done: asyncio.Future[Exception | None] = loop.create_future()
            backlog: asyncio.Queue[bytes] = asyncio.Queue()
            pressure = asyncio.Event()
            up = conn

            def write(data: bytes) -> None:
                if not raw:
                    backlog.put_nowait(data)
                elif transport is not None and not transport.is_closing():
                    transport.write(data)
                    if transport.get_write_buffer_size() > HIGH_WATER:
                        up.pause()
                        pressure.set()

            def end(exc: Exception | None) -> None:
                if not done.done():
                    done.set_result(exc)

            conn.start_body(Body(write, end))
            exc = await self._pump(done, backlog, pressure, response, transport, up, raw)
            if exc is not None:
                await self._cut_raw(request, response, exc, up.boundary)
                return response
            finished = True
            await response.write_eof()
            self.stats.count(head.status)
            return response
        except UpstreamError as exc:
            if response is not None and response.prepared:
                await self._cut_raw(request, response, exc, conn.boundary if conn else False)
                return response
            return self._bad_gateway(target, exc)
        except ConnectionResetError:
            self.stats.count(499)  # the client went away
            return response or web.Response(status=499)
        finally:
            if conn is not None and not finished:
                self.pool.discard(conn)  # mid-request: the server must see the end of it

    async def _pump(  # noqa: PLR0917
            self, done: asyncio.Future[Exception | None], backlog: asyncio.Queue[bytes],
                    pressure: asyncio.Event, response: web.StreamResponse,
                    transport: asyncio.BaseTransport | None, up: UpstreamProtocol,
                    raw: bool) -> Exception | None:
        """Wait for the end of the body; meanwhile relieve back-pressure, or (for a body the
        client cannot get verbatim) write what the upstream sends."""
        if raw:
            while True:
                if not pressure.is_set():
                    waiter = asyncio.ensure_future(pressure.wait())
                    both: set[asyncio.Future[Any]] = {done, waiter}
                    try:
                        await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiter.cancel()  # also when the client went away (cancellation)
                if done.done():
                    return done.result()
                # the client reads slower than the server writes: wait for it to catch up
                assert isinstance(transport, asyncio.WriteTransport)
                while transport.get_write_buffer_size() > HIGH_WATER // 2:
                    if transport.is_closing():
                        raise ConnectionResetError("client went away")
                    await asyncio.sleep(0.005)
                pressure.clear()
                up.resume()
        while True:
            getter = asyncio.ensure_future(backlog.get())
            pair: set[asyncio.Future[Any]] = {done, getter}
            got = False
            try:
                await asyncio.wait(pair, return_when=asyncio.FIRST_COMPLETED)
            finally:
                got = getter.done() and not getter.cancelled()
                if not got:
                    getter.cancel()  # a cancelled Queue.get takes nothing from the queue
            if got:
                await response.write(getter.result())
                continue
            while not backlog.empty():
                await response.write(backlog.get_nowait())
            return done.result()

    async def _cut_raw(self, request: web.Request, response: web.StreamResponse,
                       exc: BaseException, at_boundary: bool) -> None:
        if at_boundary and response.headers.get("Content-Type", "").startswith(
                "text/event-stream") and response.chunked:
            log.warning("%s gate: upstream ended mid-response: %s", self.name, exc)
            self.stats.count(502)
            self.stats.reject("upstream_cut")
            event = {"error": {"message": f"{self.name}: the model server stopped mid-stream",
                               "type": "server_error", "code": "upstream_cut"}}
            data = f"data: {json.dumps(event)}\n\n".encode()
            if request.transport is not None and not request.transport.is_closing():
                request.transport.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write_eof()
            return
        await self._cut(request, response, exc)

    def _bad_gateway(self, target: Upstream, exc: BaseException) -> web.Response:
        log.warning("%s gate: upstream %s:%d failed: %s", self.name, target[0], target[1], exc)
        self.stats.count(502)
        self.stats.reject("upstream_error")
        return web.Response(status=502, content_type="application/json", text=json.dumps({
            "error": {"message": f"{self.name}: the model server did not answer "
                      f"({exc})", "type": "server_error", "code": "upstream_error"}}))

    async def _proxy_aiohttp(self, request: web.Request, target: Upstream,
                             started: float) -> web.StreamResponse:
        headers = _forward_headers(request.headers)
        peer = request.remote
        if peer:
            prior = request.headers.get("X-Forwarded-For")
            headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        path, _, query = request.raw_path.partition("?")
        url = URL.build(scheme="http", host=target[0], port=target[1], path=path,
                        query_string=query, encoded=True)
        body = request.content if request.body_exists else None
        response: web.StreamResponse | None = None
        try:
            async with self.session.request(request.method, url, headers=headers, data=body,
                                            allow_redirects=False) as up:
                response = web.StreamResponse(status=up.status, reason=up.reason,
                                              headers=_response_headers(up.headers))
                if up.content_length is not None:
                    response.content_length = up.content_length
                await response.prepare(request)
                self.stats.ttfb.observe(time.perf_counter() - started)
                chunks = up.content.iter_any().__aiter__()
                while True:
                    try:
                        chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        break
                    except (aiohttp.ClientError, OSError) as exc:
                        await self._cut(request, response, exc)
                        return response
                    await response.write(chunk)
                await response.write_eof()
                self.stats.count(up.status)
                return response
        except ConnectionResetError:
            # The client went away (writing to it failed): the upstream request is closed on
            # the way out of the `async with`, and the server stops generating.
            self.stats.count(499)
            return response or web.Response(status=499)
        except (aiohttp.ClientError, OSError) as exc:
            if response is not None and response.prepared:
                await self._cut(request, response, exc)
                return response
            return self._bad_gateway(target, exc)

    async def _cut(self, request: web.Request, response: web.StreamResponse,
                   exc: BaseException) -> None:
        """The backend died after the response started: tell the client as well as we can."""
        log.warning("%s gate: upstream ended mid-response: %s", self.name, exc)
        self.stats.count(502)
        self.stats.reject("upstream_cut")
        ctype = response.headers.get("Content-Type", "")
        if ctype.startswith("text/event-stream"):
            event = {"error": {"message": f"{self.name}: the model server stopped mid-stream",
                               "type": "server_error", "code": "upstream_cut"}}
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write(f"data: {json.dumps(event)}\n\n".encode())
                await response.write_eof()
            return
        if request.transport is not None:
            request.transport.abort()  # a cut body must not look complete


def _forward_headers(src: Any) -> CIMultiDict[str]:
    drop = set(HOP_BY_HOP)
    for value in src.getall("Connection", ()):
        drop.update(v.strip().lower() for v in value.split(","))
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in src.items():
        low = key.lower()
        if low not in drop and low != "host":
            out.add(key, value)
    return out


def _upstream_headers(src: list[tuple[str, str]]) -> CIMultiDict[str]:
    drop = set(HOP_BY_HOP) | {"content-length"}
    for key, value in src:
        if key.lower() == "connection":
            drop.update(v.strip().lower() for v in value.split(","))
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in src:
        if key.lower() not in drop:
            out.add(key, value)
    return out


def _response_headers(src: Any) -> CIMultiDict[str]:
    out = _forward_headers(src)
    out.popall("Content-Length", None)  # set from the upstream's length, if it had one
    return out


class GateHost:
    """Runs every gate on one event loop in its own thread."""

    def __init__(self) -> None:
        self.gates: dict[str, Gate] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session: aiohttp.ClientSession | None = None
        self._pool: UpstreamPool | None = None
        self._runners: dict[str, web.AppRunner] = {}
        self._ready = threading.Event()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="gate-loop", daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._ready.set()
        loop.run_forever()
        loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Run a coroutine on the gate loop; await the result from the supervisor's loop."""
        cfut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return asyncio.wrap_future(cfut)

    def call(self, fn: Callable[..., None], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    async def run(self, fn: Callable[..., None], *args: Any) -> None:
        """Like `call`, and wait until it has run on the gate loop."""

        async def step() -> None:
            fn(*args)

        await self.submit(step())

    async def add(self, name: str, cfg: GateSection) -> Gate:
        self.start()
        return await self.submit(self._add(name, cfg))

    async def _add(self, name: str, cfg: GateSection) -> Gate:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0,
                                               keepalive_timeout=30, ttl_dns_cache=None),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
            )
        if self._pool is None:
            self._pool = UpstreamPool()
        gate = Gate(name, cfg, self._session, self._pool)
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", gate.handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False,
                               handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, cfg.listen.host, cfg.listen.port, reuse_address=True,
                           backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise StartupError(f"cannot listen on {name}'s gate {cfg.listen}: "
                               f"{exc.strerror or exc}") from None
        self.gates[name] = gate
        self._runners[name] = runner
        return gate

    async def remove(self, name: str) -> None:
        await self.submit(self._remove(name))

    async def _remove(self, name: str) -> None:
        runner = self._runners.pop(name, None)
        self.gates.pop(name, None)
        if runner is not None:
            await runner.cleanup()

    async def close(self) -> None:
        if self._loop is None:
            return
        await self.submit(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5)
        self._loop = None
        self._thread = None

    async def _close(self) -> None:
        for name in list(self._runners):
            await self._remove(name)
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None
