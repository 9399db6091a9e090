"""NVIDIA GPUs through NVML (`nvidia-ml-py`, imported as `pynvml` by the daemon and handed
in: this module never imports it). Values come in milliwatts, and a data-centre board answers
`NotSupported` for what it does not have (fan, NUMA node in a VM, retired pages on a board that
remaps rows instead): those are None, not errors. A GPU that fell off the bus answers
`GpuIsLost`: that is `GpuLostError`.

`NvmlXidSource` watches the critical Xid events (sensors/events.py merges them with udev).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..errors import GpuLostError, SensorError
from ..topology import Topology
from .base import BackendUnavailable, GpuHealth, GpuInfo, GpuReading
from .events import EventSink

log = logging.getLogger(__name__)

NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_TEMPERATURE_GPU = 0
NVML_TEMPERATURE_THRESHOLD_SHUTDOWN = 0
NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
NVML_FI_DEV_MEMORY_TEMP = 82
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_PAGE_RETIREMENT_CAUSES = (0, 1)  # multiple single-bit errors, a double-bit error
NVML_EVENT_TYPE_XID_CRITICAL_ERROR = 0x8

# nvmlClocksEventReason* bits (the same values as the older nvmlClocksThrottleReason*), named
# as base.CLOCK_EVENTS names them; bits not listed (board limit, reliability) are not reported
CLOCK_EVENT_BITS = (
    (0x001, "gpu_idle"),
    (0x002, "applications_clocks"),
    (0x004, "sw_power_cap"),
    (0x008, "hw_slowdown"),
    (0x010, "sync_boost"),
    (0x020, "sw_thermal"),
    (0x040, "hw_thermal"),
    (0x080, "hw_power_brake"),
    (0x100, "display_clocks"),
)


def clock_event_names(mask: int) -> tuple[str, ...]:
    """The names of the clock-event reasons set in an NVML bitmask, in CLOCK_EVENTS order."""
    return tuple(name for bit, name in CLOCK_EVENT_BITS if mask & bit)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# Why nvmlInit fails on a machine without a usable NVIDIA driver: what an operator must fix.
_INIT_UNAVAILABLE = {
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML library not found (libnvidia-ml.so.1; is the NVIDIA "
                                  "driver installed?)",
    NVML_ERROR_DRIVER_NOT_LOADED: "NVIDIA driver not loaded (no nvidia kernel module)",
    NVML_ERROR_LIB_RM_VERSION_MISMATCH: "NVML library and NVIDIA kernel driver versions differ "
                                        "(driver updated without a reboot?)",
    NVML_ERROR_NO_PERMISSION: "no permission to use NVML (/dev/nvidia*)",
}


class NvmlBackend:
    name = "nvml"

    def __init__(self, nvml: Any, topology: Topology | None = None) -> None:
        self._nvml = nvml
        self._topo = topology or Topology()
        self._handles: dict[str, Any] = {}
        self._initialised = False

    def _code(self, exc: BaseException) -> int | None:
        value = getattr(exc, "value", None)
        return value if isinstance(value, int) else None

    def _optional(self, fn: Any, *args: Any) -> Any:
        """A call whose NotSupported means 'this board does not report it'."""
        try:
            return fn(*args)
        except self._nvml.NVMLError as exc:
            if self._code(exc) == NVML_ERROR_NOT_SUPPORTED:
                return None
            raise

    def discover(self) -> list[GpuInfo]:
        nv = self._nvml
        try:
            nv.nvmlInit()
        except nv.NVMLError as exc:
            code = self._code(exc)
            if code in _INIT_UNAVAILABLE:
                raise BackendUnavailable(_INIT_UNAVAILABLE[code]) from None
            raise SensorError(f"NVML: nvmlInit: {exc}") from None
        self._initialised = True
        try:
            count = nv.nvmlDeviceGetCount()
        except nv.NVMLError as exc:
            raise SensorError(f"NVML: {exc}") from None
        gpus = []
        for index in range(count):
            try:
                h = nv.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(nv.nvmlDeviceGetUUID(h))
                pci = _text(nv.nvmlDeviceGetPciInfo(h).busId)
                get_numa = getattr(nv, "nvmlDeviceGetNumaNodeId", None)
                numa = self._optional(get_numa, h) if get_numa is not None else None
                if numa is None or numa < 0:
                    numa = self._topo.pci_numa_node(pci)
                mem = nv.nvmlDeviceGetMemoryInfo(h).total
                default = self._optional(nv.nvmlDeviceGetPowerManagementDefaultLimit, h)
                limits = self._optional(nv.nvmlDeviceGetPowerManagementLimitConstraints, h)
                slowdown = self._optional(nv.nvmlDeviceGetTemperatureThreshold, h,
                                          NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)
                shutdown = self._optional(nv.nvmlDeviceGetTemperatureThreshold, h,
                                          NVML_TEMPERATURE_THRESHOLD_SHUTDOWN)
                name = _text(nv.nvmlDeviceGetName(h))
            except nv.NVMLError as exc:
                raise SensorError(f"NVML: GPU {index}: {exc}") from None
            self._handles[uuid] = h
            gpus.append(GpuInfo(
                index=index, uuid=uuid, name=name, pci_bus_id=pci, vendor="nvidia",
                numa_node=int(numa), memory_total_bytes=int(mem),
                default_power_limit_w=None if default is None else default / 1000.0,
                min_power_limit_w=None if limits is None else limits[0] / 1000.0,
                max_power_limit_w=None if limits is None else limits[1] / 1000.0,
                slowdown_c=None if slowdown is None else float(slowdown),
                shutdown_c=None if shutdown is None else float(shutdown),
            ))
        return gpus

    def read(self, gpu: GpuInfo) -> GpuReading:
        nv = self._nvml
        h = self._handles.get(gpu.uuid)
        if h is None:
            raise GpuLostError(f"GPU {gpu.uuid} is not known to NVML")
        try:
            temp = self._optional(nv.nvmlDeviceGetTemperature, h, NVML_TEMPERATURE_GPU)
            power = self._optional(nv.nvmlDeviceGetPowerUsage, h)
            # The configured limit: what the supervisor sets and restores. The enforced limit
            # follows it 50-100 ms later (measured on an H200), so reading that one right
            # after a change would show the old value.
            limit = self._optional(nv.nvmlDeviceGetPowerManagementLimit, h)
            if limit is None:
                limit = self._optional(nv.nvmlDeviceGetEnforcedPowerLimit, h)
            util = self._optional(nv.nvmlDeviceGetUtilizationRates, h)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
        except nv.NVMLError as exc:
            if self._code(exc) == NVML_ERROR_GPU_IS_LOST:
                raise GpuLostError(f"GPU {gpu.uuid} is lost: {exc}") from None
            raise SensorError(f"NVML: {exc}") from None
        return GpuReading(
            temperature_c=None if temp is None else float(temp),
            memory_temperature_c=self._memory_temperature(h),
            power_w=None if power is None else power / 1000.0,
            power_limit_w=None if limit is None else limit / 1000.0,
            utilization_pct=None if util is None else float(util.gpu),
            memory_used_bytes=int(mem.used),
        )

    def _memory_temperature(self, h: Any) -> float | None:
        """HBM temperature, a field value (boards without it: None)."""
        nv = self._nvml
        try:
            values = nv.nvmlDeviceGetFieldValues(h, [NVML_FI_DEV_MEMORY_TEMP])
        except (nv.NVMLError, AttributeError, TypeError):
            return None
        if not values or getattr(values[0], "nvmlReturn", 1) != 0:
            return None
        value = values[0].value
        for attr in ("uiVal", "ullVal", "ulVal", "sllVal", "siVal"):
            v = getattr(value, attr, None)
            if isinstance(v, int) and 0 < v < 200:
                return float(v)
        return None

    def set_power_limit(self, gpu: GpuInfo, watts: float) -> None:
        nv = self._nvml
        h = self._handles.get(gpu.uuid)
        if h is None:
            raise GpuLostError(f"GPU {gpu.uuid} is not known to NVML")
        try:
            nv.nvmlDeviceSetPowerManagementLimit(h, round(watts * 1000))
        except nv.NVMLError as exc:
            raise SensorError(f"NVML: cannot set the power limit of GPU{gpu.index} to "
                              f"{watts:g} W: {exc}") from None

    def process_memory(self, gpu: GpuInfo) -> dict[int, int] | None:
        """GPU memory per process (pid -> bytes) of the compute processes on this GPU; None
        when the driver cannot tell (a process whose figure is not available, as in some
        containers, is left out)."""
        h = self._handles.get(gpu.uuid)
        if h is None:
            return None
        try:
            procs = self._first(("nvmlDeviceGetComputeRunningProcesses_v3",
                                 "nvmlDeviceGetComputeRunningProcesses_v2",
                                 "nvmlDeviceGetComputeRunningProcesses"), h)
        except self._nvml.NVMLError:
            return None
        if procs is None:
            return None
        out: dict[int, int] = {}
        for proc in procs:
            pid, used = getattr(proc, "pid", None), getattr(proc, "usedGpuMemory", None)
            # NVML_VALUE_NOT_AVAILABLE is (unsigned long long)-1
            if isinstance(pid, int) and isinstance(used, int) and 0 <= used < 2**63:
                out[pid] = out.get(pid, 0) + used
        return out

    def handle_of(self, gpu: GpuInfo) -> Any:
        """The NVML handle of a discovered GPU (None if NVML does not know it)."""
        return self._handles.get(gpu.uuid)

    @property
    def nvml(self) -> Any:
        return self._nvml

    def _first(self, names: Sequence[str], *args: Any) -> Any:
        """The first answer of several equivalent calls: a name missing from an older
        binding, FunctionNotFound from an older driver or NotSupported tries the next; None
        when none answers."""
        nv = self._nvml
        for name in names:
            fn = getattr(nv, name, None)
            if fn is None:
                continue
            try:
                value = self._optional(fn, *args)
            except nv.NVMLError as exc:
                if self._code(exc) != NVML_ERROR_FUNCTION_NOT_FOUND:
                    raise
                continue
            if value is not None:
                return value
        return None

    def read_health(self, gpu: GpuInfo) -> GpuHealth:
        """Clock-event reasons, PCIe link (current against the most this GPU in this slot can
        do), volatile ECC totals (None when ECC is off or not supported), retired pages and
        remapped rows. NotSupported: None; GpuIsLost: GpuLostError; other errors: SensorError.
        """
        nv = self._nvml
        h = self._handles.get(gpu.uuid)
        if h is None:
            raise GpuLostError(f"GPU {gpu.uuid} is not known to NVML")
        try:
            mask = self._first(("nvmlDeviceGetCurrentClocksEventReasons",
                                "nvmlDeviceGetCurrentClocksThrottleReasons"), h)
            gen = self._first(("nvmlDeviceGetCurrPcieLinkGeneration",), h)
            # the max of this device in this slot (a Gen4 board in a Gen3 slot is not
            # degraded); the device's own max where the driver does not say
            gen_max = self._first(("nvmlDeviceGetMaxPcieLinkGeneration",
                                   "nvmlDeviceGetGpuMaxPcieLinkGeneration"), h)
            width = self._first(("nvmlDeviceGetCurrPcieLinkWidth",), h)
            width_max = self._first(("nvmlDeviceGetMaxPcieLinkWidth",), h)
            ecc_unc, ecc_corr = self._ecc(h)
            pages, pages_pending = self._retired_pages(h)
            rows = self._first(("nvmlDeviceGetRemappedRows",), h)
        except nv.NVMLError as exc:
            if self._code(exc) == NVML_ERROR_GPU_IS_LOST:
                raise GpuLostError(f"GPU {gpu.uuid} is lost: {exc}") from None
            raise SensorError(f"NVML: health of GPU{gpu.index}: {exc}") from None
        retired, pending, failed = pages, pages_pending, None
        if rows is not None:  # (correctable, uncorrectable, pending, failure occurred)
            corr, unc, rows_pending, failure = (int(v) for v in rows)
            retired = (retired or 0) + corr + unc
            pending = bool(pending) or bool(rows_pending)
            failed = bool(failure)
        return GpuHealth(
            clock_events=None if mask is None else clock_event_names(int(mask)),
            pcie_gen=_int(gen), pcie_gen_max=_int(gen_max),
            pcie_width=_int(width), pcie_width_max=_int(width_max),
            ecc_uncorrected_volatile=ecc_unc, ecc_corrected_volatile=ecc_corr,
            retired_pages=retired, retirement_pending=pending, remap_failed=failed,
        )

    def _ecc(self, h: Any) -> tuple[int | None, int | None]:
        """Volatile (since the driver loaded) uncorrected and corrected totals; None when the
        board has no ECC or it is switched off."""
        nv = self._nvml
        mode = self._first(("nvmlDeviceGetEccMode",), h)  # [current, pending]
        if mode is None or not int(mode[0]):
            return None, None
        unc = self._optional(nv.nvmlDeviceGetTotalEccErrors, h,
                             NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC)
        corr = self._optional(nv.nvmlDeviceGetTotalEccErrors, h,
                              NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_VOLATILE_ECC)
        return _int(unc), _int(corr)

    def _retired_pages(self, h: Any) -> tuple[int | None, bool | None]:
        """Dynamic page retirement (boards before Ampere; NotSupported on those that remap
        rows): pages retired for either cause, and whether one waits for a reset."""
        nv = self._nvml
        if getattr(nv, "nvmlDeviceGetRetiredPages", None) is None:
            return None, None
        total = 0
        for cause in NVML_PAGE_RETIREMENT_CAUSES:
            pages = self._first(("nvmlDeviceGetRetiredPages",), h, cause)
            if pages is None:
                return None, None
            total += len(pages)
        pending = self._first(("nvmlDeviceGetRetiredPagesPendingStatus",), h)
        return total, None if pending is None else bool(pending)

    def close(self) -> None:
        if self._initialised:
            with contextlib.suppress(self._nvml.NVMLError):
                self._nvml.nvmlShutdown()
            self._initialised = False


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


class NvmlXidSource:
    """Critical Xid events from NVML, an `events.EventSource`: one daemon thread per GPU, each
    with its own event set (so that a `GpuIsLost` from the wait names its GPU, and a wait stuck
    in the kernel holds up no other GPU), waiting `wait_ms` at a time so that `close()` ends
    it. Every Xid goes to `sink.report_xid`; `GpuIsLost` from the wait to `sink.report_lost`
    (once per streak: not again until a wait succeeds or times out). Nothing runs on the loop.

    Close it (`GpuEvents.aclose`) before the backend: nvmlShutdown under a waiting thread is
    undefined behaviour in NVML.
    """

    name = "nvml-xid"

    def __init__(self, backend: NvmlBackend, gpus: Sequence[GpuInfo], wait_ms: int = 500,
                 retry_s: float = 5.0) -> None:
        self._backend = backend
        self._nv = backend.nvml
        self._gpus = list(gpus)
        self._wait_ms = wait_ms
        self._retry_s = retry_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.registered: list[str] = []  # uuids whose Xid events are watched

    def start(self, sink: EventSink) -> None:
        for gpu in self._gpus:
            h = self._backend.handle_of(gpu)
            if h is None:
                continue
            t = threading.Thread(target=self._run, args=(gpu, h, sink),
                                 name=f"xid-gpu{gpu.index}", daemon=True)
            self._threads.append(t)
            t.start()

    def close(self) -> None:
        self._stop.set()

    def join(self, timeout_s: float) -> bool:
        """Wait (blocking) up to `timeout_s` for the threads to end; whether they all did."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _code(self, exc: BaseException) -> int | None:
        value = getattr(exc, "value", None)
        return value if isinstance(value, int) else None

    def _run(self, gpu: GpuInfo, h: Any, sink: EventSink) -> None:
        nv = self._nv
        label = f"GPU{gpu.index}"
        try:
            event_set = nv.nvmlEventSetCreate()
        except nv.NVMLError as exc:
            log.warning("%s: no Xid events (nvmlEventSetCreate: %s)", label, exc)
            return
        try:
            try:
                nv.nvmlDeviceRegisterEvents(
                    h, getattr(nv, "nvmlEventTypeXidCriticalError",
                               NVML_EVENT_TYPE_XID_CRITICAL_ERROR), event_set)
            except nv.NVMLError as exc:
                if self._code(exc) == NVML_ERROR_GPU_IS_LOST:
                    sink.report_lost(gpu.uuid, f"NVML: {label} is lost (registering Xid "
                                               "events)")
                else:
                    log.warning("%s: no Xid events (nvmlDeviceRegisterEvents: %s)", label, exc)
                return
            self.registered.append(gpu.uuid)
            self._wait_loop(gpu, event_set, sink)
        finally:
            with contextlib.suppress(nv.NVMLError):
                nv.nvmlEventSetFree(event_set)

    def _wait_loop(self, gpu: GpuInfo, event_set: Any, sink: EventSink) -> None:
        nv = self._nv
        label = f"GPU{gpu.index}"
        lost = False
        failing = False
        xid_type = getattr(nv, "nvmlEventTypeXidCriticalError",
                           NVML_EVENT_TYPE_XID_CRITICAL_ERROR)
        while not self._stop.is_set():
            try:
                data = nv.nvmlEventSetWait(event_set, self._wait_ms)
            except nv.NVMLError as exc:
                code = self._code(exc)
                if code == NVML_ERROR_TIMEOUT:
                    lost = failing = False
                    continue
                if code == NVML_ERROR_GPU_IS_LOST:
                    if not lost:
                        lost = True
                        sink.report_lost(gpu.uuid, f"NVML: {label} is lost (Xid event wait)")
                elif not failing:
                    failing = True
                    log.warning("%s: waiting for Xid events: %s; retrying every %g s",
                                label, exc, self._retry_s)
                if self._stop.wait(self._retry_s):
                    return
                continue
            lost = failing = False
            if int(data.eventType) & xid_type:
                sink.report_xid(gpu.uuid, int(data.eventData))
