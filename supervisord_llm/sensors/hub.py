"""Polls the GPU backend without ever blocking the event loop, and publishes snapshots.

Each GPU gets one daemon thread for its backend calls. A call gets `call_timeout_s`; a call
still running past that marks the GPU `unresponsive`, and nothing new is submitted for that GPU
until it returns (no pile-up of threads). Readers (status, metrics, policies) only ever see the
latest immutable `GpuSnapshot`s, with the age and error of each reading.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import GpuLostError
from .base import GpuBackend, GpuInfo, GpuReading

log = logging.getLogger(__name__)
T = TypeVar("T")


class CallThread:
    """One daemon thread that runs submitted calls in order. Daemon: a call hung in the kernel
    must not keep the process from exiting (ThreadPoolExecutor joins its threads at exit)."""

    def __init__(self, name: str) -> None:
        self._q: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None]
        self._q = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._q.put((fn, fut))
        return fut

    def close(self) -> None:
        self._q.put(None)


@dataclass(frozen=True)
class GpuSnapshot:
    info: GpuInfo
    reading: GpuReading | None  # last good reading (kept while unresponsive, for display)
    read_at: float | None  # monotonic time of `reading`
    status: str  # ok | lost | unresponsive | error | unknown
    error: str | None
    power_limit_w: float | None

    def age_s(self, now: float) -> float | None:
        return None if self.read_at is None else now - self.read_at


class GpuHub:
    def __init__(
        self,
        backend: GpuBackend,
        gpus: list[GpuInfo],
        poll_interval_s: float,
        call_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.gpus = list(gpus)
        self.poll_interval_s = poll_interval_s
        self.call_timeout_s = call_timeout_s
        self._clock = clock
        self._threads = {g.uuid: CallThread(f"gpu{g.index}") for g in self.gpus}
        self._pending: dict[str, tuple[float, concurrent.futures.Future[GpuReading]]] = {}
        self._snapshots: dict[str, GpuSnapshot] = {
            g.uuid: GpuSnapshot(g, None, None, "unknown", None, g.default_power_limit_w)
            for g in self.gpus
        }
        self.errors_total: dict[str, int] = {}
        self._listeners: list[Callable[[], None]] = []

    def snapshots(self) -> tuple[GpuSnapshot, ...]:
        return tuple(self._snapshots[g.uuid] for g in self.gpus)

    def on_update(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    def _count_error(self, sensor: str) -> None:
        self.errors_total[sensor] = self.errors_total.get(sensor, 0) + 1

    async def poll_once(self) -> None:
        now = self._clock()
        waits: dict[str, asyncio.Future[GpuReading]] = {}
        for gpu in self.gpus:
            pending = self._pending.get(gpu.uuid)
            if pending is not None:
                started, fut = pending
                if not fut.done():
                    if now - started > self.call_timeout_s:
                        self._set(gpu, status="unresponsive",
                                  error=f"sensor call running for {now - started:.1f} s")
                    continue  # never pile up calls behind a hung one
                self._pending.pop(gpu.uuid)
                self._absorb(gpu, fut, now)
                continue
            fut = self._threads[gpu.uuid].submit(functools.partial(self.backend.read, gpu))
            self._pending[gpu.uuid] = (now, fut)
            waits[gpu.uuid] = asyncio.wrap_future(fut)
        if waits:
            await asyncio.wait(waits.values(), timeout=self.call_timeout_s)
        now = self._clock()
        for gpu in self.gpus:
            pending = self._pending.get(gpu.uuid)
            if pending is None:
                continue
            started, fut = pending
            if fut.done():
                self._pending.pop(gpu.uuid)
                self._absorb(gpu, fut, now)
            elif now - started >= self.call_timeout_s:
                self._count_error("gpu_timeout")
                self._set(gpu, status="unresponsive",
                          error=f"sensor call did not return within {self.call_timeout_s:g} s")
        for fn in self._listeners:
            fn()

    def _absorb(self, gpu: GpuInfo, fut: concurrent.futures.Future[GpuReading],
                now: float) -> None:
        exc = fut.exception()
        if exc is None:
            reading = fut.result()
            self._snapshots[gpu.uuid] = GpuSnapshot(
                gpu, reading, now, "ok", None,
                reading.power_limit_w if reading.power_limit_w is not None
                else self._snapshots[gpu.uuid].power_limit_w,
            )
            return
        if isinstance(exc, GpuLostError):
            self._count_error("gpu_lost")
            self._set(gpu, status="lost", error=str(exc))
        else:
            self._count_error("gpu")
            self._set(gpu, status="error", error=f"{type(exc).__name__}: {exc}")

    def _set(self, gpu: GpuInfo, status: str, error: str) -> None:
        old = self._snapshots[gpu.uuid]
        if old.status != status:
            log.warning("GPU%d %s: %s", gpu.index, status, error)
        self._snapshots[gpu.uuid] = GpuSnapshot(
            gpu, old.reading, old.read_at, status, error, old.power_limit_w
        )

    async def run(self) -> None:
        while True:
            started = self._clock()
            await self.poll_once()
            await asyncio.sleep(max(0.0, self.poll_interval_s - (self._clock() - started)))

    def close(self) -> None:
        for thread in self._threads.values():
            thread.close()
        try:
            self.backend.close()
        except Exception as exc:
            log.warning("closing GPU backend %s: %s", self.backend.name, exc)
