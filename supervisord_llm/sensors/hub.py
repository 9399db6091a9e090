"""Polls the GPUs without ever blocking the event loop, and publishes snapshots.

Each GPU has its own backend (a box with an NVIDIA and an AMD card has two) and its own
`SourcePoller` (sensors/poll.py): one daemon thread for all of that GPU's backend calls,
reads and `call()`s alike, serialized. A call gets `call_timeout_s`; a call still running past
that marks the GPU `unresponsive`, and nothing new is submitted for that GPU until it returns
(no pile-up of threads); the other GPUs, whatever their backend, are not held up. Readers
(status, metrics, policies) only ever see the latest immutable `GpuSnapshot`s, with the age
and error of each reading.

Health beyond heat (`read_health`: clock-event reasons, PCIe link, ECC, retired pages) is read
every `health_interval_s` (slower) in the same job as that tick's read, right after it, on the
GPU's own thread: never beside a read of the same GPU, under the same deadline and no-pile-up
rules, without a tick of its own (the reads keep their schedule, none is skipped for it, and a
`call()` such as a power limit waits for it as for a read, instead of being refused as busy).
The latest of each GPU is a `GpuHealthSnapshot` (`health_snapshots()`): a job past its deadline
makes it `unresponsive`, a lost GPU `lost`, as the reading; an error of `read_health` alone is
its own `error` and leaves the reading alone.

A reading is checked before it is published (`check_reading`, one place for every backend): a
temperature outside -40..150 C, a power or power limit below 0 or above 5000 W, a utilization
outside 0..100 %, a negative memory use (or any of them not a number) is not a reading but a
sensor fault. The read is then an error like any failed read (a SensorError with a short
message): the snapshot's status is `error`, and the thermal policy, seeing no fresh reading,
holds what it has.
"""

from __future__ import annotations

import asyncio
import functools
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ..errors import GpuLostError, SensorError
from ..ticks import sleep_to_tick
from .base import GpuBackend, GpuHealth, GpuInfo, GpuReading
from .poll import CallThread, Snapshot, SourcePoller, close_in_background, close_off_loop

__all__ = ["CallThread", "GpuHealthSnapshot", "GpuHub", "GpuSnapshot", "check_reading"]

R = TypeVar("R")

# what a sensor can truly report; beyond it the value is a fault of the sensor or driver
TEMPERATURE_RANGE_C = (-40.0, 150.0)
MAX_POWER_W = 5000.0
_TEMPERATURES = ("temperature_c", "memory_temperature_c", "hotspot_c")
_POWERS = ("power_w", "power_limit_w")


def _outside(value: object, lo: float, hi: float) -> bool:
    """Not a number within [lo, hi] (NaN and a bool are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    return not lo <= value <= hi


def check_reading(gpu: GpuInfo, reading: GpuReading) -> GpuReading:
    """`reading`, if every value is plausible; else SensorError naming the first one that is
    not (a short message: the value as %.4g, so that a huge one never makes a long line)."""
    lo, hi = TEMPERATURE_RANGE_C
    bad: tuple[str, object, str] | None = None
    for name in _TEMPERATURES:
        value = getattr(reading, name)
        if value is not None and _outside(value, lo, hi):
            bad = (name, value, f"C (outside {lo:g}..{hi:g} C)")
            break
    if bad is None:
        for name in _POWERS:
            value = getattr(reading, name)
            if value is not None and _outside(value, 0.0, MAX_POWER_W):
                bad = (name, value, f"W (outside 0..{MAX_POWER_W:g} W)")
                break
    util = reading.utilization_pct
    if bad is None and util is not None and _outside(util, 0.0, 100.0):
        bad = ("utilization_pct", util, "% (outside 0..100 %)")
    used = reading.memory_used_bytes
    if bad is None and used is not None and _outside(used, 0, math.inf):
        bad = ("memory_used_bytes", used, "B (below 0)")
    if bad is None:
        return reading
    name, value, why = bad
    shown = type(value).__name__
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            shown = f"{value:.4g}"
        except OverflowError:  # an int too large for a float
            shown = "huge"
    raise SensorError(f"GPU{gpu.index}: implausible {name} {shown} {why}")


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


@dataclass(frozen=True)
class GpuHealthSnapshot:
    """One GPU's latest health (the shape of `poll.Snapshot`, value = health). `health` is the
    last good one (kept while reading it fails, for display); `read_at` its monotonic time."""

    info: GpuInfo
    health: GpuHealth | None
    read_at: float | None
    status: str  # unknown | ok | error | lost | unresponsive
    error: str | None

    @property
    def value(self) -> GpuHealth | None:
        return self.health

    def age_s(self, now: float) -> float | None:
        return None if self.read_at is None else now - self.read_at


@dataclass(frozen=True)
class _Sample:
    """What one job on a GPU's thread returns: the reading and, when it was due, the health
    (or the error that reading it raised)."""

    reading: GpuReading
    health_tried: bool = False
    health: GpuHealth | None = None
    health_error: str | None = None


class _GpuSource:
    """One GPU as a `SyncSource` for the poller. `want_health()` (on the loop) asks for a
    health read with the next reading; the thread does it once the reading succeeded (a read
    that fails leaves it asked for)."""

    def __init__(self, backend: GpuBackend, gpu: GpuInfo) -> None:
        self.name = f"gpu{gpu.index}"
        self._backend = backend
        self._gpu = gpu
        self._lock = threading.Lock()
        self._health_wanted = False

    def want_health(self) -> None:
        with self._lock:
            self._health_wanted = True

    def read(self) -> _Sample:
        reading = check_reading(self._gpu, self._backend.read(self._gpu))
        with self._lock:
            wanted, self._health_wanted = self._health_wanted, False
        if not wanted:
            return _Sample(reading)
        try:
            health = self._backend.read_health(self._gpu)
        except GpuLostError:
            raise  # lost is lost: the reading too
        except Exception as exc:
            return _Sample(reading, True, None, f"{type(exc).__name__}: {exc}")
        return _Sample(reading, True, health)


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
        *,
        health_interval_s: float = 10.0,
    ) -> None:
        self.gpus = list(gpus)
        self.poll_interval_s = poll_interval_s
        self.call_timeout_s = call_timeout_s
        self.health_interval_s = health_interval_s
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
        self._health: dict[str, GpuHealthSnapshot] = {
            g.uuid: GpuHealthSnapshot(g, None, None, "unknown", None) for g in self.gpus
        }
        self._sources: dict[str, _GpuSource] = {}
        self._pollers: dict[str, SourcePoller[_Sample]] = {}
        for g in self.gpus:
            source = _GpuSource(self._backend_of[g.uuid], g)
            poller: SourcePoller[_Sample] = SourcePoller(
                source, poll_interval_s, call_timeout_s,
                clock=clock, sensor="gpu", label=f"GPU{g.index}", thread_name=f"gpu{g.index}",
                lost_errors=(GpuLostError,), errors_total=self.errors_total)
            poller.on_change(functools.partial(self._changed, g))
            self._sources[g.uuid] = source
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

    def health_snapshots(self) -> tuple[GpuHealthSnapshot, ...]:
        return tuple(self._health[g.uuid] for g in self.gpus)

    def on_update(self, fn: Callable[[], None]) -> None:
        """`fn()` after each poll and each call."""
        self._listeners.append(fn)

    def _changed(self, gpu: GpuInfo, snap: Snapshot[_Sample]) -> None:
        old = self._snapshots[gpu.uuid]
        sample = snap.value
        reading = None if sample is None else sample.reading
        limit = old.power_limit_w
        if snap.status == "ok" and reading is not None and reading.power_limit_w is not None:
            limit = reading.power_limit_w
        self._snapshots[gpu.uuid] = GpuSnapshot(gpu, reading, snap.read_at, snap.status,
                                                snap.error, limit)
        health = self._health[gpu.uuid]
        if snap.status == "ok" and sample is not None and sample.health_tried:
            if sample.health_error is None:
                health = GpuHealthSnapshot(gpu, sample.health, snap.read_at, "ok", None)
            else:
                self.errors_total["gpu_health"] = self.errors_total.get("gpu_health", 0) + 1
                health = GpuHealthSnapshot(gpu, health.health, health.read_at, "error",
                                           sample.health_error)
        elif snap.status in ("lost", "unresponsive"):  # the GPU's thread cannot read it either
            health = GpuHealthSnapshot(gpu, health.health, health.read_at, snap.status,
                                       snap.error)
        elif snap.status == "ok" and health.status in ("lost", "unresponsive"):
            # answering again: stale until the next health read, not lost
            health = GpuHealthSnapshot(gpu, health.health, health.read_at, "unknown", None)
        self._health[gpu.uuid] = health

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
            jobs = [(p, p.begin_poll()) for p in self._pollers.values()]
            started = {job.future for _p, job in jobs if job is not None}
            if started:  # one wait for all: no task per GPU
                await asyncio.wait(started, timeout=self.call_timeout_s)
            for poller, job in jobs:
                if job is not None:
                    poller.end_poll(job)
                poller.updated()
        finally:
            self._notify()

    async def run(self) -> None:
        """A read per GPU every `poll_interval_s`; every `health_interval_s` (from the first
        tick), that tick's jobs read the health too."""
        health_due = self._clock()
        while True:
            started = self._clock()
            if started >= health_due:
                self.want_health()
                while health_due <= started:
                    health_due += self.health_interval_s
            await self.poll_once()
            if self._clock() - started < self.poll_interval_s:
                # at the next multiple of the interval: with the health probes' ticks
                await sleep_to_tick(self.poll_interval_s)

    def want_health(self) -> None:
        """Read each GPU's health with its next reading."""
        for source in self._sources.values():
            source.want_health()

    async def poll_health_once(self) -> None:
        """`want_health()`, then `poll_once()`: a read and a health read per GPU."""
        self.want_health()
        await self.poll_once()

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
