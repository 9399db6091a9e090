"""The NVML backend. No GPU here: its parsing and error mapping are checked against a
scripted NVML that answers with readings recorded on a real H200 (tests/fixtures), including
its NotSupported answers; the real library is used for what it does here (not found: `auto`
runs without GPUs, `nvml` refuses to start). scripts/device_check.sh runs it on real hardware.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from helpers import toml_dumps
from supervisord_llm.errors import GpuLostError, SensorError
from supervisord_llm.sensors.base import BackendUnavailable
from supervisord_llm.sensors.hub import GpuHub
from supervisord_llm.sensors.nvml import NvmlBackend
from supervisord_llm.topology import Topology

H200 = json.loads((Path(__file__).parent / "fixtures" / "nvml_h200.json").read_text())


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__({3: "Not Supported", 12: "NVML Shared Library Not Found",
                          15: "GPU is lost"}.get(value, "Unknown Error"))
        self.value = value


class ScriptedNVML:
    """Answers like nvidia-ml-py does on the recorded H200; `fail` makes a call raise."""

    NVMLError = NVMLError

    def __init__(self) -> None:
        self.fail: dict[str, int] = {"nvmlDeviceGetNumaNodeId": 3}
        self.limit_set: list[int] = []
        self.shut = False
        self.shut_on: str | None = None

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


async def test_hub_over_nvml_shuts_nvml_down_off_the_loop(tmp_path: Path) -> None:
    nv = ScriptedNVML()
    b = NvmlBackend(nv, sysfs(tmp_path, "0"))
    gpus = b.discover()
    hub = GpuHub(b, gpus, 0.02, 1.0)
    await hub.poll_once()
    assert hub.snapshots()[0].status == "ok" and hub.backend_names == "nvml"
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
