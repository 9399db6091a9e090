"""The NVML backend. No GPU here: its parsing and error mapping are checked against a
scripted NVML that answers with readings recorded on a real H200 (tests/fixtures), including
its NotSupported answers; the real library is used for what it does here (not found: `auto`
runs without GPUs, `nvml` refuses to start). scripts/device_check.sh runs it on real hardware.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from helpers import async_wait_until, toml_dumps
from supervisord_llm.errors import GpuLostError, SensorError
from supervisord_llm.sensors.base import CLOCK_EVENTS, BackendUnavailable, GpuHealth
from supervisord_llm.sensors.events import GpuEvent, GpuEvents, Lost
from supervisord_llm.sensors.hub import GpuHub
from supervisord_llm.sensors.nvml import NvmlBackend, NvmlXidSource, clock_event_names
from supervisord_llm.topology import Topology

FIXTURES = Path(__file__).parent / "fixtures"
H200 = json.loads((FIXTURES / "nvml_h200.json").read_text())
# health beyond heat on the same H200 (nvidia-smi -q and the probe; see its "source")
H200_HEALTH = json.loads((FIXTURES / "nvml_health_h200.json").read_text())


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__({3: "Not Supported", 10: "Timeout", 12: "NVML Shared Library Not Found",
                          13: "Function Not Found", 15: "GPU is lost"}.get(value, "Unknown Error"))
        self.value = value


def recorded(key: str) -> Any:
    """A value of the recorded H200's health; NotSupported where it answered that."""
    value = H200_HEALTH[key]
    if value == "NotSupported":
        raise NVMLError(3)
    return value


class ScriptedNVML:
    """Answers like nvidia-ml-py does on the recorded H200; `fail` makes a call raise."""

    NVMLError = NVMLError
    nvmlEventTypeXidCriticalError = 0x8

    def __init__(self) -> None:
        self.fail: dict[str, int] = {"nvmlDeviceGetNumaNodeId": 3}
        self.limit_set: list[int] = []
        self.shut = False
        self.shut_on: str | None = None
        # health: the recorded H200 unless a test changes it
        self.health: dict[str, Any] = {}
        # events: what nvmlEventSetWait yields, in order (an int: that Xid; an NVMLError:
        # raised); when empty, it waits its timeout and raises Timeout, as the real one does
        self.events: queue.Queue[int | NVMLError] = queue.Queue()
        self.waits = 0
        self.wait_threads: set[str] = set()
        self.event_sets_freed = 0
        self.registered: list[tuple[str, int]] = []

    def _maybe(self, name: str) -> None:
        if name in self.fail:
            raise NVMLError(self.fail[name])

    def nvmlInit(self) -> None:
        self._maybe("nvmlInit")

    def nvmlShutdown(self) -> None:
        self.shut = True
        self.shut_on = threading.current_thread().name

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:
        return f"handle{i}"

    def nvmlDeviceGetUUID(self, h: str) -> str:
        return str(H200["uuid"])

    def nvmlDeviceGetName(self, h: str) -> str:
        return str(H200["name"])

    def nvmlDeviceGetPciInfo(self, h: str) -> Any:
        return SimpleNamespace(busId=H200["pci_bus_id"].encode())

    def nvmlDeviceGetNumaNodeId(self, h: str) -> int:
        self._maybe("nvmlDeviceGetNumaNodeId")
        return 0

    def nvmlDeviceGetMemoryInfo(self, h: str) -> Any:
        self._maybe("nvmlDeviceGetMemoryInfo")
        used, total = H200["memory"]
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetPowerManagementDefaultLimit(self, h: str) -> int:
        return int(H200["power_default_mw"])

    def nvmlDeviceGetPowerManagementLimitConstraints(self, h: str) -> list[int]:
        return list(H200["power_constraints_mw"])

    def nvmlDeviceGetTemperatureThreshold(self, h: str, kind: int) -> int:
        return int(H200["threshold_slowdown_c"] if kind == 1 else H200["threshold_shutdown_c"])

    def nvmlDeviceGetTemperature(self, h: str, sensor: int) -> int:
        self._maybe("nvmlDeviceGetTemperature")
        return int(H200["temperature_c"])

    def nvmlDeviceGetPowerUsage(self, h: str) -> int:
        self._maybe("nvmlDeviceGetPowerUsage")
        return int(H200["power_mw"])

    def nvmlDeviceGetPowerManagementLimit(self, h: str) -> int:
        self._maybe("nvmlDeviceGetPowerManagementLimit")
        return self.limit_set[-1] if self.limit_set else int(H200["power_limit_mw"])

    def nvmlDeviceGetEnforcedPowerLimit(self, h: str) -> int:
        return self.limit_set[-1] if self.limit_set else int(H200["power_enforced_mw"])

    def nvmlDeviceGetUtilizationRates(self, h: str) -> Any:
        gpu, mem = H200["utilization"]
        return SimpleNamespace(gpu=gpu, memory=mem)

    def nvmlDeviceGetFieldValues(self, h: str, fields: list[int]) -> list[Any]:
        return [SimpleNamespace(nvmlReturn=0,
                                value=SimpleNamespace(uiVal=H200["memory_temperature_c"]))]

    def nvmlDeviceSetPowerManagementLimit(self, h: str, mw: int) -> None:
        self._maybe("nvmlDeviceSetPowerManagementLimit")
        self.limit_set.append(mw)

    # --- health beyond heat ----------------------------------------------------------------

    def _health(self, name: str, key: str) -> Any:
        self._maybe(name)
        if key in self.health:
            return self.health[key]
        return recorded(key)

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: str) -> int:
        return int(self._health("nvmlDeviceGetCurrentClocksEventReasons", "clock_reasons"))

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h: str) -> int:
        return int(self._health("nvmlDeviceGetCurrentClocksThrottleReasons", "clock_reasons"))

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h: str) -> int:
        return int(self._health("nvmlDeviceGetCurrPcieLinkGeneration", "pcie_gen"))

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h: str) -> int:
        return int(self._health("nvmlDeviceGetMaxPcieLinkGeneration", "pcie_gen_max"))

    def nvmlDeviceGetGpuMaxPcieLinkGeneration(self, h: str) -> int:
        return int(self._health("nvmlDeviceGetGpuMaxPcieLinkGeneration", "pcie_gen_gpu_max"))

    def nvmlDeviceGetCurrPcieLinkWidth(self, h: str) -> int:
        return int(self._health("nvmlDeviceGetCurrPcieLinkWidth", "pcie_width"))

    def nvmlDeviceGetMaxPcieLinkWidth(self, h: str) -> int:
        return int(self._health("nvmlDeviceGetMaxPcieLinkWidth", "pcie_width_max"))

    def nvmlDeviceGetEccMode(self, h: str) -> list[int]:
        return list(self._health("nvmlDeviceGetEccMode", "ecc_mode"))

    def nvmlDeviceGetTotalEccErrors(self, h: str, error_type: int, counter: int) -> int:
        assert counter == 0  # volatile
        key = "ecc_volatile_uncorrected" if error_type == 1 else "ecc_volatile_corrected"
        return int(self._health("nvmlDeviceGetTotalEccErrors", key))

    def nvmlDeviceGetRetiredPages(self, h: str, cause: int) -> list[int]:
        pages = self._health("nvmlDeviceGetRetiredPages", "retired_pages")
        return list(pages[cause])

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h: str) -> int:
        return int(self._health("nvmlDeviceGetRetiredPagesPendingStatus",
                                "retired_pages_pending"))

    def nvmlDeviceGetRemappedRows(self, h: str) -> tuple[int, int, int, int]:
        corr, unc, pending, failure = self._health("nvmlDeviceGetRemappedRows", "remapped_rows")
        return (corr, unc, pending, failure)

    # --- events ----------------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> str:
        self._maybe("nvmlEventSetCreate")
        return "eventset"

    def nvmlDeviceGetComputeRunningProcesses(self, h: str) -> list[Any]:
        self._maybe("nvmlDeviceGetComputeRunningProcesses")
        # as nvidia-ml-py gives them: usedGpuMemory None (or 2**64-1) when not available
        return [SimpleNamespace(pid=4242, usedGpuMemory=37 * 2**30),
                SimpleNamespace(pid=4243, usedGpuMemory=None),
                SimpleNamespace(pid=4244, usedGpuMemory=2**64 - 1),
                SimpleNamespace(pid=4242, usedGpuMemory=2**20)]

    def nvmlDeviceRegisterEvents(self, h: str, types: int, event_set: str) -> None:
        self._maybe("nvmlDeviceRegisterEvents")
        self.registered.append((h, types))

    def nvmlEventSetWait(self, event_set: str, timeout_ms: int) -> Any:
        self.wait_threads.add(threading.current_thread().name)
        try:
            item = self.events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise NVMLError(10) from None
        finally:
            self.waits += 1
        if isinstance(item, NVMLError):
            raise item
        return SimpleNamespace(device="handle0", eventType=0x8, eventData=item,
                               gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)

    def nvmlEventSetFree(self, event_set: str) -> None:
        self.event_sets_freed += 1


class OldBindingNVML(ScriptedNVML):
    """A binding from before the clock-event names (only ...ClocksThrottleReasons)."""

    nvmlDeviceGetCurrentClocksEventReasons = None  # type: ignore[assignment]


def sysfs(tmp: Path, node: str) -> Topology:
    d = tmp / "bus/pci/devices/0000:00:06.0"
    d.mkdir(parents=True)
    (d / "numa_node").write_text(node + "\n")
    return Topology(tmp)


def test_discover_and_read_the_recorded_h200(tmp_path: Path) -> None:
    nv = ScriptedNVML()
    b = NvmlBackend(nv, sysfs(tmp_path, "-1"))
    [g] = b.discover()
    assert (g.index, g.uuid, g.name, g.pci_bus_id) == (0, H200["uuid"], "NVIDIA H200",
                                                       "00000000:00:06.0")
    assert g.numa_node == -1  # NVML NotSupported, sysfs -1: no preference, not an error
    assert (g.default_power_limit_w, g.min_power_limit_w, g.max_power_limit_w) == \
        (700.0, 200.0, 700.0)
    assert (g.slowdown_c, g.shutdown_c) == (89.0, 95.0)
    assert g.memory_total_bytes == 150754820096
    r = b.read(g)
    assert (r.temperature_c, r.power_w, r.power_limit_w, r.utilization_pct) == \
        (25.0, 89.11, 700.0, 0.0)
    assert r.memory_used_bytes == 644939776 and r.memory_temperature_c == 25.0
    b.set_power_limit(g, 450)
    assert nv.limit_set == [450000] and b.read(g).power_limit_w == 450.0
    b.close()
    assert nv.shut


def test_numa_from_sysfs_when_nvml_does_not_say(tmp_path: Path) -> None:
    [g] = NvmlBackend(ScriptedNVML(), sysfs(tmp_path, "1")).discover()
    assert g.numa_node == 1


def test_error_mapping(tmp_path: Path) -> None:
    nv = ScriptedNVML()
    b = NvmlBackend(nv, sysfs(tmp_path, "-1"))
    [g] = b.discover()
    nv.fail["nvmlDeviceGetPowerUsage"] = 3
    assert b.read(g).power_w is None  # not supported: no value, no error
    nv.fail["nvmlDeviceGetPowerManagementLimit"] = 3
    assert b.read(g).power_limit_w == 700.0  # then the enforced limit
    nv.fail["nvmlDeviceGetTemperature"] = 15
    with pytest.raises(GpuLostError):
        b.read(g)
    nv.fail["nvmlDeviceGetTemperature"] = 999
    with pytest.raises(SensorError, match="NVML"):
        b.read(g)
    nv.fail["nvmlDeviceSetPowerManagementLimit"] = 4
    with pytest.raises(SensorError, match="cannot set the power limit of GPU0 to 100 W"):
        b.set_power_limit(g, 100)
    nv.fail["nvmlInit"] = 12
    with pytest.raises(BackendUnavailable, match=r"NVML library not found \(libnvidia-ml.so.1"):
        NvmlBackend(nv).discover()
    nv.fail["nvmlInit"] = 999
    with pytest.raises(SensorError, match="NVML: nvmlInit: Unknown Error"):
        NvmlBackend(nv).discover()


def test_health_of_the_recorded_h200(tmp_path: Path) -> None:
    """Idle (clock event 0x1), PCIe Gen5 x16 of Gen5 x16, ECC on with no errors, retired
    pages NotSupported (Hopper remaps rows instead), no rows remapped."""
    b = NvmlBackend(ScriptedNVML(), sysfs(tmp_path, "-1"))
    [g] = b.discover()
    h = b.read_health(g)
    assert h == GpuHealth(clock_events=("gpu_idle",), pcie_gen=5, pcie_gen_max=5, pcie_width=16,
                          pcie_width_max=16, ecc_uncorrected_volatile=0,
                          ecc_corrected_volatile=0, retired_pages=0, retirement_pending=False,
                          remap_failed=False)
    assert not h.link_degraded and not h.memory_trouble


def test_clock_event_bitmask_names() -> None:
    assert clock_event_names(0x0) == ()
    assert clock_event_names(0x4) == ("sw_power_cap",)  # the H200 and H100 at their 700 W cap
    assert clock_event_names(0x1 | 0x8 | 0x40 | 0x200 | 0x400) == \
        ("gpu_idle", "hw_slowdown", "hw_thermal")  # board limit, reliability: not reported
    assert clock_event_names(0x1FF) == CLOCK_EVENTS


def test_health_trouble(tmp_path: Path) -> None:
    nv = ScriptedNVML()
    b = NvmlBackend(nv, sysfs(tmp_path, "-1"))
    [g] = b.discover()
    nv.health.update(clock_reasons=0x4 | 0x40, pcie_gen=3, pcie_width=8,
                     ecc_volatile_uncorrected=2, ecc_volatile_corrected=17,
                     remapped_rows=[3, 1, 1, 0])
    h = b.read_health(g)
    assert h.clock_events == ("sw_power_cap", "hw_thermal")
    assert (h.pcie_gen, h.pcie_gen_max, h.pcie_width, h.pcie_width_max) == (3, 5, 8, 16)
    assert h.link_degraded
    nv.health.update(pcie_gen=1, pcie_width=16)  # idle: the link slowed, every lane there
    h = b.read_health(g)
    assert (h.pcie_gen, h.pcie_gen_max, h.pcie_width, h.pcie_width_max) == (1, 5, 16, 16)
    assert not h.link_degraded
    nv.health.update(pcie_gen=3, pcie_width=8)
    assert (h.ecc_uncorrected_volatile, h.ecc_corrected_volatile) == (2, 17)
    assert (h.retired_pages, h.retirement_pending, h.remap_failed) == (4, True, False)
    assert h.memory_trouble
    nv.health.update(ecc_volatile_uncorrected=0, remapped_rows=[3, 1, 0, 1])
    h = b.read_health(g)
    assert (h.retirement_pending, h.remap_failed, h.memory_trouble) == (False, True, True)
    # an older board: dynamic page retirement instead of row remapping
    nv.health.update(retired_pages=[[0x1000, 0x2000], [0x3000]], retired_pages_pending=1)
    nv.fail["nvmlDeviceGetRemappedRows"] = 3
    h = b.read_health(g)
    assert (h.retired_pages, h.retirement_pending, h.remap_failed) == (3, True, None)


def test_health_not_supported_and_older_bindings(tmp_path: Path) -> None:
    old = OldBindingNVML()
    b = NvmlBackend(old, sysfs(tmp_path, "-1"))
    [g] = b.discover()
    old.health.update(clock_reasons=0x4)
    assert b.read_health(g).clock_events == ("sw_power_cap",)  # ...ClocksThrottleReasons
    nv = ScriptedNVML()
    b = NvmlBackend(nv, sysfs(tmp_path / "2", "-1"))
    [g] = b.discover()
    nv.health.update(clock_reasons=0x20, pcie_gen_gpu_max=4)
    nv.fail.update(nvmlDeviceGetCurrentClocksEventReasons=13,  # an older driver
                   nvmlDeviceGetMaxPcieLinkGeneration=3)
    h = b.read_health(g)
    assert (h.clock_events, h.pcie_gen_max) == (("sw_thermal",), 4)
    nv.health.update(ecc_mode=[0, 1])  # ECC off (on after the next reset): no ECC counts
    h = b.read_health(g)
    assert (h.ecc_uncorrected_volatile, h.ecc_corrected_volatile) == (None, None)
    for name in ("nvmlDeviceGetCurrentClocksEventReasons",
                 "nvmlDeviceGetCurrentClocksThrottleReasons",
                 "nvmlDeviceGetCurrPcieLinkGeneration", "nvmlDeviceGetMaxPcieLinkGeneration",
                 "nvmlDeviceGetGpuMaxPcieLinkGeneration", "nvmlDeviceGetCurrPcieLinkWidth",
                 "nvmlDeviceGetMaxPcieLinkWidth", "nvmlDeviceGetEccMode",
                 "nvmlDeviceGetRetiredPages", "nvmlDeviceGetRemappedRows"):
        nv.fail[name] = 3
    assert b.read_health(g) == GpuHealth()  # nothing reported: all None, no error


def test_health_errors(tmp_path: Path) -> None:
    nv = ScriptedNVML()
    b = NvmlBackend(nv, sysfs(tmp_path, "-1"))
    [g] = b.discover()
    nv.fail["nvmlDeviceGetTotalEccErrors"] = 15
    with pytest.raises(GpuLostError):
        b.read_health(g)
    nv.fail.pop("nvmlDeviceGetTotalEccErrors")
    nv.fail["nvmlDeviceGetRemappedRows"] = 999
    with pytest.raises(SensorError, match="NVML: health of GPU0: Unknown Error"):
        b.read_health(g)


async def test_xid_79_then_gpu_is_lost_is_one_lost(tmp_path: Path) -> None:
    """A non-fatal Xid is counted; Xid 79 (fallen off the bus) is Lost; the GpuIsLost from
    the next wait is the same loss (no second event). The waits run on a thread per GPU, not
    on the loop, and end when the events are closed."""
    nv = ScriptedNVML()
    b = NvmlBackend(nv, sysfs(tmp_path, "-1"))
    gpus = b.discover()
    uuid = gpus[0].uuid
    got: list[GpuEvent] = []
    # retry_s short: the wait after the GpuIsLost comes at once (with the default 5 s, a
    # loaded machine let the GpuIsLost wait pass before the test looked, and the next one
    # came only after the test's own 5 s)
    events = GpuEvents(gpus, got.append, sources=[NvmlXidSource(b, gpus, wait_ms=20,
                                                                retry_s=0.01)])
    events.start()
    try:
        await async_wait_until(lambda: nv.waits >= 1, 5, what="the first Xid wait")
        assert nv.registered == [("handle0", 0x8)]
        nv.events.put(13)
        await async_wait_until(lambda: events.xid_errors_total[uuid] == {13: 1}, 5,
                               what="Xid 13 counted")
        assert got == [] and not events.is_lost(uuid)
        nv.events.put(79)
        nv.events.put(NVMLError(15))
        await async_wait_until(lambda: got, 5, what="Lost")
        assert got == [Lost(uuid, "Xid 79: GPU has fallen off the bus")]
        waits = nv.waits
        await async_wait_until(lambda: nv.events.empty() and nv.waits > waits, 5,
                               what="the GpuIsLost wait")
        assert got == [Lost(uuid, "Xid 79: GPU has fallen off the bus")]
        assert events.xid_errors_total[uuid] == {13: 1, 79: 1}
        assert nv.wait_threads == {"xid-gpu0"}
    finally:
        await events.aclose()
    assert nv.event_sets_freed == 1


async def test_gpu_is_lost_from_the_wait_and_refused_registration(tmp_path: Path,
                                                                  caplog: Any) -> None:
    nv = ScriptedNVML()
    b = NvmlBackend(nv, sysfs(tmp_path, "-1"))
    gpus = b.discover()
    got: list[GpuEvent] = []
    src = NvmlXidSource(b, gpus, wait_ms=20, retry_s=0.01)
    events = GpuEvents(gpus, got.append, sources=[src])
    nv.events.put(NVMLError(15))
    nv.events.put(NVMLError(15))
    nv.events.put(NVMLError(999))
    events.start()
    try:
        await async_wait_until(lambda: got and nv.events.empty(), 5, what="Lost")
        assert got == [Lost(gpus[0].uuid, "NVML: GPU0 is lost (Xid event wait)")]
    finally:
        await events.aclose()
    assert src.join(1.0)
    nv.fail["nvmlDeviceRegisterEvents"] = 3  # a board without Xid events: a warning
    src = NvmlXidSource(b, gpus, wait_ms=20)
    events = GpuEvents(gpus, got.append, sources=[src])
    events.start()
    assert src.join(5.0) and src.registered == []
    await events.aclose()
    assert "no Xid events (nvmlDeviceRegisterEvents: Not Supported)" in caplog.text


async def test_hub_over_nvml_shuts_nvml_down_off_the_loop(tmp_path: Path) -> None:
    nv = ScriptedNVML()
    b = NvmlBackend(nv, sysfs(tmp_path, "0"))
    gpus = b.discover()
    hub = GpuHub(b, gpus, 0.02, 1.0)
    await hub.poll_once()
    assert hub.snapshots()[0].status == "ok" and hub.backend_names == "nvml"
    await hub.poll_health_once()
    [health] = hub.health_snapshots()
    assert health.status == "ok" and health.health is not None
    assert health.health.clock_events == ("gpu_idle",)
    await hub.set_power_limit(gpus[0], 450)
    assert nv.limit_set == [450000]
    await hub.aclose()
    assert nv.shut and nv.shut_on not in (None, threading.main_thread().name)


def test_real_library_here_auto_and_nvml(tmp_path: Path) -> None:
    """This machine has no NVIDIA driver: `auto` runs without GPUs and says why; `nvml` fails
    the check (exit 1) and says why."""
    base: dict[str, Any] = {"service": [{"name": "a", "command": ["/bin/sleep", "1"]}]}
    for backend, code, text in (("auto", 0, "GPUs (none): 0"),
                                ("auto", 0, "nvml: NVML library not found (libnvidia-ml.so.1"),
                                ("nvml", 1, "GPU discovery (nvml) failed: NVML library not "
                                            "found (libnvidia-ml.so.1")):
        path = tmp_path / f"{backend}.toml"
        path.write_text(toml_dumps({"gpu": {"backend": backend}, **base}))
        r = subprocess.run([sys.executable, "-m", "supervisord_llm", "--config", str(path),
                            "--check"], capture_output=True, text=True, check=False)
        if backend == "nvml" and r.returncode == 0:
            pytest.skip("this machine has a working NVML")
        assert r.returncode == code, r.stderr
        assert text in r.stdout + r.stderr and "Traceback" not in r.stderr


def test_process_memory(tmp_path: Path) -> None:
    nv = ScriptedNVML()
    backend = NvmlBackend(nv, Topology(str(tmp_path)))
    gpu = backend.discover()[0]
    assert backend.process_memory(gpu) == {4242: 37 * 2**30 + 2**20}
    nv.fail["nvmlDeviceGetComputeRunningProcesses"] = 3  # not supported: cannot tell
    assert backend.process_memory(gpu) is None
    nv.fail["nvmlDeviceGetComputeRunningProcesses"] = 999
    assert backend.process_memory(gpu) is None
