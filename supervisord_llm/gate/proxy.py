"""One gate: the state (open, draining, closed), admission, and the proxying of a request.

- `open`: requests go to the service's current instance; `draining`: some drain reason
  holds (operator, swap, thermal, power, shutdown): admitted requests run to completion, new
  ones get 503 or go to the backup; `closed`: the service is not ready (or stopped).
- A request body is read up to `BODY_BUFFER` before the request takes an admission slot, so a
  client that trickles its body holds a connection, never a slot.
- Every request is counted once in `requests` by its outcome: the status sent, 499 when the
  client went away first, 502 when the upstream failed.
- The headers of a protocol upgrade (`Upgrade`, `HTTP2-Settings`, the `Connection` tokens)
  are hop-by-hop: the request goes upstream as plain HTTP/1.1 with its body.

Every method runs on the gate loop.
"""

from __future__ import annotations

import asyncio
import bisect
import re
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

from .. import http1
from ..config import GateSection
from ..http1 import ResponseHead
from ..logs import LogLimiter
from .admission import Admission, Rejected
from .door import Door, Paths, Refusal
from .server import (
    BODY_BUFFER,
    BodyRefused,
    BodyTimeout,
    ClientConnection,
    ClientGone,
    Request,
    ResponseWriter,
)
from .upstream import UpstreamConnection, UpstreamError, UpstreamPool

# (typed: mypyc, which compiles this module, leaves a Final tuple of floats unset otherwise)
DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFB_BUCKETS: Final[tuple[float, ...]] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_EOL: Final = re.compile(rb"\r\n|\r|\n")
RATE_BUCKETS: Final[tuple[float, ...]] = (
    1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 250.0, 500.0, 1000.0)
RETRY_AFTER: Final = {"closed": b"5", "stopped": b"5", "draining": b"10", "queue_full": b"1",
                      "queue_timeout": b"1", "no_room": b"10", "cold_timeout": b"10"}
# why a gate of an on-demand service is closed when a request makes it start (or waits):
# idle (not loaded), loading (starting, or in backoff after a failed start)
COLD: Final = frozenset({"idle", "loading"})
DEMAND_EVERY_S: Final = 0.25
DRAIN_REASONS: Final = ("operator", "swap", "thermal", "power", "shutdown", "stop")
_TO_UPSTREAM_DROP: Final = frozenset({b"host", b"content-length", b"expect",
                                      b"x-forwarded-for"})
_TO_CLIENT_DROP: Final = frozenset({b"content-length"})
_UP_DROP: Final = http1.HOP_BY_HOP | _TO_UPSTREAM_DROP
_UP_DROP_AUTH: Final = _UP_DROP | {b"authorization"}  # with [auth]: our keys stay here
_DOWN_DROP: Final = http1.HOP_BY_HOP | _TO_CLIENT_DROP
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

Upstream = tuple[str, int]
_CODE_KEYS: Final = {code: str(code) for code in range(100, 600)}


class Histogram:
    """Fixed-bucket histogram, written on the gate loop and read by the metrics collector."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        # no lock (every request passes here): a reader on another thread copies the counts
        # in one step; at worst its sum is one observation apart from its counts
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self._sum += value

    def snapshot(self) -> tuple[list[tuple[str, float]], float, int]:
        """Cumulative buckets as Prometheus wants them, the sum and the count."""
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
    # event streams (SSE): to the first `data:` event (the first token), and events per second
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFB_BUCKETS))
    event_rate: Histogram = field(default_factory=lambda: Histogram(RATE_BUCKETS))

    def count(self, code: int) -> None:
        key = _CODE_KEYS.get(code) or str(code)
        self.requests[key] = self.requests.get(key, 0) + 1

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


@dataclass
class ModelStats:
    """One model's requests through the router (by status code) and time to first token."""

    requests: dict[str, int] = field(default_factory=dict)
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFB_BUCKETS))

    def count(self, code: int) -> None:
        key = str(code)
        self.requests[key] = self.requests.get(key, 0) + 1


class _Events:
    """Counts the events of an SSE body as it passes, by the SSE rules: lines end with CRLF,
    LF or CR (also when split across reads); an event is dispatched by a blank line after at
    least one `data` line. Only the first bytes of a line are kept while it is incomplete,
    so a huge event costs no memory here. `first` is when the first data line was seen (the
    first token), `last` when the last event was dispatched."""

    __slots__ = ("_cr", "_data", "_head", "_partial", "count", "first", "last")

    def __init__(self) -> None:
        self.count = 0
        self.first: float | None = None
        self.last = 0.0
        self._head = b""  # the start of the line being read (at most 5 bytes)
        self._partial = False  # a line has begun and not ended
        self._data = False  # a data line since the last dispatch
        self._cr = False  # the last read ended with CR (an LF next is the same line end)

    def feed(self, data: bytes, now: float) -> None:
        if self._cr and data.startswith(b"\n"):
            data = data[1:]
        if not data:
            return
        self._cr = data.endswith(b"\r")
        parts = _EOL.split(data)
        tail = parts.pop()
        for i, part in enumerate(parts):
            self._line(self._head + part[:5] if i == 0 and self._partial else part, now)
        if parts:
            self._head, self._partial = tail[:5], bool(tail)
        else:  # no line end in this read: the line goes on
            self._head = (self._head + tail)[:5] if self._partial else tail[:5]
            self._partial = True

    def _line(self, line: bytes, now: float) -> None:
        if not line:
            if self._data:
                self._data = False
                self.count += 1
                self.last = now
        elif line.startswith(b"data:") or line == b"data":
            self._data = True
            if self.first is None:
                self.first = now


class Gate:
    def __init__(self, name: str, cfg: GateSection, pool: UpstreamPool,
                 limiter: LogLimiter | None = None, door: Door | None = None) -> None:
        self.name = name
        self.cfg = cfg
        self.door = door if door is not None else Door()
        self.paths = Paths(cfg.allow_paths)
        self.pool = pool
        self.limiter = limiter or LogLimiter(__name__)
        self.admission = Admission(cfg.max_concurrency, cfg.max_queue, cfg.queue_timeout_s)
        self.drains: set[str] = set()
        self.upstream: Upstream | None = None
        self.backup: Upstream | None = None
        self.closed_why = "closed"  # closed | stopped | held | failed
        self.stats = GateStats()
        # the primary upstream's last sign of generating (a complete 2xx answer, or a byte of
        # one), and when (monotonic): the generation probe's evidence
        self.last_ok: tuple[Upstream, float] | None = None
        self._flows: set[_Exchange] = set()  # requests being proxied (the stall check)
        # per upstream port (monotonic): its last head or byte, and the first request sent
        # to it since then: silence is measured from the later of the two, so clients that
        # give up and retry are no progress
        self._heard: dict[int, float] = {}
        self._asked: dict[int, float] = {}
        self._idle: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        # models on demand (set by the supervisor): the service is started by a request
        self.on_demand = False
        self.startup_timeout_s = 900.0
        self.demand: Callable[[str, str | None], None] | None = None  # hops to the daemon
        # tells the daemon how many requests wait for a load (also when the last request
        # inside has its answer: an idle service may make room); hops to the daemon too
        self.report: Callable[[str, int], None] | None = None
        self.unloading = False  # retired (idle): being stopped; requests wait and re-demand
        # retiring once the requests inside are done (a drain-then-swap): new ones wait
        self.yielding = False
        self.cold_message: str | None = None  # why room cannot be made now (the swapper)
        self.active = 0  # requests inside the gate, from arrival to answer (any state)
        self.last_active = time.monotonic()  # a request arrived or ended (the idle timer)
        self._cold: list[asyncio.Future[None]] = []  # requests waiting for a cold start
        self._loading_since = 0.0
        # when the daemon was last asked to start it (reset when its state changes): asked
        # again at most every DEMAND_EVERY_S while requests come, which keeps the demand alive
        self._demanded = 0.0
        self.models: dict[str, ModelStats] = {}
        self._hosts: dict[Upstream, bytes] = {}  # the Host line for each upstream

    # --- state (called on the gate loop) ------------------------------------------------------

    @property
    def state(self) -> str:
        if self.drains:
            return "draining"
        return "closed" if self.upstream is None else "open"

    @property
    def inflight(self) -> int:
        return self.admission.inflight

    @property
    def queued(self) -> int:
        return self.admission.queued

    @property
    def limit(self) -> int:
        return self.admission.limit

    def set_upstreams(self, upstream: Upstream | None, backup: Upstream | None,
                      closed_why: str = "closed") -> None:
        """The service is ready at `upstream` (None: not ready, for `closed_why`); its backup
        at `backup`."""
        if closed_why != self.closed_why or upstream != self.upstream:
            self._demanded = 0.0
            if closed_why == "loading" and self.closed_why != "loading":
                self._loading_since = time.monotonic()
        self.upstream = upstream
        self.backup = backup
        self.closed_why = closed_why
        if upstream is not None:
            self.cold_message = None
        self._refresh()

    # --- models on demand --------------------------------------------------------------------

    def set_demand(self, on_demand: bool, startup_timeout_s: float,
                   demand: Callable[[str, str | None], None] | None,
                   report: Callable[[str, int], None] | None = None) -> None:
        self.on_demand = on_demand
        self.startup_timeout_s = startup_timeout_s
        self.demand = demand
        self.report = report
        self._wake_cold()

    def _report(self) -> None:
        if self.report is not None:
            self.report(self.name, len(self._cold))

    def retire(self, drain: bool = False) -> bool:
        """Take the gate out of service to stop an idle on-demand service: only if no
        request is inside it (nothing is cut); requests that come meanwhile wait, and ask
        for the service again. True if retired. `drain`: a drain-then-swap: from now on new
        requests wait as if it were retired (`yielding`), and it retires once the requests
        already past that wait have their answers (call again until True; `set_yielding`
        cancels)."""
        if drain and not self.unloading:
            self.yielding = True
            if self.backup is not None:  # new requests go to the backup meanwhile
                inside = self.inside(self.upstream[1]) if self.upstream else 0
            else:
                inside = self.active - len(self._cold)  # in flight, or on their way
            if inside:
                return False
            self.yielding = False
            self.unloading = True
            self._demanded = 0.0
            self._wake_cold()
            return True
        if self.active or self._cold or self.unloading or self.admission.inflight:
            return False
        self.unloading = True
        self._demanded = 0.0
        return True

    def set_unloading(self, unloading: bool) -> None:
        if unloading != self.unloading:
            self.unloading = unloading
            self._demanded = 0.0
            self._wake_cold()

    def set_yielding(self, yielding: bool) -> None:
        """A drain-then-swap called off (False): the requests that wait are served."""
        if yielding != self.yielding:
            self.yielding = yielding
            self._wake_cold()

    def set_cold_message(self, message: str | None) -> None:
        """Why the service cannot be started now (what holds the memory); None: it can."""
        self.cold_message = message
        self._wake_cold()

    def ask_again(self) -> None:
        """Requests waiting for a cold start ask for it again at once (a new daemon, which has
        not heard them yet)."""
        self._demanded = 0.0
        self._wake_cold()

    @property
    def cold_waiting(self) -> int:
        return len(self._cold)

    def _is_cold(self) -> bool:
        return self.on_demand and not self.drains and (
            self.unloading or self.yielding
            or (self.upstream is None and self.closed_why in COLD))

    def _ask(self, model: str | None) -> None:
        now = time.monotonic()
        if self.demand is not None and now - self._demanded >= DEMAND_EVERY_S and (
                self.unloading or self.closed_why == "idle"):
            self._demanded = now
            self.demand(self.name, model)

    def _wake_cold(self) -> None:
        for fut in self._cold:
            if not fut.done():
                fut.set_result(None)

    async def _wait_cold(self, model: str | None) -> str | None:
        """A request for an on-demand service that is not loaded: ask for it and wait until
        its gate opens. The wait for room is bounded by queue_timeout_s, a load by the
        service's startup_timeout_s (after room was made). None once open; else why not."""
        if len(self._cold) >= self.cfg.max_queue:
            return "queue_full"
        room_deadline = time.monotonic() + self.cfg.queue_timeout_s
        loop = asyncio.get_running_loop()
        while True:
            if not self._is_cold():
                return None if self._target() is not None else self.state
            self._ask(model)
            deadline = room_deadline
            if self.closed_why == "loading" and not self.unloading:
                deadline = max(deadline, self._loading_since + self.startup_timeout_s)
            left = deadline - time.monotonic()
            if left <= 0:
                loading = self.closed_why == "loading" and not self.unloading
                return "cold_timeout" if loading else "no_room"
            fut: asyncio.Future[None] = loop.create_future()
            self._cold.append(fut)
            self._report()
            try:
                async with asyncio.timeout(left):
                    await fut
            except TimeoutError:
                pass
            finally:
                self._cold.remove(fut)
                self._report()

    def drain(self, reason: str = "operator") -> None:
        self.drains.add(reason)
        self._refresh()

    def resume(self, reason: str = "operator") -> None:
        self.drains.discard(reason)
        self._refresh()

    def reconfigure(self, cfg: GateSection) -> None:
        if cfg.allow_paths != self.cfg.allow_paths:
            self.paths = Paths(cfg.allow_paths)
        """New settings from a reload (same listen address); drain reasons and the limit
        factor stay."""
        self.cfg = cfg
        self.admission.configure(cfg.max_concurrency, cfg.max_queue, cfg.queue_timeout_s)
        self._wake_idle()

    def set_limit_factor(self, factor: float) -> None:
        self.admission.set_factor(factor)
        self._wake_idle()

    def _refresh(self) -> None:
        if self.state != "open":
            # queued requests were never admitted: they re-decide (backup, or 503) now
            self.admission.reject_waiting(self.state)
        self._wake_idle()
        self._wake_cold()

    def inside(self, port: int) -> int:
        """Requests being proxied to the upstream on `port` (counted when asked: a drain or an
        idle check, not every request)."""
        n = 0
        for f in self._flows:
            if f.target[1] == port:
                n += 1
        return n

    def is_idle(self) -> bool:
        return self.inflight == 0 and not self._cold

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
        if not self._idle:
            return
        for predicate, fut in list(self._idle):
            if not fut.done() and predicate():
                fut.set_result(None)

    def count(self, code: int) -> None:
        self.stats.count(code)

    # --- a request -----------------------------------------------------------------------------

    def _target(self) -> Upstream | None:
        if self.state == "open" and self.upstream is not None and not self.unloading \
                and not (self.yielding and self.backup is not None):
            return self.upstream
        return self.backup

    def begin(self, req: Request, conn: ClientConnection,
              model: str | None = None) -> Coroutine[Any, Any, bool] | None:
        """Answer one request (`model`: the one the router found in it). The common case
        (the whole body here, the gate open or a backup up, a free slot) goes on at once,
        driven by callbacks (no task): None, and `conn.finished` is called at its end.
        Anything that must wait (a cold start, the body, the queue) is the coroutine
        returned, to run as a task: True at its end if the connection may serve another."""
        ticket = req.ticket
        if ticket is not None:
            ticket.service = self.name
        admission = self.admission
        if not req.body.complete or admission._queue or admission.inflight >= admission.limit:
            return self.handle(req, conn, model)
        target = self.upstream
        if target is None or self.drains or self.on_demand or self.unloading or self.yielding:
            cold = self._is_cold()  # (the plain case is above: open, always loaded)
            if cold and self.backup is None:
                return self.handle(req, conn, model)
            target = self._target()
            if target is None:
                return self.handle(req, conn, model)
            if cold:
                self._ask(model)  # the backup serves meanwhile; the model loads
        admission.inflight += 1
        started = time.perf_counter()
        self.active += 1
        now = self.last_active = time.monotonic()
        ex = _Exchange(self, req, conn, writer=ResponseWriter(conn, req), target=target,
                       started=started, now=now, waited=0.0,
                       stats=self._model_stats(model), fut=None)
        conn.on_gone = ex
        try:
            ex.start()
        except Exception:
            ex._crash()
        return None

    def _model_stats(self, model: str | None) -> ModelStats | None:
        if model is None:
            return None
        stats = self.models.get(model)
        if stats is None:
            stats = self.models[model] = ModelStats()
        return stats

    def _ended(self, code: int, started: float, stats: ModelStats | None, req: Request,
               conn: ClientConnection) -> None:
        """A request is out of the gate (answered, refused, or its client gone)."""
        ticket = req.ticket
        if ticket is not None:
            ticket.close(code, req.body.received, conn.sent)
        self.active -= 1
        self.last_active = time.monotonic()
        if not self.active and self.on_demand:
            self._report()  # idle now: it may make room, its idle timer runs
        self.stats.count(code)
        if stats is not None:
            stats.count(code)
        self.stats.duration.observe(time.perf_counter() - started)

    async def handle(self, req: Request, conn: ClientConnection,
                     model: str | None = None) -> bool:
        """Answer one request the slow way (see `begin`); True if the connection may serve
        another."""
        started = time.perf_counter()
        writer = ResponseWriter(conn, req)
        code = 499
        ticket = req.ticket
        if ticket is not None:
            ticket.service = self.name
        self.active += 1
        self.last_active = time.monotonic()
        stats = self._model_stats(model)
        try:
            code = await self._serve(req, conn, writer, started, stats=stats, model=model)
        except (ClientGone, asyncio.CancelledError):
            code = 499  # the client went away
        except BodyTimeout as slow:  # (a name per except: mypyc types it once)
            code = 408
            self.limiter.info("body_timeout", "%s gate: %s: %s", self.name,
                              conn.peer or "?", slow)
            if not writer.started:
                writer.simple(408, http1.error_body(str(slow), "invalid_request_error",
                                                    "request_timeout"))
            return False
        except BodyRefused as refused:
            # a bad chunk size, or the router's check of the body: the upstream (if it was
            # reached) never got the whole body, and its connection is closed
            code = refused.status
            self.stats.reject(refused.code)
            if not writer.started:
                kind = "invalid_request_error" if refused.status < 500 else "server_error"
                writer.simple(refused.status, http1.error_body(refused.message, kind,
                                                               refused.code))
            return False
        finally:
            self._ended(code, started, stats, req, conn)
        return writer.finished and writer.keep_alive

    async def _serve(self, req: Request, conn: ClientConnection, writer: ResponseWriter,
                     started: float, *, stats: ModelStats | None = None,
                     model: str | None = None) -> int:
        if self._is_cold():
            if self.backup is not None:
                self._ask(model)  # the backup serves meanwhile; the model loads
            else:
                why = await self._wait_cold(model)
                if why is not None:
                    return self._reject(writer, 429 if why == "queue_full" else 503, why)
        if self._target() is None:  # closed or draining, no backup: answer before the body
            return self._reject(writer, 503, self.state)
        if req.expect_continue and not req.body.complete:
            conn.write(_CONTINUE)
        await req.body.fill(BODY_BUFFER, self.cfg.body_timeout_s)
        for _ in range(3):
            target = self._target()
            if target is None:
                return self._reject(writer, 503, self.state)
            try:
                await self.admission.acquire()
            except Rejected as rejected:  # (a name per except: mypyc types it once)
                if rejected.reason in ("queue_full", "queue_timeout"):
                    return self._reject(writer, 429, rejected.reason)
                continue  # drained or closed while queued: decide again (backup, or 503)
            break
        else:
            return self._reject(writer, 503, self.state)
        target = self._target()
        if target is None:  # the state changed while this request waited
            self.admission.release()
            self._wake_idle()
            return self._reject(writer, 503, self.state)
        # the exchange holds the slot from here, and gives it back at its end
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        ex = _Exchange(self, req, conn, writer=writer, target=target, started=started,
                       now=time.monotonic(), waited=max(0.0, time.perf_counter() - started),
                       stats=stats, fut=fut)
        try:
            if ex.held is not None:
                ex.start()
            else:
                try:
                    up = await self.pool.acquire(*target)
                except UpstreamError as exc:
                    ex.failed(exc)
                else:
                    ex.go(up)
                    await ex.send_body()
            return await fut
        except BaseException:
            ex.abandon()  # the client left, or its body failed: the exchange ends here
            raise

    def _reject(self, writer: ResponseWriter, status: int, reason: str) -> int:
        self.stats.reject(reason)
        closed = {
            "closed": f"{self.name} is not ready (starting or restarting); retry shortly",
            "stopped": f"{self.name} is stopped",
            "held": f"{self.name} is held down (`llmctl status {self.name}` says why)",
            "failed": f"{self.name} has failed (`llmctl status {self.name}` says why)",
        }
        messages = {
            "closed": closed.get(self.closed_why, closed["closed"]),
            "no_room": self.cold_message or f"{self.name} could not be loaded in time: its "
                       "GPUs have no room (`llmctl status` shows what holds them)",
            "cold_timeout": f"{self.name} is still loading; retry shortly",
            "draining": f"{self.name} is draining and takes no new requests",
            "queue_full": f"{self.name} is at capacity; retry shortly",
            "queue_timeout": f"{self.name} is at capacity and the request waited too long",
        }
        kind = "rate_limit_error" if status == 429 else "service_unavailable"
        writer.simple(status, http1.error_body(messages.get(reason, reason), kind, reason),
                      [(b"Retry-After", RETRY_AFTER.get(reason, b"5"))])
        return status

    def _request_head(self, req: Request, conn: ClientConnection, target: Upstream,
                      length: int | None) -> bytes:
        host = self._hosts.get(target)
        if host is None:
            host = self._hosts[target] = b"Host: %s:%d" % (target[0].encode(), target[1])
            if len(self._hosts) > 8:  # instances come and go: keep a few
                self._hosts = {target: host}
        lines = [req.method + b" " + req.target + b" HTTP/1.1", host]
        prior = b""
        drop = _UP_DROP_AUTH if self.door.auth else _UP_DROP
        for k, v in req.headers:
            name = k.lower()
            if name in drop:
                if name == b"x-forwarded-for":
                    prior = prior + b", " + v if prior else v
                elif name == b"connection":  # (rare) what it names is hop-by-hop too
                    return self._request_head_named(req, conn, lines[:2], length)
                continue
            lines.append(k + b": " + v)
        return self._head_end(req, conn, lines, prior, length)

    def _request_head_named(self, req: Request, conn: ClientConnection, lines: list[bytes],
                            length: int | None) -> bytes:
        """`_request_head` for a request whose `Connection` names headers (`lines`: the
        request line and the Host line)."""
        drop = _TO_UPSTREAM_DROP | {b"authorization"} if self.door.auth else _TO_UPSTREAM_DROP
        lines += [k + b": " + v for k, v in http1.end_to_end(req.headers, drop)]
        prior = b", ".join([v for k, v in req.headers if k.lower() == b"x-forwarded-for"])
        return self._head_end(req, conn, lines, prior, length)

    @staticmethod
    def _head_end(req: Request, conn: ClientConnection, lines: list[bytes], prior: bytes,
                  length: int | None) -> bytes:
        if conn.peer:
            peer = conn.peer_bytes
            lines.append(b"X-Forwarded-For: " + (prior + b", " + peer if prior else peer))
        elif prior:
            lines.append(b"X-Forwarded-For: " + prior)
        if length is not None:
            lines.append(b"Content-Length: %d" % length)
        elif req.chunked:
            lines.append(b"Transfer-Encoding: chunked")
        elif req.content_length is not None:
            lines.append(b"Content-Length: %d" % req.content_length)
        lines.append(b"\r\n")
        return b"\r\n".join(lines)

    async def _send_body(self, req: Request, up: UpstreamConnection) -> None:
        """Stream a body that did not fit the buffer: as the client sends it."""
        timeout = self.cfg.body_timeout_s
        data = req.body.take()
        while data:
            await up.send(http1.chunk(data) if req.chunked else data)
            data = await req.body.read(timeout)
        if req.chunked:
            await up.send(http1.LAST_CHUNK)

    def stalled_for(self, port: int) -> float | None:
        """With requests in flight to the upstream on `port`: how long it has sent nothing
        (no head, no byte) on any request, counted from the first request since it last did
        (new requests from clients that gave up are no progress); 0 while one waits on its
        client (paused: the client does not read); None when none is in flight. On the
        gate's loop."""
        flows = [f for f in self._flows if f.target[1] == port and f.post]
        if not flows:
            return None
        if any(f.paused for f in flows):
            return 0.0
        # since the server last sent anything on any request, or since it had requests at
        # all: clients that give up and retry make new requests, not progress
        since = max(self._asked.get(port, 0.0), self._heard.get(port, 0.0))
        return time.monotonic() - since

    def _bad_gateway(self, writer: ResponseWriter, target: Upstream, exc: Exception) -> int:
        ticket = writer.req.ticket
        if ticket is not None:
            ticket.end = "error"
        self.limiter.warning("upstream_error", "%s gate: upstream %s:%d failed: %s",
                             self.name, target[0], target[1], exc)
        self.stats.reject("upstream_error")
        writer.simple(502, http1.error_body(
            f"{self.name}: the model server did not answer properly ({exc})", "server_error",
            "upstream_error"))
        return 502

    def _cut(self, conn: ClientConnection, writer: ResponseWriter, exc: Exception) -> None:
        """The backend failed after the response started: tell the client as well as we can.
        An event stream ends with an error event; any other body is cut off, so that it
        cannot look complete."""
        self.limiter.warning("upstream_cut", "%s gate: upstream ended mid-response: %s",
                             self.name, exc)
        ticket = writer.req.ticket
        if ticket is not None:
            ticket.end = "cut"
        self.stats.reject("upstream_cut")
        if writer.event_stream and (writer.chunked or not writer.keep_alive):
            event = http1.error_body(f"{self.name}: the model server stopped mid-stream",
                                     "server_error", "upstream_cut")
            sep = b"" if writer.sent_body.endswith(b"\n\n") or not writer.sent_body else b"\n\n"
            writer.write(sep + b"data: " + event + b"\n\n")
            writer.finish()
            # a chunked stream ended cleanly: the client's connection is sound and was told
            # keep-alive in the head; closing it now would fail the client's next request on
            # it before that request is even read
            return
        conn.abort()


def answer_refusal(writer: ResponseWriter, refusal: Refusal, conn: ClientConnection) -> bool:
    """The door's own answer (401, 404, 429): written, its ticket closed; True if the
    connection may serve another request."""
    req = writer.req
    ticket = req.ticket
    if ticket is not None:
        ticket.end = refusal.end
    writer.simple(refusal.status, http1.error_body(refusal.message, refusal.kind, refusal.code),
                  refusal.headers)
    if ticket is not None:
        ticket.close(refusal.status, req.body.received, conn.sent)
    return writer.keep_alive and req.body.complete


class GateEntry:
    """The `Handler` of a gate's own listener: the door (paths, keys, limits), then the
    gate."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.name = gate.name
        self.limiter = gate.limiter

    @property
    def cfg(self) -> GateSection:
        return self.gate.cfg

    def count(self, code: int) -> None:
        self.gate.stats.count(code)

    def begin(self, req: Request, conn: ClientConnection
              ) -> Coroutine[Any, Any, bool] | None:
        gate = self.gate
        door = gate.door
        refusal = door.enter(req, conn, gate.paths)
        if refusal is None:
            ticket = req.ticket
            key = ticket.key if ticket is not None else None
            if key is None or key.may_use_any(door.models_of(gate.name)):
                return gate.begin(req, conn)
            key.reject("model_not_found")
            refusal = Refusal(404, "model_not_found", f"{gate.name} does not exist",
                              "refused", [])
        if refusal.status >= 400:
            gate.stats.reject(refusal.code)
        gate.stats.count(refusal.status)
        conn.finished(answer_refusal(ResponseWriter(conn, req), refusal, conn))
        return None


def _client_lines(headers: http1.Headers) -> tuple[list[bytes], bytes]:
    """A response's header lines as passed on to the client, and its Content-Type."""
    lines = []
    ctype = b""
    for k, v in headers:  # (one pass: this is every response's path)
        name = k.lower()
        if name in _DOWN_DROP:
            if name == b"connection":  # (rare) what it names is hop-by-hop too
                ctype = http1.header(headers, b"content-type") or b""
                return [k + b": " + v for k, v in http1.end_to_end(
                    headers, _TO_CLIENT_DROP)], ctype
            continue
        if name == b"content-type":
            ctype = v
        lines.append(k + b": " + v)
    return lines, ctype


class _Exchange:
    """One admitted request proxied to one upstream, from the request head sent to the last
    byte of the answer, driven by the upstream connection's callbacks (`Receiver`): no task,
    no future per step. It holds the request's admission slot and gives it back at its end.

    Begun by `Gate.begin` (`fut` None: at its end the gate's count is closed and the client's
    connection told, `conn.finished`), or by the slow path (`Gate._serve`, which waits on
    `fut` for the status and closes the count itself)."""

    # what most exchanges never change (class defaults: fewer stores per request)
    up: UpstreamConnection | None = None
    attempt = 0
    sending = False  # the slow path streams the body: a head that comes waits
    head: ResponseHead | None = None
    error: UpstreamError | None = None
    connecting: asyncio.Task[None] | None = None
    done = False
    paused = False  # the client does not read: the upstream waits (no stall)
    status = 502
    generating = False
    sse: _Events | None = None

    def __init__(self, gate: Gate, req: Request, conn: ClientConnection, *,
                 writer: ResponseWriter, target: Upstream, started: float, now: float,
                 waited: float, stats: ModelStats | None,
                 fut: asyncio.Future[int] | None) -> None:
        self.gate = gate
        self.req = req
        self.conn = conn
        self.writer = writer
        self.target = target
        self.started = started  # (perf_counter) the request's arrival at the gate
        self.stats = stats
        self.fut = fut
        body = req.body
        held = self.held = body.take() if body.complete else None
        # the whole body here: sent with its length (retryable)
        self.length = len(held) if held is not None and (
            req.chunked or req.content_length is not None) else None
        method = req.method
        self.head_request = method == b"HEAD"
        self.post = post = method == b"POST"  # generation requests: the stall check counts these
        self.started_at = now  # (monotonic) when it was admitted
        self.waited = waited  # from its arrival until then
        port = target[1]
        if post and gate._asked.get(port, 0.0) <= gate._heard.get(port, 0.0):
            gate._asked[port] = now  # the first request since it last answered
        gate._flows.add(self)

    # --- the request ---------------------------------------------------------------------

    def start(self) -> None:
        """Send the request (its whole body held) on an idle connection, or a new one."""
        up = self.gate.pool.take(*self.target)
        if up is None:
            self._connect(fresh=False)
        else:
            self.go(up)

    def go(self, up: UpstreamConnection) -> None:
        self.up = up
        gate = self.gate
        up.request(gate._request_head(self.req, self.conn, self.target, self.length), self,
                   head_request=self.head_request, body=self.held)

    def _connect(self, fresh: bool) -> None:
        self.connecting = asyncio.get_running_loop().create_task(self._connecting(fresh))

    async def _connecting(self, fresh: bool) -> None:
        try:
            up = await self.gate.pool.acquire(*self.target, fresh=fresh)
        except UpstreamError as exc:
            self.connecting = None
            self.on_error(exc)
            return
        self.connecting = None
        if self.done:
            up.close()
            return
        try:
            self.go(up)
        except Exception:
            self._crash()

    async def send_body(self) -> None:
        """The slow path: stream a body that did not fit the buffer, as the client sends it
        (the client's errors out: the caller abandons the exchange)."""
        up = self.up
        assert up is not None
        self.sending = True
        try:
            await self.gate._send_body(self.req, up)
        except UpstreamError as exc:
            self.sending = False
            self.failed(self.error or exc)
            return
        except BaseException:
            self.sending = False  # (the caller abandons the exchange)
            raise
        self.sending = False
        if self.error is not None:
            self.failed(self.error)
        elif self.head is not None:
            self._respond(self.head)
        # else the head comes later (on_head)

    # --- the upstream's answer (Receiver) --------------------------------------------------

    def on_head(self, head: ResponseHead) -> None:
        if self.sending:
            self.head = head  # answered before its body was sent: after it
            return
        try:
            self._respond(head)
        except Exception:
            self._crash()

    def _respond(self, head: ResponseHead) -> None:
        gate, writer, up, target = self.gate, self.writer, self.up, self.target
        assert up is not None
        lines, ctype = _client_lines(head.headers)
        ticket = self.req.ticket
        if ticket is not None and ticket.rate is not None:
            lines += ticket.rate
        if self.head_request or head.framing == "none":
            cl = http1.header(head.headers, b"content-length") \
                if self.head_request and head.status != 204 else None  # never on a 204
            writer.start_lines(head.status, head.reason, lines, ctype,
                               int(cl) if cl is not None and cl.isdigit() else None,
                               body_allowed=False, hold=True)
        else:
            # held: it goes out with the body bytes already read (one write), or alone
            # right after start_body below
            writer.start_lines(head.status, head.reason, lines, ctype,
                               head.length if head.framing == "length" else None, hold=True)
        gate.stats.ttfb.observe(time.perf_counter() - self.started)
        self.status = head.status
        if self.post:  # a GET answered says nothing of the engine's slots
            gate._heard[target[1]] = time.monotonic()
        self.conn.on_writable = self
        # generation is a POST answered 2xx (a GET of /health or /v1/models through the gate
        # says nothing of the engine's slots)
        ok = 200 <= head.status < 300 and self.post
        self.generating = ok and target == gate.upstream
        if ticket is not None and ok:
            ticket.answer = True  # its tokens are counted at its end
            if writer.event_stream:
                self.sse = _Events()
        elif self.generating and writer.event_stream:
            self.sse = _Events()
        up.start_body(self._sink if self.post else writer.write)  # (may end it, now)
        if not self.done:
            writer.flush()  # (no body bytes yet: the head goes alone, now)
            if self.conn.writing_paused:
                self.paused = True
                up.pause()

    def _sink(self, data: bytes) -> None:
        ticket = self.req.ticket
        if ticket is not None:  # the last two reads: the `usage` is at the end
            ticket.tail0 = ticket.tail1
            ticket.tail1 = data
        now = time.monotonic()
        self.gate._heard[self.target[1]] = now
        if self.sse is not None:
            self.sse.feed(data, now)
        if self.generating:
            self.gate.last_ok = (self.target, now)  # it generates: bytes flow
        self.writer.write(data)

    def writable(self, ok: bool) -> None:
        # a client that does not read pauses the server: that is no stall
        self.paused = not ok
        up = self.up
        if up is not None:
            if ok:
                up.resume()
            else:
                up.pause()

    def on_end(self) -> None:
        self.up = None  # back in the pool, or closed
        try:
            self.writer.finish()
            gate, sse = self.gate, self.sse
            ticket = self.req.ticket
            if ticket is not None:
                ticket.end = "done"
            if sse is not None and sse.first is not None and self.generating:
                gate.stats.ttft.observe(sse.first - self.started_at)
                if self.stats is not None:  # from the request's arrival: a cold start counts
                    self.stats.ttft.observe(sse.first - self.started_at + self.waited)
                if sse.count >= 2 and sse.last > sse.first:
                    gate.stats.event_rate.observe((sse.count - 1) / (sse.last - sse.first))
            if self.generating:
                # read by the generation probe on the daemon's loop: one tuple, one store
                gate.last_ok = (self.target, time.monotonic())
        except Exception:
            self._crash()
            return
        self._end(self.status)

    def on_error(self, exc: UpstreamError) -> None:
        if self.sending:
            self.error = exc  # the sender stops at its next write, and says so
            return
        try:
            self.failed(exc)
        except Exception:
            self._crash()

    def failed(self, exc: UpstreamError) -> None:
        """The upstream failed: a request whose answer has begun is cut; one not yet
        answered is tried once more on a new connection if a kept-alive one turned out
        closed before answering anything; else 502."""
        up, self.up = self.up, None
        gate, writer = self.gate, self.writer
        if up is not None:
            up.close()
        if self.done:
            return
        if writer.started:
            gate._cut(self.conn, writer, exc)
            self._end(502)
            return
        if up is not None and up.reused and not up.got_bytes and self.held is not None \
                and self.attempt == 0:
            # a kept-alive connection the server had just closed: once more, anew
            self.attempt = 1
            self._connect(fresh=True)
            return
        self._end(gate._bad_gateway(writer, self.target, exc))

    # --- the end ---------------------------------------------------------------------------

    def abandon(self) -> None:
        """The request ends here without its answer (the client left; its body failed):
        the upstream is dropped, the slot freed."""
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        self._end(499)

    def client_gone(self) -> None:  # (`Gone`: the client's connection is lost)
        self.abandon()

    def _crash(self) -> None:
        """A bug of ours on the way: logged, the client's connection dropped."""
        self.gate.limiter.exception("handler", "%s gate: internal error handling a request",
                                    self.gate.name)
        ticket = self.req.ticket
        if ticket is not None:
            ticket.end = "error"
        if not self.done:
            self.conn.abort()
            self._end(500)

    def _end(self, code: int) -> None:
        if self.done:
            return
        self.done = True
        ticket, sse = self.req.ticket, self.sse
        if ticket is not None and sse is not None:  # (also a stream cut or left: what came)
            ticket.events = sse.count
            if sse.first is not None:
                ticket.ttft = sse.first - self.started_at + self.waited
        gate = self.gate
        up, self.up = self.up, None
        if up is not None:  # mid-request: the server must see the end of it
            up.close()
        gate._flows.discard(self)
        if len(gate._asked) > 8:  # instances come and go (swaps): keep the live ones
            live = {t[1] for t in (gate.upstream, gate.backup) if t is not None}
            live |= {f.target[1] for f in gate._flows}
            for gone in [p for p in gate._asked if p not in live]:
                gate._asked.pop(gone, None)
                gate._heard.pop(gone, None)
        gate.admission.release()
        gate._wake_idle()
        fut = self.fut
        if fut is not None:
            if not fut.done():
                fut.set_result(code)
            return
        gate._ended(code, self.started, self.stats, self.req, self.conn)
        writer = self.writer
        self.conn.finished(writer.finished and writer.keep_alive)
