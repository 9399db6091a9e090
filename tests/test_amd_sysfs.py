"""The amd-sysfs backend on a real RX 9070 XT's sysfs tree (tests/fixtures/amdgpu-rdna4),
written under tmp_path: discovery, readings, the power limit, a card that vanishes and comes
back, health, `auto` beside NVML, and the daemon pinning a service to the card."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    Daemon,
    base_config,
    fake_service,
    free_port,
    proc_environ,
    running,
    toml_dumps,
    wait_until,
)
from supervisord_llm.config import GpuSection, parse_config
from supervisord_llm.errors import ConfigError, GpuLostError, SensorError
from supervisord_llm.sensors import amd_sysfs
from supervisord_llm.sensors.amd_sysfs import AmdSysfsBackend, pcie_gen
from supervisord_llm.sensors.base import GpuInfo
from supervisord_llm.sensors.discovery import DiscoveryError, discover_gpus, vendor_backends
from supervisord_llm.sensors.events import GpuEvent, GpuEvents
from supervisord_llm.sensors.hub import GpuHub

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "amdgpu-rdna4" / "tree.json"
CARD = "class/drm/card1/device"
HWMON = f"{CARD}/hwmon/hwmon5"
KFD = "class/kfd/kfd/topology/nodes"
UUID = "GPU-2f987739463f9020"
PCI = "0000:0f:00.0"


def fixture() -> dict[str, str]:
    files: dict[str, str] = json.loads(FIXTURE.read_text())
    return files


def write_tree(root: Path, files: Mapping[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def moved(files: Mapping[str, str], old: str, new: str) -> dict[str, str]:
    """The files with the path prefix `old` renamed to `new`."""
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in files.items()}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "sys", fixture())


def only_gpu(root: Path) -> tuple[AmdSysfsBackend, GpuInfo]:
    backend = AmdSysfsBackend(root)
    gpus = backend.discover()
    assert len(gpus) == 1
    return backend, gpus[0]


def test_discovers_the_card_and_skips_connectors_and_other_vendors(tree: Path) -> None:
    # an NVIDIA card beside it is NVML's (and a radeon-driven AMD card is not amdgpu's)
    write_tree(tree, {
        "class/drm/card0/device/vendor": "0x10de\n",
        "class/drm/card0/device/uevent": "DRIVER=nvidia\nPCI_SLOT_NAME=0000:41:00.0\n",
        "class/drm/card2/device/vendor": "0x1002\n",
        "class/drm/card2/device/uevent": "DRIVER=radeon\nPCI_SLOT_NAME=0000:42:00.0\n"})
    gpus = AmdSysfsBackend(tree).discover()
    assert len(gpus) == 1
    g = gpus[0]
    assert (g.uuid, g.pin, g.pin_token) == (UUID, "", UUID)
    assert (g.pci_bus_id, g.vendor, g.numa_node) == (PCI, "amd", -1)
    assert g.name == "AMD GPU 1002:7550 rev c0"
    assert g.memory_total_bytes == 17095983104
    # RDNA4 before kernel 6.17: power1_cap_min 0 is no floor -> None
    assert (g.default_power_limit_w, g.min_power_limit_w, g.max_power_limit_w) == \
        (304.0, None, 340.0)
    assert (g.slowdown_c, g.shutdown_c) == (110.0, 115.0)  # the junction's crit, emergency


def test_limits_thresholds_and_numa_variants(tree: Path) -> None:
    write_tree(tree, {f"{HWMON}/power1_cap_min": "100000000\n", f"{CARD}/numa_node": "1\n",
                      # no junction sensor (an older board): the edge's thresholds
                      f"{HWMON}/temp1_crit": "100000\n", f"{HWMON}/temp1_emergency": "105000\n"})
    (tree / HWMON / "temp2_label").unlink()
    (tree / HWMON / "temp2_input").unlink()
    _, g = only_gpu(tree)
    assert g.min_power_limit_w == 100.0
    assert g.numa_node == 1
    assert (g.slowdown_c, g.shutdown_c) == (100.0, 105.0)
    # numa_node -1: the one node whose CPUs are exactly local_cpulist
    write_tree(tree, {f"{CARD}/numa_node": "-1\n", f"{CARD}/local_cpulist": "8-15\n",
                      "devices/system/node/online": "0-1\n",
                      "devices/system/node/node0/cpulist": "0-7\n",
                      "devices/system/node/node1/cpulist": "8-15\n"})
    _, g = only_gpu(tree)
    assert g.numa_node == 1
    write_tree(tree, {f"{CARD}/local_cpulist": "0-15\n"})  # both nodes: no preference
    _, g = only_gpu(tree)
    assert g.numa_node == -1


def test_a_reading(tree: Path) -> None:
    backend = AmdSysfsBackend(tree)
    g = backend.discover()[0]
    r = backend.read(g)
    assert (r.temperature_c, r.hotspot_c, r.memory_temperature_c) == (42.0, 45.0, 68.0)
    assert r.policy_c == 45.0  # the junction
    assert (r.power_w, r.power_limit_w) == (55.0, 120.0)  # power1_average, power1_cap
    assert (r.utilization_pct, r.memory_used_bytes) == (3.0, 1476395008)
    (tree / HWMON / "temp2_input").write_text("71000\n")
    assert backend.read(g).policy_c == 71.0
    # an APU: power1_input only
    (tree / HWMON / "power1_average").unlink()
    write_tree(tree, {f"{HWMON}/power1_input": "23000000\n"})
    backend, g = only_gpu(tree)
    assert backend.read(g).power_w == 23.0


# what a file that cannot be read looks like: (how to break it, the error it gives)
BREAKS = ("directory", "garbage", "EIO", "EPERM", "EACCES")


def break_file(path: Path, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if how == "directory":  # EISDIR on read
        path.unlink()
        path.mkdir()
    elif how == "garbage":
        path.write_text("garbage\n")
    else:
        real_read = amd_sysfs._read
        code = {"EIO": errno.EIO, "EPERM": errno.EPERM, "EACCES": errno.EACCES}[how]

        def failing(p: Path) -> str:
            if p == path:
                raise OSError(code, os.strerror(code))
            return real_read(p)

        monkeypatch.setattr(amd_sysfs, "_read", failing)


@pytest.mark.parametrize("how", BREAKS)
@pytest.mark.parametrize(("name", "field"), [
    pytest.param(path, field, id=Path(path).name) for path, field in (
        (f"{HWMON}/temp1_input", "temperature_c"),
        (f"{HWMON}/temp3_input", "memory_temperature_c"),
        (f"{HWMON}/power1_average", "power_w"), (f"{HWMON}/power1_cap", "power_limit_w"),
        (f"{CARD}/gpu_busy_percent", "utilization_pct"),
        (f"{CARD}/mem_info_vram_used", "memory_used_bytes"))])
def test_another_file_failing_leaves_its_value_out_not_the_junction(
        tree: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        name: str, field: str, *, how: str) -> None:
    backend, g = only_gpu(tree)
    (tree / HWMON / "temp2_input").write_text("112000\n")  # above its crit (110)
    break_file(tree / name, how, monkeypatch)
    for _ in range(3):
        r = backend.read(g)
        assert getattr(r, field) is None
        assert r.hotspot_c == r.policy_c == 112.0  # the policy still sees the heat
        others = {"temperature_c": 42.0, "memory_temperature_c": 68.0, "power_w": 55.0,
                  "power_limit_w": 120.0, "utilization_pct": 3.0,
                  "memory_used_bytes": 1476395008}
        del others[field]
        assert {k: getattr(r, k) for k in others} == others
    said = [x.getMessage() for x in caplog.records if "unreadable" in x.getMessage()]
    assert len(said) == 1  # once, not at every poll
    assert said[0].startswith(f"GPU0 ({PCI}): {Path(name).name} unreadable (")


@pytest.mark.parametrize("how", BREAKS)
def test_the_junction_unreadable_is_a_sensor_error_never_the_edge(
        tree: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    backend, g = only_gpu(tree)
    break_file(tree / HWMON / "temp2_input", how, monkeypatch)
    expected = ("the driver refuses to read temp2_input" if how == "EPERM" else
                "junction temperature unreadable: temp2_input: ")
    for _ in range(2):
        with pytest.raises(SensorError, match=expected) as info:
            backend.read(g)
        assert not isinstance(info.value, GpuLostError)


def test_a_board_without_junction_needs_its_edge(tree: Path) -> None:
    (tree / HWMON / "temp2_label").unlink()
    (tree / HWMON / "temp2_input").unlink()
    backend, g = only_gpu(tree)
    assert backend.read(g).policy_c == 42.0
    (tree / HWMON / "temp1_input").write_text("garbage\n")
    with pytest.raises(SensorError, match="edge temperature unreadable: temp1_input: not a "
                                          "number: 'garbage'") as info:
        backend.read(g)
    assert not isinstance(info.value, GpuLostError)


def test_the_junction_sensor_vanishing_is_no_lost_gpu_nor_a_fall_back_to_the_edge(
        tree: Path) -> None:
    backend, g = only_gpu(tree)
    junction = tree / HWMON / "temp2_input"
    junction.write_text("107000\n")
    assert backend.read(g).policy_c == 107.0
    junction.unlink()
    # the card is still there: not lost, and never read as its edge (42)
    for expected in ("temp2_input: vanished", r"no junction sensor \(hwmon5\)",
                     r"no junction sensor \(hwmon5\)"):
        with pytest.raises(SensorError, match="junction temperature unreadable: " + expected
                           ) as info:
            backend.read(g)
        assert not isinstance(info.value, GpuLostError)
    write_tree(tree, {f"{HWMON}/temp2_label": "junction\n", f"{HWMON}/temp2_input": "90000\n"})
    assert backend.read(g).policy_c == 90.0
    # its hwmon directory renumbered while the card stays: found again, not lost
    (tree / HWMON).rename(tree / CARD / "hwmon/hwmon6")
    with pytest.raises(SensorError, match="junction temperature unreadable"):
        backend.read(g)
    assert backend.read(g).policy_c == 90.0
    # the power limit file gone while the card stays: the setting fails, the card is not lost
    (tree / CARD / "hwmon/hwmon6/power1_cap").unlink()
    with pytest.raises(SensorError, match="power1_cap vanished") as info:
        backend.set_power_limit(g, 200)
    assert not isinstance(info.value, GpuLostError)
    # the device itself gone: lost
    shutil.rmtree(tree / "class/drm/card1")
    with pytest.raises(GpuLostError, match="is gone"):
        backend.read(g)


def test_a_card_back_without_its_junction_sensor_stays_lost(tree: Path) -> None:
    backend, g = only_gpu(tree)
    files = fixture()
    shutil.rmtree(tree / "class/drm/card1")
    with pytest.raises(GpuLostError):
        backend.read(g)
    write_tree(tree, {k: v for k, v in files.items() if "temp2_" not in k})
    with pytest.raises(GpuLostError, match="not present"):
        backend.read(g)  # back on the bus, its driver not done: not read from the edge
    write_tree(tree, files)
    assert backend.read(g).policy_c == 45.0


async def test_a_vanished_junction_file_is_an_error_in_the_hub_not_lost_and_back(
        tree: Path) -> None:
    backend, g = only_gpu(tree)
    hub = GpuHub(backend, [g], 0.05, 2.0)
    got: list[GpuEvent] = []
    events = GpuEvents([g], got.append, hub=hub)
    events.start()
    try:
        (tree / HWMON / "temp2_input").write_text("107000\n")
        await hub.poll_once()
        assert hub.snapshots()[0].status == "ok"
        (tree / HWMON / "temp2_input").unlink()
        for _ in range(3):
            await hub.poll_once()
            snap = hub.snapshots()[0]
            assert snap.status == "error" and "junction temperature unreadable" in str(
                snap.error)
            assert snap.reading is not None and snap.reading.policy_c == 107.0  # kept
        write_tree(tree, {f"{HWMON}/temp2_input": "90000\n"})
        await hub.poll_once()
        snap = hub.snapshots()[0]
        assert snap.status == "ok" and snap.reading is not None and snap.reading.policy_c == 90
        assert got == []  # neither Lost nor Back: the card never left
    finally:
        await events.aclose()
        await hub.aclose()


def test_asleep_card_reads_empty_and_a_refusal_while_awake_is_an_error(
        tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend, g = only_gpu(tree)
    real_read = amd_sysfs._read

    def refusing(path: Path) -> str:  # what amdgpu answers while runtime-suspended (BACO)
        if path.parent.name == "hwmon5" or path.name == "gpu_busy_percent":
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real_read(path)

    monkeypatch.setattr(amd_sysfs, "_read", refusing)
    write_tree(tree, {f"{CARD}/power/runtime_status": "suspended\n"})
    r = backend.read(g)
    assert (r.temperature_c, r.hotspot_c, r.power_w, r.utilization_pct) == (None,) * 4
    assert r.memory_used_bytes == 1476395008
    write_tree(tree, {f"{CARD}/power/runtime_status": "active\n"})
    with pytest.raises(SensorError, match=r"refuses to read temp1_input, .* \(EPERM"):
        backend.read(g)


def test_card_without_unique_id_is_pinned_by_its_kfd_index(tree: Path) -> None:
    (tree / CARD / "unique_id").unlink()
    # the KFD topology still has the id: ROCR knows the card by it
    backend, g = only_gpu(tree)
    assert (g.uuid, g.pin) == (UUID, "")
    # no id anywhere (an iGPU): by ROCm index, counting GPU nodes only, not the DRM number
    props = (tree / KFD / "1" / "properties").read_text()
    props = props.replace("unique_id 3429622204118044704", "unique_id 0")
    (tree / KFD / "1" / "properties").write_text(props)
    backend, g = only_gpu(tree)
    assert (g.uuid, g.pin, g.pin_token) == ("AMD-0000:0f:00.0", "0", "0")
    assert backend.read(g).hotspot_c == 45.0
    # an iGPU's node before it (node 1, bus 0x74), ours moved to node 2: index 1
    igpu = props.replace("location_id 3840", "location_id 29696").replace(
        "simd_count 128", "simd_count 24")
    write_tree(tree, {f"{KFD}/2/properties": props, f"{KFD}/1/properties": igpu})
    _, g = only_gpu(tree)
    assert g.pin == "1"


def test_set_power_limit_writes_whole_watts_and_refuses_out_of_range(tree: Path) -> None:
    backend, g = only_gpu(tree)
    cap = tree / HWMON / "power1_cap"
    backend.set_power_limit(g, 200.7)
    assert cap.read_text() == "200000000\n"
    assert backend.read(g).power_limit_w == 200.0
    backend.set_power_limit(g, 99)
    assert cap.read_text() == "99000000\n"
    for watts in (341.0, 1000.0):
        with pytest.raises(SensorError, match=r"to .* W: outside \[0, 340\] W"):
            backend.set_power_limit(g, watts)
    (tree / HWMON / "power1_cap_min").write_text("150000000\n")  # a 6.17 kernel's floor
    with pytest.raises(SensorError, match=r"outside \[150, 340\] W"):
        backend.set_power_limit(g, 149.5)
    assert cap.read_text() == "99000000\n"  # nothing written


def test_card_vanishes_and_comes_back_renumbered(tree: Path) -> None:
    backends = [only_gpu(tree) for _ in range(3)]
    backend, g = backends[0]
    files = fixture()
    for name in os.listdir(tree / "class/drm"):
        if name.startswith("card1"):
            shutil.rmtree(tree / "class/drm" / name)
    # each call notices it (on the card it knew), and again after (looking for it)
    for (b, _), call in zip(backends, ("read", "read_health", "set_power_limit"), strict=True):
        args = (g, 200.0) if call == "set_power_limit" else (g,)
        with pytest.raises(GpuLostError, match=r"is gone: .*card1/device/.* vanished"):
            getattr(b, call)(*args)
        with pytest.raises(GpuLostError, match="is not present"):
            getattr(b, call)(*args)
    # back as card2 with its hwmon directory not there yet: still lost
    back = moved(moved(files, "class/drm/card1", "class/drm/card2"),
                 "class/drm/card2/device/hwmon/hwmon5", "class/drm/card2/device/hwmon/hwmon7")
    write_tree(tree, {k: v for k, v in back.items() if "/hwmon/" not in k})
    with pytest.raises(GpuLostError, match="not present"):
        backend.read(g)
    back["class/drm/card2/device/hwmon/hwmon7/temp2_input"] = "52000\n"
    write_tree(tree, back)
    r = backend.read(g)
    assert (r.temperature_c, r.hotspot_c, r.power_w) == (42.0, 52.0, 55.0)
    backend.set_power_limit(g, 250)
    assert (tree / "class/drm/card2/device/hwmon/hwmon7/power1_cap").read_text() == "250000000\n"


def test_another_card_in_the_slot_is_not_the_lost_one(tree: Path) -> None:
    backend, g = only_gpu(tree)
    shutil.rmtree(tree / CARD)
    with pytest.raises(GpuLostError):
        backend.read(g)
    write_tree(tree, {**{k: v for k, v in fixture().items() if k.startswith(CARD)},
                      f"{CARD}/unique_id": "1111222233334444\n"})
    with pytest.raises(GpuLostError, match="not present"):
        backend.read(g)


def test_pcie_gen_parsing() -> None:
    assert [pcie_gen(s) for s in ("2.5 GT/s PCIe", "8 GT/s", "16.0 GT/s PCIe",
                                  "32.0 GT/s PCIe", "64.0 GT/s PCIe", "Unknown")] == \
        [1, 3, 4, 5, 6, None]


def test_health_on_the_flat_fixture(tree: Path) -> None:
    backend, g = only_gpu(tree)
    h = backend.read_health(g)
    # in use: pp_dpm_pcie's fastest level (16 GT/s x16); the max: the card's own (32 GT/s),
    # as this tree has no PCI hierarchy above it; no ras/: no ECC counters
    assert (h.pcie_gen, h.pcie_gen_max, h.pcie_width, h.pcie_width_max) == (4, 5, 16, 16)
    assert not h.link_degraded  # a lower gen is power saving; all 16 lanes are there
    assert h.clock_events is None
    assert (h.ecc_uncorrected_volatile, h.ecc_corrected_volatile, h.retired_pages,
            h.retirement_pending, h.remap_failed) == (None,) * 5
    assert not h.memory_trouble


def pci_hierarchy(tree: Path, files: Mapping[str, str], dpm: str | None) -> None:
    """The card as real sysfs has it: class/drm/card1/device -> the PCI device, behind the
    board's own switch (AMD bridges 0d:00.0 up, 0e:00.0 down) in a Gen4 root port."""
    shutil.rmtree(tree / "class/drm/card1")
    root_port = "devices/pci0000:00/0000:00:01.1"
    up, down = f"{root_port}/0000:0d:00.0", f"{root_port}/0000:0d:00.0/0000:0e:00.0"
    dev = f"{down}/{PCI}"
    card = {k: v for k, v in files.items() if k.startswith(CARD + "/")}
    write_tree(tree, moved(card, CARD, dev))
    if dpm is None:
        (tree / dev / "pp_dpm_pcie").unlink()
    else:
        (tree / dev / "pp_dpm_pcie").write_text(dpm)
    bridge = {"class": "0x060400\n", "current_link_width": "16\n", "max_link_width": "16\n"}
    write_tree(tree, {f"{root_port}/{k}": v for k, v in {
        **bridge, "vendor": "0x1022\n", "current_link_speed": "16.0 GT/s PCIe\n",
        "max_link_speed": "16.0 GT/s PCIe\n"}.items()})
    for port in (up, down):
        write_tree(tree, {f"{port}/{k}": v for k, v in {
            **bridge, "vendor": "0x1002\n", "current_link_speed": "32.0 GT/s PCIe\n",
            "max_link_speed": "32.0 GT/s PCIe\n"}.items()})
    (tree / up / "current_link_speed").write_text("2.5 GT/s PCIe\n")  # idle: PCIe DPM
    write_tree(tree, {k: v for k, v in files.items() if k.startswith("class/drm/card1/")
                      and not k.startswith(CARD + "/")})
    (tree / CARD).symlink_to(tree / dev)


def test_health_reads_the_real_link_above_the_boards_switch(tree: Path) -> None:
    files = fixture()
    pci_hierarchy(tree, files, files[f"{CARD}/pp_dpm_pcie"])
    backend, g = only_gpu(tree)
    h = backend.read_health(g)
    assert (h.pcie_gen, h.pcie_gen_max, h.pcie_width, h.pcie_width_max) == (4, 4, 16, 16)
    assert not h.link_degraded  # a Gen5 card in a Gen4 slot, idling: as it should be
    # a riser that trained at Gen3 x8: the driver caps its levels there
    (tree / CARD / "pp_dpm_pcie").write_text("0: 2.5GT/s, x8 250Mhz *\n1: 8.0GT/s, x8 1143Mhz \n")
    h = backend.read_health(g)
    assert (h.pcie_gen, h.pcie_width) == (3, 8) and h.link_degraded
    # no pp_dpm_pcie: the link's own current_link_* (its speed drops when idle)
    (tree / CARD / "pp_dpm_pcie").unlink()
    h = backend.read_health(g)
    assert (h.pcie_gen, h.pcie_gen_max, h.pcie_width, h.pcie_width_max) == (1, 4, 16, 16)
    assert backend.read(g).hotspot_c == 45.0


def test_health_ras_counters(tree: Path) -> None:
    write_tree(tree, {f"{CARD}/ras/features": "feature mask: 0x3fff\n",
                      f"{CARD}/ras/umc_err_count": "ue: 2\nce: 5\n",
                      f"{CARD}/ras/gfx_err_count": "ue: 1\nce: 0\n",
                      f"{CARD}/ras/gpu_vram_bad_pages":
                          "0x00000001 : 0x00001000 : R\n0x00000002 : 0x00001000 : P\n"})
    backend, g = only_gpu(tree)
    h = backend.read_health(g)
    assert (h.ecc_uncorrected_volatile, h.ecc_corrected_volatile, h.retired_pages,
            h.retirement_pending, h.remap_failed) == (3, 5, 1, True, False)
    assert h.memory_trouble
    write_tree(tree, {f"{CARD}/ras/umc_err_count": "ue: 0\nce: 7\n",
                      f"{CARD}/ras/gfx_err_count": "ue: 0\nce: 0\n",
                      f"{CARD}/ras/gpu_vram_bad_pages": "0x00000001 : 0x00001000 : R\n"})
    h = backend.read_health(g)
    assert (h.ecc_uncorrected_volatile, h.ecc_corrected_volatile, h.retired_pages) == (0, 7, 1)
    assert not h.memory_trouble


async def test_auto_discovery_uses_sysfs_for_the_amd_card(tree: Path) -> None:
    cfg = GpuSection(backend="auto", sysfs_root=str(tree), poll_interval_s=0.05)
    disc = await discover_gpus(cfg, vendor_backends(lambda: None))
    assert [(g.index, g.uuid, g.backend) for g in disc.gpus] == [(0, UUID, "amd-sysfs")]
    assert disc.notes == ("nvml: the nvidia-ml-py package (pynvml) is not installed",
                          "amd-sysfs: 1 GPU")
    assert disc.backend_names == "amd-sysfs"
    hub = disc.hub(0.05, 2.0)
    try:
        await hub.poll_once()
        snap = hub.snapshots()[0]
        assert snap.status == "ok" and snap.reading is not None
        assert (snap.reading.hotspot_c, snap.power_limit_w) == (45.0, 120.0)
    finally:
        await hub.aclose()


async def test_explicit_amd_sysfs_without_an_amd_card(tmp_path: Path) -> None:
    cfg = GpuSection(backend="amd-sysfs", sysfs_root=str(tmp_path))
    with pytest.raises(DiscoveryError, match=r"class/drm does not exist"):
        await discover_gpus(cfg, vendor_backends(lambda: None))
    write_tree(tmp_path, {"class/drm/card0/device/vendor": "0x10de\n",
                          "class/drm/card0/device/uevent": "DRIVER=nvidia\n"})
    with pytest.raises(DiscoveryError, match=r"no AMD GPU \(PCI vendor 0x1002, driver "
                                             r"amdgpu\) in .*class/drm"):
        await discover_gpus(cfg, vendor_backends(lambda: None))
    disc = await discover_gpus(GpuSection(backend="auto", sysfs_root=str(tmp_path)),
                               vendor_backends(lambda: None))
    assert disc.gpus == () and disc.notes[1].startswith("amd-sysfs: no AMD GPU")


def test_config_sysfs_root() -> None:
    base = {"service": [{"name": "a", "command": ["/bin/true"]}]}
    assert parse_config(toml_dumps(base)).gpu.sysfs_root == "/sys"
    cfg = parse_config(toml_dumps({**base, "gpu": {"backend": "amd-sysfs",
                                                   "sysfs_root": "/tmp/sys"}}))
    assert cfg.gpu.sysfs_root == "/tmp/sys"
    for gpu, expected in (
        ({"sysfs_root": "sys"}, "gpu.sysfs_root: must be an absolute path"),
        ({"backend": "nvml", "sysfs_root": "/sys"},
         'gpu.sysfs_root: is only used by the AMD sysfs backend (backend = "amd-sysfs" or '
         "\"auto\"), not with 'nvml'"),
    ):
        with pytest.raises(ConfigError) as info:
            parse_config(toml_dumps({**base, "gpu": gpu}))
        assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


@pytest.mark.parametrize("kfd_only", [False, True], ids=["uuid", "rocm-index"])
def test_daemon_pins_a_service_to_the_amd_card(tmp_path: Path, kfd_only: bool) -> None:
    tree = write_tree(tmp_path / "sys", fixture())
    if kfd_only:  # no id at all: pinned by ROCm index
        (tree / CARD / "unique_id").unlink()
        props = tree / KFD / "1" / "properties"
        props.write_text(props.read_text().replace("unique_id 3429622204118044704",
                                                   "unique_id 0"))
    uuid, token = ("AMD-0000:0f:00.0", "0") if kfd_only else (UUID, UUID)
    doc = base_config(tmp_path, [fake_service("svc", free_port(), gpus=[PCI])],
                      gpu={"backend": "amd-sysfs", "sysfs_root": str(tree),
                           "poll_interval_s": 0.1})
    with running(tmp_path, doc) as d:
        svc = d.wait_state("svc", "ready")
        env = proc_environ(svc["pid"])
        assert (env["ROCR_VISIBLE_DEVICES"], env["HIP_VISIBLE_DEVICES"]) == (token, "0")
        assert "CUDA_VISIBLE_DEVICES" not in env
        data = d.status()
        assert data["supervisor"]["gpu_backend"] == "amd-sysfs"
        assert svc["gpus"] == [uuid]
        assert [(g["uuid"], g["pci_bus_id"]) for g in data["gpus"]] == [(uuid, PCI)]
        thresholds = data["gpus"][0]["thresholds"]
        assert (thresholds["slowdown_c"], thresholds["shutdown_c"]) == (110.0, 115.0)
        (tree / HWMON / "temp1_input").write_text("61000\n")
        gpu = wait_for_gpu(d, lambda g: g["temperature_c"] == 61.0)
        assert (gpu["power_w"], gpu["memory_total_bytes"]) == (55.0, 17095983104)


def wait_for_gpu(d: Daemon, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    def match() -> dict[str, Any] | None:
        gpu: dict[str, Any] = d.status()["gpus"][0]
        return gpu if pred(gpu) else None

    result: dict[str, Any] = wait_until(match, 10,
                                        what=f"GPU reading (log: {d.logtext()[-2000:]})")
    return result


def test_daemon_protects_the_amd_card_heated_removed_and_back(tmp_path: Path) -> None:
    """The tree changed while the daemon runs: the junction heats up (the card is throttled
    through power1_cap), the card is pulled (its service is held), then put back."""
    tree = write_tree(tmp_path / "sys", fixture())
    cap = tree / HWMON / "power1_cap"
    cap.write_text("304000000\n")  # the stock limit (the fixture's owner had set 120 W)
    doc = base_config(tmp_path, [fake_service("svc", free_port(), gpus=[PCI])],
                      gpu={"backend": "amd-sysfs", "sysfs_root": str(tree),
                           "poll_interval_s": 0.1},
                      thermal={"warn_c": 83, "throttle_c": 85, "critical_c": 100,
                               "resume_c": 79, "step_interval_s": 0.3})
    with running(tmp_path, doc) as d:
        d.wait_state("svc", "ready")
        (tree / HWMON / "temp2_input").write_text("86000\n")  # the junction (hot spot)
        wait_until(lambda: cap.read_text().strip() == "152000000", 15,
                   what="power1_cap stepped down to the floor (152 W)")
        gpu = wait_for_gpu(d, lambda g: g["thermal_state"] == "throttled")
        assert gpu["hotspot_c"] == 86.0 and gpu["temperature_c"] == 42.0
        (tree / HWMON / "temp2_input").write_text("60000\n")
        wait_until(lambda: cap.read_text().strip() == "304000000", 15, what="restored")
        card = tree / "class/drm/card1"
        card.rename(tree / "class/drm/gone")  # pulled from the bus
        s = wait_until(lambda: (x := d.service("svc"))["holds"] == ["gpu_lost"] and x, 10,
                       what=f"held for the lost GPU (log: {d.logtext()[-1500:]})")
        wait_until(lambda: d.service("svc")["state"] == "stopped", 10, what="stopped")
        (tree / "class/drm/gone").rename(card)  # and back
        d.wait_state("svc", "ready", 15)
        assert d.service("svc")["holds"] == [] and s["pid"] is not None
