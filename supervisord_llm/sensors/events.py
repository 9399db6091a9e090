"""GPU events: `Lost(uuid, why)` and `Back(uuid, why)`, from every source that can tell.

A failed read (`GpuLostError` in the hub) is one source of "lost". The others are events:

- NVML critical Xid events (`nvml.NvmlXidSource`, on daemon threads of its own): every Xid is
  counted per GPU (`xid_errors_total`, for `llm_supervisor_gpu_xid_errors_total{xid}`), and
  those in `reset_xids` (the GPU is gone or must be reset) make it lost; `GpuIsLost` from the
  event wait makes it lost too;
- the kernel's PCI `remove` / `add` uevents (`udev.UdevSource`, on the loop): removed is lost,
  added again is back.

`GpuEvents` merges them, and (with `hub=`) the hub's reads, into one stream delivered to one
callback on the event loop: sources on other threads hand over with `call_soon_threadsafe`.
Each transition is delivered once: a GPU already lost is not lost again (a more specific cause
replaces "a read failed" silently), one that is not lost is not back.

What brings a GPU back depends on what lost it: a read that answers again ends a loss that
only reads saw; a udev `add` (the device is on the bus again) or `probe_back(gpu)` (the host
asks; the GPU answers on its own thread within the deadline, with no memory trouble) ends any.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import SensorError
from .base import GpuBackend, GpuHealth, GpuInfo
from .hub import GpuHub, GpuSnapshot, check_reading
from .poll import close_off_loop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lost:
    uuid: str
    why: str


@dataclass(frozen=True)
class Back:
    uuid: str
    why: str


GpuEvent = Lost | Back

# Xids after which the GPU is gone or must be reset before it can be trusted again: lost.
# Source: NVIDIA's Xid catalogue (docs.nvidia.com/deploy/xid-errors, "Analyzing Xid Errors
# with the Xid Catalog", resolution buckets for A100/H100) and its GPU memory error management
# guide (row remapping). Others (13, 31, 43, 45: application faults) are only counted.
NVIDIA_RESET_XIDS: Mapping[int, str] = {
    48: "double-bit ECC error",
    63: "ECC page retirement or row remapping recorded (takes effect at the next reset)",
    64: "ECC page retirement or row remapping failed",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}

# what lost a GPU: a read (the weakest: a read that answers again ends it), or an event
_READ = "read"
_EVENT = "event"


class EventSink(Protocol):
    """What a source reports to; every method may be called from any thread."""

    def report_lost(self, uuid: str, why: str) -> None: ...

    def report_back(self, uuid: str, why: str) -> None: ...

    def report_xid(self, uuid: str, xid: int) -> None: ...


class EventSource(Protocol):
    """A source of GPU events. `start` is called on the loop and must not block; `close`
    never blocks; `join` (called off the loop) waits up to `timeout_s` for it to end."""

    name: str

    def start(self, sink: EventSink) -> None: ...

    def close(self) -> None: ...

    def join(self, timeout_s: float) -> bool: ...


@dataclass
class _State:
    lost: bool = False
    why: str = ""
    kind: str = ""  # read | event


class GpuEvents:
    """Merges GPU event sources into `on_event(Lost | Back)`, called on the loop.

    `gpus`: the inventory (events for other uuids are ignored). `sources`: `NvmlXidSource`,
    `UdevSource` or any `EventSource`. `hub`: follow its reads (a snapshot turning `lost` is
    Lost; for a loss only reads saw, an `ok` one is Back) and run `probe_back` on it.
    `reset_xids`: the Xids that make a GPU lost. Call `start()` on the loop, `await aclose()`
    before the hub's (NVML must not be shut down under a thread waiting for its events).
    """

    def __init__(
        self,
        gpus: Sequence[GpuInfo],
        on_event: Callable[[GpuEvent], None],
        *,
        hub: GpuHub | None = None,
        sources: Sequence[EventSource] = (),
        reset_xids: Mapping[int, str] = NVIDIA_RESET_XIDS,
        close_timeout_s: float = 2.0,
    ) -> None:
        self.gpus = list(gpus)
        self._on_event = on_event
        self._hub = hub
        self.sources = list(sources)
        self.reset_xids = dict(reset_xids)
        self.close_timeout_s = close_timeout_s
        self._by_uuid = {g.uuid: g for g in self.gpus}
        self._state = {g.uuid: _State() for g in self.gpus}
        # uuid -> {xid: count}, every Xid seen (for llm_supervisor_gpu_xid_errors_total)
        self.xid_errors_total: dict[str, dict[int, int]] = {g.uuid: {} for g in self.gpus}
        self._hub_seen: dict[str, GpuSnapshot] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # --- what the host uses ----------------------------------------------------------------

    def start(self) -> None:
        """Start the sources (on the running loop) and follow the hub."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        if self._hub is not None:
            self._hub.on_update(self._hub_updated)
            self._hub_updated()
        for src in self.sources:
            try:
                src.start(self)
            except Exception as exc:
                log.warning("GPU events: %s did not start: %s: %s", src.name,
                            type(exc).__name__, exc)

    def is_lost(self, uuid: str) -> bool:
        state = self._state.get(uuid)
        return state is not None and state.lost

    def lost_why(self, uuid: str) -> str | None:
        state = self._state.get(uuid)
        return state.why if state is not None and state.lost else None

    async def probe_back(self, gpu: GpuInfo) -> bool:
        """Does the GPU answer again? A read and a health read on its own thread, with the
        hub's deadline (never beside a read of it; at once False while a call on it hangs). It
        answers if both return and the health shows no memory trouble (uncorrected volatile
        ECC, a pending retirement, a failed remap: those need a reset). A lost GPU that answers
        is Back."""
        if self._hub is None:
            raise RuntimeError("probe_back needs GpuEvents(hub=...)")

        def probe(backend: GpuBackend, g: GpuInfo) -> GpuHealth:
            check_reading(g, backend.read(g))  # an implausible reading is no answer
            return backend.read_health(g)

        label = f"GPU{gpu.index}"
        try:
            health = await self._hub.call(gpu, probe)
        except SensorError as exc:
            log.info("%s re-probe: no answer: %s", label, exc)
            return False
        if health.memory_trouble:
            log.info("%s re-probe: it answers, with memory trouble (uncorrected ECC or a "
                     "retirement waiting for a reset): still lost", label)
            return False
        self._back(gpu.uuid, "re-probe: the GPU answers again")
        return True

    async def aclose(self) -> None:
        """Stop the sources and wait (off the loop) up to `close_timeout_s` for them."""
        if self._closed:
            return
        self.close()
        await asyncio.gather(*(
            close_off_loop(f"events-{src.name}",
                           functools.partial(src.join, self.close_timeout_s),
                           self.close_timeout_s)
            for src in self.sources))

    def close(self) -> None:
        """Stop the sources; never blocks. Reports after this are dropped."""
        self._closed = True
        for src in self.sources:
            try:
                src.close()
            except Exception as exc:
                log.warning("GPU events: closing %s: %s: %s", src.name,
                            type(exc).__name__, exc)

    # --- the sink (any thread) -------------------------------------------------------------

    def report_lost(self, uuid: str, why: str) -> None:
        self._hand_over(self._lost, uuid, why, _EVENT)

    def report_back(self, uuid: str, why: str) -> None:
        self._hand_over(self._back, uuid, why)

    def report_xid(self, uuid: str, xid: int) -> None:
        self._hand_over(self._xid, uuid, xid)

    def _hand_over(self, fn: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is None or self._closed:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            loop.call_soon_threadsafe(fn, *args)

    # --- on the loop -----------------------------------------------------------------------

    def _xid(self, uuid: str, xid: int) -> None:
        counts = self.xid_errors_total.get(uuid)
        if counts is None or self._closed:
            return
        counts[xid] = counts.get(xid, 0) + 1
        gpu = self._by_uuid[uuid]
        meaning = self.reset_xids.get(xid)
        if meaning is None:
            log.warning("GPU%d: Xid %d", gpu.index, xid)
            return
        self._lost(uuid, f"Xid {xid}: {meaning}", _EVENT)

    def _lost(self, uuid: str, why: str, kind: str) -> None:
        state = self._state.get(uuid)
        if state is None or self._closed:
            return
        if state.lost:
            if state.kind == _READ and kind != _READ:
                state.why, state.kind = why, kind  # a more specific cause; no new event
            return
        state.lost, state.why, state.kind = True, why, kind
        log.warning("GPU%d lost: %s", self._by_uuid[uuid].index, why)
        self._deliver(Lost(uuid, why))

    def _back(self, uuid: str, why: str) -> None:
        state = self._state.get(uuid)
        if state is None or self._closed or not state.lost:
            return
        state.lost, state.why, state.kind = False, "", ""
        if self._hub is not None:  # a read that fails from now on is a new loss
            for snap in self._hub.snapshots():
                if snap.info.uuid == uuid:
                    self._hub_seen[uuid] = snap
        log.warning("GPU%d back: %s", self._by_uuid[uuid].index, why)
        self._deliver(Back(uuid, why))

    def _deliver(self, event: GpuEvent) -> None:
        try:
            self._on_event(event)
        except Exception:
            log.exception("GPU event callback failed on %s", event)

    def _hub_updated(self) -> None:
        assert self._hub is not None
        for snap in self._hub.snapshots():
            uuid = snap.info.uuid
            if self._hub_seen.get(uuid) is snap:
                continue
            self._hub_seen[uuid] = snap
            state = self._state.get(uuid)
            if state is None:
                continue
            if snap.status == "lost":
                self._lost(uuid, f"read: {snap.error}", _READ)
            elif snap.status == "ok" and state.lost and state.kind == _READ:
                self._back(uuid, "a read answered again")
