"""Polling one sensor without ever blocking the event loop: the machinery that the GPU hub and
any other sensor (the UPS) share.

A source has a `read()`, blocking or async. A `SourcePoller` runs a blocking one on a daemon
thread of its own (an async one as a task) with a deadline of `call_timeout_s`, and keeps at
most one job outstanding: a read or a call still running past its deadline marks the source
`unresponsive`, and nothing new is started until it returns (no pile-up of threads); an async
read is cancelled at its deadline. What readers see is the latest immutable `Snapshot`: the
last good value, when it was read, a status and the error.

Statuses: `unknown` (not read yet), `ok`, `error` (the read raised), `lost` (it raised one of
the `lost_errors`: a GPU fell off the bus), `unresponsive` (past its deadline).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import queue
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast

from ..errors import SensorError
from .base import SensorBusyError, SensorTimeoutError

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
T_co = TypeVar("T_co", covariant=True)


class CallThread:
    """One daemon thread that runs submitted calls in order. Daemon: a call hung in the kernel
    must not keep the process from exiting (ThreadPoolExecutor joins its threads at exit)."""

    def __init__(self, name: str) -> None:
        self._q: queue.SimpleQueue[tuple[Callable[[], Any], _Done] | None]
        self._q = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, done = item
            if isinstance(done, concurrent.futures.Future):
                if not done.set_running_or_notify_cancel():
                    continue
                try:
                    done.set_result(fn())
                except BaseException as exc:
                    done.set_exception(exc)
                continue
            try:
                value = fn()
            except BaseException as exc:
                done(False, exc)
            else:
                done(True, value)

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._q.put((fn, fut))
        return fut

    def post(self, fn: Callable[[], Any], done: Callable[[bool, Any], None]) -> None:
        """Run `fn()`, then `done(True, result)` or `done(False, exception)`, both on this
        thread (lighter than `submit`: no future to chain to the loop's)."""
        self._q.put((fn, done))

    def close(self) -> None:
        """The thread ends after the call it is running, if any; this never waits."""
        self._q.put(None)


_Done = concurrent.futures.Future[Any] | Callable[[bool, Any], None]


class _Inbox:
    """What the sources' threads hand to the loop: the first result of a burst schedules one
    callback on the loop (one write to its self-pipe, one wake-up), which runs every result
    that arrived meanwhile. 8 GPUs read at the same tick then cost the loop one wake-up, not
    one per GPU and a chain of future callbacks each."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[Callable[..., None], tuple[Any, ...]]] = []

    def put(self, fn: Callable[..., None], *args: Any) -> None:
        """From any thread: `fn(*args)` on the loop, soon."""
        with self._lock:
            self._items.append((fn, args))
            if len(self._items) > 1:
                return  # a callback is scheduled already and has not run yet
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for it now
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for fn, args in items:
            try:
                fn(*args)
            except Exception:  # pragma: no cover - a bug; the other results still go
                log.exception("sensor result handling failed")


_INBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Inbox] = \
    weakref.WeakKeyDictionary()


def _inbox(loop: asyncio.AbstractEventLoop) -> _Inbox:
    inbox = _INBOXES.get(loop)
    if inbox is None:
        inbox = _INBOXES[loop] = _Inbox(loop)
    return inbox


class SyncSource(Protocol[T_co]):
    """A sensor whose `read()` blocks (NVML, sysfs, a file): polled on a thread of its own."""

    name: str

    def read(self) -> T_co: ...


class AsyncSource(Protocol[T_co]):
    """A sensor with an async `read()` (a NUT client): polled as a task on the loop."""

    name: str

    def read(self) -> Awaitable[T_co]: ...


@dataclass(frozen=True)
class Snapshot(Generic[T]):
    """The latest state of one source. `value` is the last good reading, kept (for display)
    while the source is in error or unresponsive; `read_at` is its monotonic time."""

    name: str
    value: T | None
    read_at: float | None
    status: str  # unknown | ok | error | lost | unresponsive
    error: str | None

    def age_s(self, now: float) -> float | None:
        return None if self.read_at is None else now - self.read_at


@dataclass(eq=False)
class _Job:
    kind: str  # read | call
    started: float
    future: asyncio.Future[Any]
    finished: float | None = None
    timed_out: bool = False


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark an abandoned job's exception as seen (no 'exception was never retrieved')."""
    if not fut.cancelled():
        fut.exception()


class SourcePoller(Generic[T]):
    """Polls one source with a deadline and publishes `Snapshot`s. `call(fn)` runs other work
    (a power limit) on the same thread, serialized with the reads, under the same rules.

    `sensor` names the error counters (`sensor`, `sensor_timeout`, `sensor_lost`) in
    `errors_total`, which several pollers may share; `label` names it in messages and logs.
    """

    def __init__(
        self,
        source: SyncSource[T] | AsyncSource[T],
        poll_interval_s: float,
        call_timeout_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sensor: str | None = None,
        label: str | None = None,
        thread_name: str | None = None,
        lost_errors: tuple[type[BaseException], ...] = (),
        errors_total: dict[str, int] | None = None,
    ) -> None:
        self.source = source
        self.name = source.name
        self.label = label or source.name
        self.sensor = sensor or source.name
        self.poll_interval_s = poll_interval_s
        self.call_timeout_s = call_timeout_s
        self._clock = clock
        self._lost_errors = lost_errors
        self.errors_total: dict[str, int] = {} if errors_total is None else errors_total
        self._async = inspect.iscoroutinefunction(source.read)
        self._thread = None if self._async else CallThread(thread_name or f"sensor-{self.name}")
        self._job: _Job | None = None
        self._call_waiting = False
        self._closed = False
        self._snap: Snapshot[T] = Snapshot(self.name, None, None, "unknown", None)
        self._change_listeners: list[Callable[[Snapshot[T]], None]] = []
        self._update_listeners: list[Callable[[], None]] = []

    # --- what readers use ------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot[T]:
        return self._snap

    def on_change(self, fn: Callable[[Snapshot[T]], None]) -> None:
        """`fn(new)` each time a new snapshot is published (on the loop, synchronously)."""
        self._change_listeners.append(fn)

    def on_update(self, fn: Callable[[], None]) -> None:
        """`fn()` after each poll."""
        self._update_listeners.append(fn)

    @property
    def busy(self) -> bool:
        """A read or call is still running (or a call is waiting for the thread)."""
        self._reap()
        return self._job is not None or self._call_waiting

    # --- polling ---------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            started = self._clock()
            await self.poll_once()
            await asyncio.sleep(max(0.0, self.poll_interval_s - (self._clock() - started)))

    async def poll_once(self) -> None:
        """Start a read unless one (or a call) is still running; wait for it up to the
        deadline. Never waits longer than `call_timeout_s`."""
        try:
            job = self.begin_poll()
            if job is not None:
                await asyncio.wait({job.future}, timeout=self.call_timeout_s)
                self.end_poll(job)
        finally:
            self.updated()

    def begin_poll(self) -> _Job | None:
        """The first half of `poll_once`, for a caller that polls several sources at once (the
        GPU hub): start a read, unless one (or a call) is still running; the job, if started.
        Its result is published as soon as it arrives; after waiting for `job.future` up to
        `call_timeout_s`, call `end_poll(job)`, then `updated()`."""
        if self._closed:
            return None
        self._reap()
        job = self._job
        if job is not None:  # never pile up behind a running job
            if self._clock() - job.started >= self.call_timeout_s:
                self._overdue(job)
            return None
        if self._call_waiting:
            return None  # a call is about to take the thread
        return self._start("read", self.source.read)

    def end_poll(self, job: _Job) -> None:
        """After the wait for `job`: still running is past its deadline."""
        self._reap()
        if self._job is job:
            self._overdue(job)

    def updated(self) -> None:
        """The end of a poll: the `on_update` listeners."""
        for fn in self._update_listeners:
            fn()

    async def call(self, fn: Callable[[], R]) -> R:
        """Run `fn()` on this source's thread once no other job is running, and return its
        result; a read in progress is waited for (up to its deadline). Raises SensorBusyError
        at once when a call is already running or waiting, or a read is past its deadline;
        SensorTimeoutError (and the source becomes `unresponsive`) when `fn` overruns the
        deadline. Errors of `fn` are raised; a `lost_errors` one also marks the source lost.
        """
        if self._async or self._thread is None:
            raise TypeError(f"{self.label}: calls need a source with a blocking read()")
        if self._closed:
            raise SensorError(f"{self.label}: closed")
        self._reap()
        job = self._job
        if self._call_waiting or (job is not None and (
                job.kind == "call" or job.timed_out
                or self._clock() - job.started >= self.call_timeout_s)):
            raise SensorBusyError(f"{self.label} busy: previous call still running")
        if job is not None:  # a read, within its deadline: let it finish first
            self._call_waiting = True
            try:
                await asyncio.wait({job.future}, timeout=max(
                    0.0, job.started + self.call_timeout_s - self._clock()))
            finally:
                self._call_waiting = False
            self._reap()
            if self._job is not None:
                self._overdue(self._job)
                raise SensorBusyError(f"{self.label} busy: previous call still running "
                                      f"(a reading past its {self.call_timeout_s:g} s deadline)")
            if self._closed:
                raise SensorError(f"{self.label}: closed")
        job = self._start("call", fn)
        await asyncio.wait({job.future}, timeout=self.call_timeout_s)
        if not job.future.done():
            self._overdue(job)
            raise SensorTimeoutError(f"{self.label} unresponsive: call did not return within "
                                     f"{self.call_timeout_s:g} s")
        self._reap()
        exc = job.future.exception()
        if exc is not None:
            if isinstance(exc, self._lost_errors):
                self._count(f"{self.sensor}_lost")
                self._set_status("lost", str(exc))
            raise exc
        return cast(R, job.future.result())

    # --- jobs ------------------------------------------------------------------------------

    def _start(self, kind: str, fn: Callable[[], Any]) -> _Job:
        if self._async:
            fut: asyncio.Future[Any] = asyncio.ensure_future(fn())
            job = _Job(kind, self._clock(), fut)

            def done(f: asyncio.Future[Any]) -> None:
                job.finished = self._clock()
                _retrieve(f)

            fut.add_done_callback(done)
        else:
            assert self._thread is not None
            loop = asyncio.get_running_loop()
            job = _Job(kind, self._clock(), loop.create_future())
            inbox = _inbox(loop)
            self._thread.post(fn, lambda ok, value: inbox.put(self._finished, job, ok, value))
        self._job = job
        return job

    def _finished(self, job: _Job, ok: bool, value: Any) -> None:
        """On the loop, a blocking job's outcome: its future resolved and, for a read, its
        result published at once (not when the poll that started it ends: one GPU that hangs
        does not hold back the readings of the others)."""
        job.finished = self._clock()
        fut = job.future
        if not fut.done():
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
                fut.exception()  # seen: a call whose caller gave up at the deadline
        if job.kind == "read":
            self._reap()

    def _reap(self) -> None:
        """Absorb the finished job, if any: a read publishes its result; a call's result went
        to its caller (or nobody, if the caller gave up at the deadline)."""
        job = self._job
        if job is None or not job.future.done():
            return
        self._job = None
        fut = job.future
        if job.kind != "read" or fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            when = job.finished if job.finished is not None else self._clock()
            if self._snap.status not in ("ok", "unknown"):
                log.info("%s ok again", self.label)
            self._publish(Snapshot(self.name, cast(T, fut.result()), when, "ok", None))
        elif isinstance(exc, self._lost_errors):
            self._count(f"{self.sensor}_lost")
            self._set_status("lost", str(exc))
        else:
            self._count(self.sensor)
            self._set_status("error", f"{type(exc).__name__}: {exc}")

    def _overdue(self, job: _Job) -> None:
        elapsed = self._clock() - job.started
        if not job.timed_out:
            job.timed_out = True
            self._count(f"{self.sensor}_timeout")
            error = f"sensor call did not return within {self.call_timeout_s:g} s"
            if self._async and job.kind == "read":
                job.future.cancel()  # an async read can be abandoned; the next poll retries
        else:
            error = f"sensor call running for {elapsed:.1f} s"
        self._set_status("unresponsive", error)

    def _count(self, key: str) -> None:
        self.errors_total[key] = self.errors_total.get(key, 0) + 1

    def _set_status(self, status: str, error: str) -> None:
        old = self._snap
        if old.status != status:
            log.warning("%s %s: %s", self.label, status, error)
        self._publish(Snapshot(self.name, old.value, old.read_at, status, error))

    def _publish(self, snap: Snapshot[T]) -> None:
        self._snap = snap
        for fn in self._change_listeners:
            fn(snap)

    # --- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop: nothing new is started; a running read is abandoned (cancelled if async).
        Never blocks."""
        self._closed = True
        job = self._job
        if job is not None and self._async and not job.future.done():
            job.future.cancel()
        if self._thread is not None:
            self._thread.close()

    async def aclose(self) -> None:
        """Let a running job finish within its deadline (not longer), stop, then close the
        source if it has a `close()` (off the loop, with the same deadline)."""
        self._closed = True
        job = self._job
        if job is not None and not job.future.done() and not self._async:
            await asyncio.wait({job.future}, timeout=max(
                0.0, job.started + self.call_timeout_s - self._clock()))
        self.close()
        closer = getattr(self.source, "close", None)
        if callable(closer):
            await close_off_loop(self.label, closer, self.call_timeout_s)


async def close_off_loop(what: str, close: Callable[[], Any], timeout_s: float) -> bool:
    """Run a blocking (or async) `close()` off the loop; wait at most `timeout_s`. A close that
    hangs (nvmlShutdown behind a GPU stuck in the kernel) is left behind on its daemon thread.
    Returns whether it finished; its errors are logged, never raised."""
    try:
        if inspect.iscoroutinefunction(close):
            await asyncio.wait_for(close(), timeout_s)
            return True
        thread = CallThread(f"close-{what}")
        fut = asyncio.wrap_future(thread.submit(close))
        fut.add_done_callback(_retrieve)
        thread.close()
        await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        return True
    except TimeoutError:
        log.warning("closing %s: did not return within %g s; left behind", what, timeout_s)
        return False
    except Exception as exc:
        log.warning("closing %s: %s: %s", what, type(exc).__name__, exc)
        return True


def close_in_background(what: str, close: Callable[[], Any]) -> None:
    """Start a blocking `close()` on a daemon thread and return at once (for a synchronous
    shutdown path that must not block the loop); errors are logged."""

    def run() -> None:
        try:
            close()
        except Exception as exc:
            log.warning("closing %s: %s: %s", what, type(exc).__name__, exc)

    threading.Thread(target=run, name=f"close-{what}", daemon=True).start()
