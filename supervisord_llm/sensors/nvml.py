"""NVIDIA GPUs through NVML (`nvidia-ml-py`, imported as `pynvml` by the daemon and handed
in: this module never imports it). Values come in milliwatts, and a data-centre board answers
`NotSupported` for what it does not have (fan, NUMA node in a VM): those are None, not errors.
A GPU that fell off the bus answers `GpuIsLost`: that is `GpuLostError`.
"""

from __future__ import annotations

import contextlib
from typing import Any

from ..errors import GpuLostError, SensorError
from ..topology import Topology
from .base import BackendUnavailable, GpuHealth, GpuInfo, GpuReading

NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_TEMPERATURE_GPU = 0
NVML_TEMPERATURE_THRESHOLD_SHUTDOWN = 0
NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
NVML_FI_DEV_MEMORY_TEMP = 82


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

    def read_health(self, gpu: GpuInfo) -> GpuHealth:
        return GpuHealth()  # filled in by the health-beyond-heat work (same change)

    def close(self) -> None:
        if self._initialised:
            with contextlib.suppress(self._nvml.NVMLError):
                self._nvml.nvmlShutdown()
            self._initialised = False
