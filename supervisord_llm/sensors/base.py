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
    # what *_VISIBLE_DEVICES names it by, when not its UUID (an AMD card without a unique_id
    # is pinned by its ROCm index, from the KFD topology)
    pin: str = ""
    # the device nodes a container needs for it, beside the vendor's own (an AMD card's
    # render node, `/dev/dri/renderD128`; NVIDIA GPUs go by CDI or --gpus)
    devices: tuple[str, ...] = ()

    @property
    def pin_token(self) -> str:
        return self.pin or self.uuid


@dataclass(frozen=True)
class GpuReading:
    """One poll's values; None where the board does not report it."""

    temperature_c: float | None = None
    memory_temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    utilization_pct: float | None = None
    memory_used_bytes: int | None = None
    # the temperature the thermal policy acts on, if not `temperature_c`: the junction (hot
    # spot) where the board reports one (AMD), else None (then `temperature_c`, the edge/core)
    hotspot_c: float | None = None

    @property
    def policy_c(self) -> float | None:
        return self.hotspot_c if self.hotspot_c is not None else self.temperature_c


# clock-event reasons (why the clocks are below their maximum), as the hub reports them
CLOCK_EVENTS = ("gpu_idle", "applications_clocks", "sw_power_cap", "hw_slowdown",
                "sync_boost", "sw_thermal", "hw_thermal", "hw_power_brake", "display_clocks")
# those that mean heat or power trouble (not the ordinary power cap or idling)
CLOCK_TROUBLE = frozenset({"hw_slowdown", "sw_thermal", "hw_thermal", "hw_power_brake"})


@dataclass(frozen=True)
class GpuHealth:
    """Health beyond heat, read at a slower interval than the temperature; None where the
    board or driver does not report it."""

    clock_events: tuple[str, ...] | None = None  # names from CLOCK_EVENTS
    pcie_gen: int | None = None
    pcie_gen_max: int | None = None
    pcie_width: int | None = None
    pcie_width_max: int | None = None
    ecc_uncorrected_volatile: int | None = None  # since the driver loaded
    ecc_corrected_volatile: int | None = None
    retired_pages: int | None = None  # pages retired (older boards) or rows remapped
    retirement_pending: bool | None = None  # a retirement/remap waits for a reset
    remap_failed: bool | None = None

    @property
    def link_degraded(self) -> bool:
        """Fewer PCIe lanes in use than the link has (a bad seat or riser, a dirty contact).
        A lower generation alone is not: NVIDIA and AMD boards drop the link speed when they
        idle (PCIe power management), so it says nothing about the link's health."""
        return (self.pcie_width is not None and self.pcie_width_max is not None
                and self.pcie_width < self.pcie_width_max)

    @property
    def memory_trouble(self) -> bool:
        """Uncorrected ECC errors, a pending retirement or a failed remap: flag the GPU."""
        return bool(self.ecc_uncorrected_volatile) or bool(self.retirement_pending) \
            or bool(self.remap_failed)


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

    def read_health(self, gpu: GpuInfo) -> GpuHealth:
        """Health beyond heat (slower interval). GpuHealth() where nothing is reported."""
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

    def read_health(self, gpu: GpuInfo) -> GpuHealth:  # pragma: no cover
        return GpuHealth()

    def close(self) -> None:
        return None
