"""Polls the GPUs without ever blocking the event loop, and publishes snapshots.

Each GPU has its own backend (a box with an NVIDIA and an AMD card has two) and its own
`SourcePoller` (sensors/poll.py): one daemon thread for all of that GPU's backend calls,
reads and `call()`s alike, serialized. A call gets `call_timeout_s`; a call still running past
that marks the GPU `unresponsive`, and nothing new is submitted for that GPU until it returns
(no pile-up of threads); the other GPUs, whatever their backend, are not held up. Readers
(status, metrics, policies) only ever see the latest immutable `GpuSnapshot`s, with the age
and error of each reading.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ..errors import GpuLostError, SensorError
from .base import GpuBackend, GpuInfo, GpuReading
from .poll import CallThread, Snapshot, SourcePoller, close_in_background, close_off_loop

__all__ = ["CallThread", "GpuHub", "GpuSnapshot"]

R = TypeVar("R")


@dataclass(frozen=True)
class GpuSnapshot:
    """One GPU's latest state; the shape of `poll.Snapshot` (value = reading) plus the GPU."""

    info: GpuInfo
    reading: GpuReading | None  # last good reading (kept while unresponsive, for display)
    read_at: float | None  # monotonic time of `reading`
    status: str  # ok | lost | unresponsive | error | unknown
    error: str | None
    power_limit_w: float | None

    @property
    def value(self) -> GpuReading | None:
        return self.reading

    def age_s(self, now: float) -> float | None:
        return None if self.read_at is None else now - self.read_at


class _GpuSource:
    """One GPU as a `SyncSource` for the poller."""

    def __init__(self, backend: GpuBackend, gpu: GpuInfo) -> None:
        self.name = f"gpu{gpu.index}"
        self._backend = backend
        self._gpu = gpu

    def read(self) -> GpuReading:
        return self._backend.read(self._gpu)


class GpuHub:
    """`backends` is one backend for every GPU, or a mapping GPU uuid -> its backend (what
    `Discovery.backend_of` holds). `backend_names` ("nvml+amd-sysfs", "sim", "none") names
    the backends that serve a GPU."""

    def __init__(
        self,
        backends: GpuBackend | Mapping[str, GpuBackend],
        gpus: Sequence[GpuInfo],
        poll_interval_s: float,
        call_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gpus = list(gpus)
        self.poll_interval_s = poll_interval_s
        self.call_timeout_s = call_timeout_s
        self._clock = clock
        if isinstance(backends, Mapping):
            missing = [g.uuid for g in self.gpus if g.uuid not in backends]
            if missing:
                raise ValueError(f"no backend for GPU(s) {', '.join(missing)}")
            self._backend_of = {g.uuid: backends[g.uuid] for g in self.gpus}
            used = list({id(b): b for b in self._backend_of.values()}.values())
        else:
            self._backend_of = {g.uuid: backends for g in self.gpus}
            used = [backends]
        self._backends: list[GpuBackend] = used
        self.backend_names = "+".join(dict.fromkeys(b.name for b in used)) or "none"
        self.errors_total: dict[str, int] = {}
        self._by_uuid = {g.uuid: g for g in self.gpus}
        self._snapshots: dict[str, GpuSnapshot] = {
            g.uuid: GpuSnapshot(g, None, None, "unknown", None, g.default_power_limit_w)
            for g in self.gpus
        }
        self._pollers: dict[str, SourcePoller[GpuReading]] = {}
        for g in self.gpus:
            poller: SourcePoller[GpuReading] = SourcePoller(
                _GpuSource(self._backend_of[g.uuid], g), poll_interval_s, call_timeout_s,
                clock=clock, sensor="gpu", label=f"GPU{g.index}", thread_name=f"gpu{g.index}",
                lost_errors=(GpuLostError,), errors_total=self.errors_total)
            poller.on_change(functools.partial(self._changed, g))
            self._pollers[g.uuid] = poller
        self._listeners: list[Callable[[], None]] = []
        self._closed = False

    # --- what readers use ------------------------------------------------------------------

    @property
    def backends(self) -> tuple[GpuBackend, ...]:
        return tuple(self._backends)

    def backend_of(self, gpu: GpuInfo) -> GpuBackend:
        return self._backend_of[gpu.uuid]

    def snapshots(self) -> tuple[GpuSnapshot, ...]:
        return tuple(self._snapshots[g.uuid] for g in self.gpus)

    def on_update(self, fn: Callable[[], None]) -> None:
        """`fn()` after each poll and each call."""
        self._listeners.append(fn)

    def _changed(self, gpu: GpuInfo, snap: Snapshot[GpuReading]) -> None:
        old = self._snapshots[gpu.uuid]
        limit = old.power_limit_w
        if snap.status == "ok" and snap.value is not None and snap.value.power_limit_w is not None:
            limit = snap.value.power_limit_w
        self._snapshots[gpu.uuid] = GpuSnapshot(gpu, snap.value, snap.read_at, snap.status,
                                                snap.error, limit)

    def _notify(self) -> None:
        for fn in self._listeners:
            fn()

    # --- polling and calls -----------------------------------------------------------------

    async def poll_once(self) -> None:
        """One read per GPU (none for a GPU whose previous job still runs), all at once; waits
        at most `call_timeout_s`."""
        if self._closed:
            return
        try:
            await asyncio.gather(*(p.poll_once() for p in self._pollers.values()))
        finally:
            self._notify()

    async def run(self) -> None:
        while True:
            started = self._clock()
            await self.poll_once()
            await asyncio.sleep(max(0.0, self.poll_interval_s - (self._clock() - started)))

    async def call(self, gpu: GpuInfo, fn: Callable[[GpuBackend, GpuInfo], R]) -> R:
        """Run `fn(backend, gpu)` on that GPU's thread, after a read in progress, with the
        deadline `call_timeout_s`. Raises SensorBusyError at once ("GPU0 busy: previous call
        still running") while an earlier call, or a read past its deadline, still runs;
        SensorTimeoutError when `fn` overruns (the GPU becomes `unresponsive`); GpuLostError
        (the GPU becomes `lost`) and other errors of `fn` as they come."""
        poller = self._pollers.get(gpu.uuid)
        if poller is None:
            raise SensorError(f"GPU {gpu.uuid} is not one of this hub's GPUs")
        info = self._by_uuid[gpu.uuid]
        try:
            return await poller.call(functools.partial(fn, self._backend_of[gpu.uuid], info))
        finally:
            self._notify()

    async def set_power_limit(self, gpu: GpuInfo, watts: float) -> None:
        """`call()` with the backend's `set_power_limit`."""
        await self.call(gpu, lambda backend, g: backend.set_power_limit(g, watts))

    # --- closing ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop polling, let running calls finish within their deadlines, then close each
        backend (nvmlShutdown) off the loop, waiting at most `call_timeout_s` for it: a close
        stuck behind a hung GPU is left behind. Never blocks the loop."""
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(p.aclose() for p in self._pollers.values()))
        await asyncio.gather(*(close_off_loop(f"gpu-{b.name}", b.close, self.call_timeout_s)
                               for b in self._backends))

    def close(self) -> None:
        """Synchronous stop that never blocks: the backends are closed on daemon threads that
        nobody waits for (prefer `await aclose()`)."""
        if self._closed:
            return
        self._closed = True
        for p in self._pollers.values():
            p.close()
        for b in self._backends:
            close_in_background(f"gpu-{b.name}", b.close)
