"""GPU discovery: one inventory over several vendors' backends, in a stable order, and notes
that say what each backend found or why it failed (what `--check` prints)."""

from __future__ import annotations

import importlib
import threading
from pathlib import Path
from types import ModuleType

import pytest
from test_nvml import H200, ScriptedNVML

from helpers import SIM_UUID, async_wait_until
from supervisord_llm.config import GpuSection, SimGpu
from supervisord_llm.errors import ConfigError, StartupError
from supervisord_llm.sensors.base import (
    BackendUnavailable,
    GpuBackend,
    GpuHealth,
    GpuInfo,
    GpuReading,
)
from supervisord_llm.sensors.discovery import (
    BackendFactory,
    DiscoveryError,
    discover_gpus,
    nvml_factory,
    vendor_backends,
)


def real_pynvml() -> ModuleType | None:
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        return None


class FakeVendor:
    """An AMD-sysfs-like backend: its GPUs, readings keyed by uuid, optional failure/hang."""

    def __init__(self, name: str, gpus: list[tuple[str, str]], fail: Exception | None = None,
                 hang: threading.Event | None = None) -> None:
        self.name = name
        self._gpus = gpus  # (uuid, pci bus id), in the backend's own order
        self.fail = fail
        self.hang = hang
        self.closed = False

    def discover(self) -> list[GpuInfo]:
        if self.hang is not None:
            self.hang.wait(10)
        if self.fail is not None:
            raise self.fail
        return [GpuInfo(i, uuid, "Radeon", pci, "amd", -1, 1, 300.0, 100.0, 300.0, 100.0, 110.0)
                for i, (uuid, pci) in enumerate(self._gpus)]

    def read(self, gpu: GpuInfo) -> GpuReading:
        return GpuReading(temperature_c=50.0 + gpu.index)

    def set_power_limit(self, gpu: GpuInfo, watts: float) -> None:
        return None

    def read_health(self, gpu: GpuInfo) -> GpuHealth:
        return GpuHealth()

    def close(self) -> None:
        self.closed = True


def factory(backend: GpuBackend) -> BackendFactory:
    return lambda cfg: backend


def scripted_nvml(nv: ScriptedNVML | None = None) -> BackendFactory:
    nv = nv or ScriptedNVML()
    return nvml_factory(lambda: nv)


AMD = [("GPU-amd-c1", "0000:c1:00.0"), ("GPU-amd-41", "0000:41:00.0")]


async def test_auto_without_nvml_here_names_nvml_and_why() -> None:
    disc = await discover_gpus(GpuSection(backend="auto"), vendor_backends(real_pynvml))
    if disc.gpus:
        pytest.skip("this machine has a working NVML")
    assert disc.backend_names == "none" and disc.backend_of == {}
    assert disc.notes[0].startswith("nvml: ")
    assert "NVML library not found (libnvidia-ml.so.1" in disc.notes[0] or \
        "nvidia-ml-py package (pynvml) is not installed" in disc.notes[0]
    assert disc.message.startswith("gpu.backend auto: nvml: ")
    assert disc.message.endswith("no GPU found: running without GPU telemetry")
    hub = disc.hub(0.02, 1.0)
    assert hub.backend_names == "none" and hub.snapshots() == ()
    await hub.poll_once()
    await hub.aclose()


async def test_auto_nvml_missing_package_and_explicit_nvml(tmp_path: Path) -> None:
    disc = await discover_gpus(GpuSection(backend="auto", sysfs_root=str(tmp_path)),
                               vendor_backends(lambda: None))
    assert disc.message.startswith("gpu.backend auto: nvml: the nvidia-ml-py package (pynvml) "
                                   "is not installed; amd-sysfs: ")
    assert f"{tmp_path}/class/drm does not exist" in disc.message
    assert disc.message.endswith("no GPU found: running without GPU telemetry")
    nv = ScriptedNVML()
    nv.fail["nvmlInit"] = 12
    with pytest.raises(DiscoveryError) as info:
        await discover_gpus(GpuSection(backend="nvml"), {"nvml": scripted_nvml(nv)})
    assert isinstance(info.value, StartupError)
    assert str(info.value) == ("GPU discovery (nvml) failed: NVML library not found "
                               "(libnvidia-ml.so.1; is the NVIDIA driver installed?)")
    assert info.value.notes == ["nvml: NVML library not found (libnvidia-ml.so.1; is the "
                                "NVIDIA driver installed?)"]
    with pytest.raises(DiscoveryError, match="not installed"):
        await discover_gpus(GpuSection(backend="nvml"), vendor_backends(lambda: None))


async def test_auto_with_two_vendors_builds_one_ordered_inventory() -> None:
    amd = FakeVendor("fake-amd", AMD)
    nv = ScriptedNVML()
    # registry order puts the AMD backend first: NVML's GPUs still come first
    disc = await discover_gpus(GpuSection(backend="auto"),
                               {"fake-amd": factory(amd), "nvml": scripted_nvml(nv)})
    assert [(g.index, g.uuid, g.backend) for g in disc.gpus] == [
        (0, H200["uuid"], "nvml"), (1, "GPU-amd-41", "fake-amd"), (2, "GPU-amd-c1", "fake-amd")]
    assert disc.backend_names == "nvml+fake-amd"
    assert disc.notes == ("nvml: 1 GPU", "fake-amd: 2 GPUs")  # in the order tried
    assert disc.message == "gpu.backend auto: nvml: 1 GPU; fake-amd: 2 GPUs"
    assert disc.backend_of["GPU-amd-c1"] is amd
    hub = disc.hub(0.02, 1.0)
    assert hub.backend_names == "nvml+fake-amd"
    await hub.poll_once()
    temps = [s.reading.temperature_c if s.reading else None for s in hub.snapshots()]
    assert temps == [25.0, 51.0, 52.0]  # each GPU read through its own backend
    await hub.aclose()
    assert nv.shut and amd.closed


async def test_auto_notes_failures_duplicates_and_empty_backends() -> None:
    broken = FakeVendor("fake-broken", AMD, fail=BackendUnavailable("no /sys/class/drm"))
    empty = FakeVendor("fake-empty", [])
    twin = FakeVendor("fake-twin", [("GPU-twin", "0000:00:06.0")])  # the H200's bus id
    bug = FakeVendor("fake-bug", AMD, fail=ValueError("bad sysfs line"))
    disc = await discover_gpus(GpuSection(backend="auto"), {
        "nvml": scripted_nvml(), "fake-broken": factory(broken), "fake-empty": factory(empty),
        "fake-twin": factory(twin), "fake-bug": factory(bug)})
    assert [g.uuid for g in disc.gpus] == [H200["uuid"]]
    assert disc.notes == (
        "nvml: 1 GPU", "fake-broken: no /sys/class/drm", "fake-empty: found no GPU",
        "fake-twin: 1 GPU", "fake-bug: ValueError: bad sysfs line",
        "fake-twin: GPU-twin (0000:00:06.0) is already served by nvml; skipped")
    assert broken.closed and empty.closed and bug.closed  # closed on their discovery thread
    assert twin.closed  # nothing of it is used
    assert disc.backend_names == "nvml"
    await disc.aclose()


async def test_a_hung_backend_is_a_note_for_auto_and_an_error_when_named() -> None:
    release = threading.Event()
    hung = FakeVendor("fake-hung", AMD, hang=release)
    disc = await discover_gpus(GpuSection(backend="auto"),
                               {"nvml": scripted_nvml(), "fake-hung": factory(hung)},
                               timeout_s=0.1)
    assert [g.backend for g in disc.gpus] == ["nvml"]
    assert disc.notes == ("nvml: 1 GPU", "fake-hung: discovery did not finish within 0.1 s")
    release.set()  # it finishes after all: nobody uses it, so it is closed
    await async_wait_until(lambda: hung.closed, 5, what="the late backend to be closed")
    hung2 = FakeVendor("fake-hung", AMD, hang=threading.Event())
    with pytest.raises(DiscoveryError, match=r"GPU discovery \(fake-hung\) did not finish "
                                             r"within 0.1 s"):
        hung_cfg = GpuSection(backend="fake-hung")  # type: ignore[arg-type]
        await discover_gpus(hung_cfg, {"fake-hung": factory(hung2)}, timeout_s=0.1)
    assert hung2.hang is not None
    hung2.hang.set()


async def test_named_vendor_sorted_by_pci_and_unknown_backend() -> None:
    disc = await discover_gpus(GpuSection(backend="fake-amd"),  # type: ignore[arg-type]
                               {"nvml": scripted_nvml(), "fake-amd": factory(
                                   FakeVendor("fake-amd", AMD))})
    assert [(g.index, g.pci_bus_id) for g in disc.gpus] == [(0, "0000:41:00.0"),
                                                           (1, "0000:c1:00.0")]
    with pytest.raises(ConfigError, match='"amd-sysfs" is not available'):
        await discover_gpus(GpuSection(backend="amd-sysfs"), {"nvml": scripted_nvml()})


async def test_sim_and_none(tmp_path: Path) -> None:
    sims = (SimGpu(uuid=SIM_UUID.format(0), vendor="amd", pci_bus_id="00000000:c1:00.0"),
            SimGpu(uuid=SIM_UUID.format(1), vendor="nvidia", pci_bus_id="00000000:41:00.0"))
    disc = await discover_gpus(GpuSection(backend="sim", sim=sims), {})
    assert [(g.index, g.vendor, g.backend) for g in disc.gpus] == [(0, "amd", "sim"),
                                                                   (1, "nvidia", "sim")]
    assert disc.backend_names == "sim" and len(disc.backends) == 1
    hub = disc.hub(0.02, 1.0)
    await hub.poll_once()
    assert [s.status for s in hub.snapshots()] == ["ok", "ok"]
    await hub.aclose()
    none = await discover_gpus(GpuSection(backend="none"), {"nvml": scripted_nvml()})
    assert none.gpus == () and none.backend_names == "none"
    assert none.message == "gpu.backend none: running without GPUs"
