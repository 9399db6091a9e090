"""GPU sensor protocol: what every backend (NVML, AMD sysfs, simulated, none) provides.

Backend methods are synchronous and may block (NVML can hang in the kernel when a GPU falls
off the bus); only the hub calls them, each GPU on its own one-thread executor with a deadline,
and discovery, on a thread of its own per backend.

A box may hold GPUs of several vendors: discovery asks each backend for its GPUs and builds
one inventory, renumbering them (`GpuInfo.index` is the position in that inventory, not the
backend's own numbering). A backend must therefore find its GPU again by `uuid` (or
`pci_bus_id`), never by `index`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..errors import SensorError


@dataclass(frozen=True)
class GpuInfo:
    """What does not change while the GPU is present."""

    index: int
    uuid: str
    name: str
    pci_bus_id: str  # as the driver reports it, e.g. 00000000:41:00.0
    vendor: str  # nvidia | amd
    numa_node: int  # -1: no preference / not supported
    memory_total_bytes: int | None
    default_power_limit_w: float | None
    min_power_limit_w: float | None
    max_power_limit_w: float | None
    slowdown_c: float | None
    shutdown_c: float | None
    backend: str = ""  # the name of the backend that serves it (set by discovery)


@dataclass(frozen=True)
class GpuReading:
    """One poll's values; None where the board does not report it."""

    temperature_c: float | None = None
    memory_temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    utilization_pct: float | None = None
    memory_used_bytes: int | None = None


class GpuBackend(Protocol):
    name: str

    def discover(self) -> list[GpuInfo]:
        """The GPUs present, in the backend's order. Raises SensorError if the backend is
        unusable (BackendUnavailable when its library or driver is missing)."""
        ...

    def read(self, gpu: GpuInfo) -> GpuReading:
        """Current readings. Raises GpuLostError when the GPU is gone, SensorError otherwise."""
        ...

    def set_power_limit(self, gpu: GpuInfo, watts: float) -> None:
        """Set the board power limit. Raises SensorError when refused."""
        ...

    def close(self) -> None: ...


class BackendUnavailable(SensorError):
    """The backend cannot run on this machine (its library, driver or sysfs is missing)."""


class SensorBusyError(SensorError):
    """A call was refused because the previous call on the same sensor is still running."""


class SensorTimeoutError(SensorError):
    """A call did not return within its deadline; the sensor is now `unresponsive`."""


class NoGpuBackend:
    """`backend = "none"`: no GPUs; services run without GPU pinning."""

    name = "none"

    def discover(self) -> list[GpuInfo]:
        return []

    def read(self, gpu: GpuInfo) -> GpuReading:  # pragma: no cover - never called
        return GpuReading()

    def set_power_limit(self, gpu: GpuInfo, watts: float) -> None:  # pragma: no cover
        return None

    def close(self) -> None:
        return None
