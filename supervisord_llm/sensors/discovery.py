"""GPU discovery: which backend serves which GPU, and why there is none.

`gpu.backend` picks it:

- `auto` asks every vendor backend (NVML first, then the others in registry order), each on a
  thread of its own with a deadline, and builds one inventory: NVML's GPUs first in NVML
  order, then the others by PCI bus id, numbered 0, 1, ... in that order, each remembering its
  backend (`GpuInfo.backend`, `Discovery.backend_of`). A backend that is missing, fails or
  hangs is a note, not an error; with no GPU at all the daemon runs without GPU telemetry.
- a vendor backend by name (`nvml`, `amd-sysfs`) must work: a failure is a `DiscoveryError`
  (finding no GPU is not: the plan then refuses services that name one; but `amd-sysfs`
  without any amdgpu card under `<sysfs_root>/class/drm` is unavailable, as NVML without its
  driver is).
- `sim` builds the simulated GPUs of `[[gpu.sim]]` (NVIDIA- or AMD-like: one backend).
- `none`: no GPUs.

The vendor registry is built by the composition root, which alone imports vendor libraries
(`pynvml`): `vendor_backends(load_nvml)`. It holds NVML and the AMD sysfs backend (no library;
it reads `gpu.sysfs_root`), so `auto` serves NVIDIA cards through NVML and AMD cards through
sysfs on the same host.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..config import GpuSection
from ..errors import ConfigError, SensorError, StartupError
from .amd_sysfs import AmdSysfsBackend
from .base import BackendUnavailable, GpuBackend, GpuInfo
from .hub import GpuHub
from .nvml import NvmlBackend
from .poll import CallThread, close_in_background, close_off_loop
from .sim import SimBackend

DISCOVERY_TIMEOUT_S = 30.0
NVML = "nvml"
AMD_SYSFS = "amd-sysfs"

# A vendor backend's factory: builds it from the `[gpu]` section without blocking I/O (it runs
# on the discovery thread anyway); raises BackendUnavailable when it cannot run here.
BackendFactory = Callable[[GpuSection], GpuBackend]


class DiscoveryError(StartupError):
    """A hard failure of GPU discovery (the named backend is unusable or hung). `notes`: what
    each backend tried found, as in `Discovery.notes`."""

    def __init__(self, message: str, notes: list[str]) -> None:
        super().__init__(message)
        self.notes = list(notes)


def nvml_factory(load_nvml: Callable[[], Any]) -> BackendFactory:
    """`load_nvml()` returns the `pynvml` module, or None when nvidia-ml-py is not installed."""

    def make(cfg: GpuSection) -> GpuBackend:
        nvml = load_nvml()
        if nvml is None:
            raise BackendUnavailable("the nvidia-ml-py package (pynvml) is not installed")
        return NvmlBackend(nvml)

    return make


def amd_sysfs_factory(cfg: GpuSection) -> GpuBackend:
    """The AMD sysfs backend on `gpu.sysfs_root` (the constructor does no I/O)."""
    return AmdSysfsBackend(cfg.sysfs_root)


def vendor_backends(load_nvml: Callable[[], Any]) -> dict[str, BackendFactory]:
    """The registry of vendor backends, in the order `auto` lists them (NVML first)."""
    return {NVML: nvml_factory(load_nvml), AMD_SYSFS: amd_sysfs_factory}


@dataclass(frozen=True, eq=False)
class Discovery:
    """The inventory. `notes`: one line per backend tried, what it found or why it failed."""

    requested: str  # the configured gpu.backend
    gpus: tuple[GpuInfo, ...]
    backend_of: Mapping[str, GpuBackend]  # GPU uuid -> its backend
    notes: tuple[str, ...]

    @property
    def backends(self) -> tuple[GpuBackend, ...]:
        """The backends that serve a GPU, in inventory order."""
        return tuple({id(b): b for b in (self.backend_of[g.uuid] for g in self.gpus)}.values())

    @property
    def backend_names(self) -> str:
        """"nvml", "nvml+amd-sysfs", "sim", or "none" when no backend serves a GPU."""
        return "+".join(dict.fromkeys(b.name for b in self.backends)) or "none"

    @property
    def message(self) -> str:
        """One line for the log and `--check`, e.g. "gpu.backend auto: nvml: NVML library not
        found (libnvidia-ml.so.1; is the NVIDIA driver installed?); no GPU found: running
        without GPU telemetry"."""
        parts = list(self.notes)
        if not self.gpus and self.requested != "none":
            parts.append("no GPU found: running without GPU telemetry")
        return f"gpu.backend {self.requested}: " + "; ".join(parts)

    def hub(self, poll_interval_s: float, call_timeout_s: float,
            clock: Callable[[], float] = time.monotonic, *,
            health_interval_s: float = 10.0) -> GpuHub:
        return GpuHub(self.backend_of, self.gpus, poll_interval_s, call_timeout_s, clock,
                      health_interval_s=health_interval_s)

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Close the backends (nvmlShutdown) off the loop, when no hub took them (`--check`)."""
        await asyncio.gather(*(close_off_loop(f"gpu-{b.name}", b.close, timeout_s)
                               for b in self.backends))


def _pci_key(bus_id: str) -> tuple[int, int, int, int] | tuple[int, str]:
    m = re.fullmatch(r"(?:([0-9A-Fa-f]+):)?([0-9A-Fa-f]+):([0-9A-Fa-f]+)\.([0-7])",
                     bus_id.strip())
    if m is None:
        return (1 << 40, bus_id)
    dom, bus, dev, fn = m.groups()
    return (int(dom or "0", 16), int(bus, 16), int(dev, 16), int(fn, 16))


def _probe(factory: Callable[[], GpuBackend]) -> tuple[GpuBackend, list[GpuInfo]]:
    """Runs on the backend's discovery thread: build, discover; close it if it has nothing."""
    backend = factory()
    try:
        gpus = backend.discover()
    except BaseException:
        backend.close()
        raise
    if not gpus:
        backend.close()
    return backend, gpus


def _plural(n: int) -> str:
    return f"{n} GPU" + ("" if n == 1 else "s")


async def discover_gpus(cfg: GpuSection, vendors: Mapping[str, BackendFactory], *,
                        timeout_s: float = DISCOVERY_TIMEOUT_S) -> Discovery:
    """Discover the GPUs as `cfg.backend` says (see the module's doc). Raises ConfigError for
    a backend this build does not have, DiscoveryError for a named backend that fails."""
    requested = cfg.backend
    if requested == "none":
        return Discovery("none", (), {}, ("running without GPUs",))
    candidates: dict[str, Callable[[], GpuBackend]] = {}
    if requested == "sim":
        candidates["sim"] = lambda: SimBackend(cfg.sim, cfg.sim_state_file)
    elif requested == "auto":
        order = sorted(vendors, key=lambda n: n != NVML)  # stable: NVML first
        candidates = {n: functools.partial(vendors[n], cfg) for n in order}
    elif requested in vendors:
        candidates[requested] = functools.partial(vendors[requested], cfg)
    else:
        known = ", ".join(f'"{n}"' for n in (*vendors, "sim", "none", "auto"))
        raise ConfigError([f'gpu.backend: "{requested}" is not available in this version of '
                           f"llm-supervisor (use {known})"])
    explicit = requested != "auto"

    threads = {n: CallThread(f"gpu-discover-{n}") for n in candidates}
    futs = {n: asyncio.wrap_future(threads[n].submit(functools.partial(_probe, f)))
            for n, f in candidates.items()}
    for t in threads.values():
        t.close()  # each thread ends after its probe (a hung one stays behind, a daemon)
    if futs:
        await asyncio.wait(futs.values(), timeout=timeout_s)

    notes: list[str] = []
    found: dict[str, tuple[GpuBackend, list[GpuInfo]]] = {}
    for n, fut in futs.items():
        if not fut.done():
            fut.add_done_callback(functools.partial(_close_late, n))
            notes.append(f"{n}: discovery did not finish within {timeout_s:g} s")
            if explicit:
                raise DiscoveryError(f"GPU discovery ({n}) did not finish within "
                                     f"{timeout_s:g} s", notes)
            continue
        exc = fut.exception()
        if exc is not None:
            why = str(exc) if isinstance(exc, SensorError) else f"{type(exc).__name__}: {exc}"
            notes.append(f"{n}: {why}")
            if explicit:
                raise DiscoveryError(f"GPU discovery ({n}) failed: {why}", notes)
            continue
        backend, gpus = fut.result()
        notes.append(f"{n}: {_plural(len(gpus))}" if gpus else f"{n}: found no GPU")
        if gpus:
            found[n] = (backend, gpus)

    # NVML's GPUs (and the simulated ones) in their own order, then the others by PCI bus id
    first: list[tuple[str, GpuBackend, GpuInfo]] = []
    others: list[tuple[str, GpuBackend, GpuInfo]] = []
    for n, (backend, gpus) in found.items():
        (first if n in (NVML, "sim") else others).extend((n, backend, g) for g in gpus)
    others.sort(key=lambda item: _pci_key(item[2].pci_bus_id))
    inventory: list[GpuInfo] = []
    backend_of: dict[str, GpuBackend] = {}
    seen: dict[object, str] = {}
    for n, backend, g in first + others:
        keys: list[object] = [("uuid", g.uuid)]
        if g.pci_bus_id:
            keys.append(("pci", _pci_key(g.pci_bus_id)))
        dup = next((seen[k] for k in keys if seen.get(k, n) != n), None)
        if dup is not None:  # one GPU that two backends both report: the first one keeps it
            notes.append(f"{n}: {g.uuid} ({g.pci_bus_id or 'no PCI bus id'}) is already "
                         f"served by {dup}; skipped")
            continue
        for k in keys:
            seen[k] = n
        info = dataclasses.replace(g, index=len(inventory), backend=n)
        inventory.append(info)
        backend_of[info.uuid] = backend
    used = {id(b) for b in backend_of.values()}
    await asyncio.gather(*(close_off_loop(f"gpu-{n}", b.close, timeout_s)
                           for n, (b, _) in found.items() if id(b) not in used))
    return Discovery(requested, tuple(inventory), backend_of, tuple(notes))


def _close_late(name: str, fut: asyncio.Future[tuple[GpuBackend, list[GpuInfo]]]) -> None:
    """A discovery that overran its deadline and finished after all: nobody uses the backend."""
    if not fut.cancelled() and fut.exception() is None:
        backend, gpus = fut.result()
        if gpus:  # _probe closed it otherwise
            close_in_background(f"gpu-{name}", backend.close)
