"""The simulated GPU backend, the hub and the generic polled source: timeouts, no pile-up,
lost GPUs, bad readings, one backend per GPU, calls on the GPU's thread, closing off the loop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    SIM_UUID,
    async_wait_until,
    base_config,
    fake_service,
    free_port,
    running,
    stays,
    wait_until,
)
from supervisord_llm import ctl
from supervisord_llm.config import SimGpu
from supervisord_llm.errors import GpuLostError, SensorError
from supervisord_llm.sensors.base import (
    GpuBackend,
    GpuHealth,
    GpuInfo,
    GpuReading,
    SensorBusyError,
    SensorTimeoutError,
)
from supervisord_llm.sensors.hub import GpuHub, check_reading
from supervisord_llm.sensors.poll import Snapshot, SourcePoller, _inbox
from supervisord_llm.sensors.sim import SimBackend


def sims(n: int) -> tuple[SimGpu, ...]:
    return tuple(SimGpu(uuid=SIM_UUID.format(i), default_power_limit_w=300,
                        min_power_limit_w=150) for i in range(n))


def write_state(path: Path, doc: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)


def test_sim_readings_and_power_limit(tmp_path: Path) -> None:
    state = tmp_path / "sim.json"
    b = SimBackend(sims(2), str(state))
    g0, g1 = b.discover()
    assert g0.index == 0 and g1.uuid == SIM_UUID.format(1)
    assert b.read(g0).temperature_c == 35.0  # idle without a state file
    write_state(state, {g0.uuid: {"temperature_c": 81.5, "power_w": 250, "utilization_pct": 97,
                                  "memory_used_bytes": 1024}})
    r = b.read(g0)
    assert (r.temperature_c, r.power_w, r.utilization_pct, r.memory_used_bytes) == \
        (81.5, 250.0, 97.0, 1024)
    assert b.read(g1).temperature_c == 35.0
    b.set_power_limit(g0, 200)
    assert b.read(g0).power_limit_w == 200
    with pytest.raises(SensorError, match="outside"):
        b.set_power_limit(g0, 100)
    write_state(state, {g0.uuid: {"lost": True}})
    with pytest.raises(GpuLostError):
        b.read(g0)
    write_state(state, {g0.uuid: {"temperature_c": "hot"}})
    with pytest.raises(SensorError, match="not a number"):
        b.read(g0)
    state.write_text("{not json")
    with pytest.raises(SensorError):
        b.read(g0)


def test_sim_health_and_bad_counters(tmp_path: Path) -> None:
    state = tmp_path / "sim.json"
    b = SimBackend(sims(1), str(state))
    [g] = b.discover()
    h = b.read_health(g)
    assert (h.pcie_gen, h.pcie_width, h.ecc_uncorrected_volatile) == (4, 16, 0)
    assert not h.memory_trouble and not h.link_degraded
    write_state(state, {g.uuid: {"ecc_uncorrected": 3, "pcie_width": 8}})
    h = b.read_health(g)
    assert h.ecc_uncorrected_volatile == 3 and h.memory_trouble and h.link_degraded
    for key, bad in (("ecc_uncorrected", -5), ("ecc_uncorrected", 1.5),
                     ("ecc_uncorrected", "2"), ("ecc_uncorrected", True),
                     ("pcie_width", -8), ("pcie_width", 0), ("pcie_gen", -1)):
        write_state(state, {g.uuid: {key: bad}})
        with pytest.raises(SensorError, match=f"{g.uuid} {key} must be an integer >= "):
            b.read_health(g)


class SlowBackend:
    name = "slow"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0
        self.concurrent = 0
        self.max_concurrent = 0
        self.lock = threading.Lock()

    def discover(self) -> list[GpuInfo]:
        return []

    def read(self, gpu: GpuInfo) -> GpuReading:
        with self.lock:
            self.calls += 1
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if gpu.index == 0:
                self.release.wait(10)
            return GpuReading(temperature_c=40.0 + gpu.index)
        finally:
            with self.lock:
                self.concurrent -= 1

    def set_power_limit(self, gpu: GpuInfo, watts: float) -> None:
        return None

    def read_health(self, gpu: GpuInfo) -> GpuHealth:
        return GpuHealth()

    def close(self) -> None:
        self.release.set()


async def poll_until(hub: GpuHub, pred: Callable[[], bool], timeout: float) -> None:
    async def step() -> bool:
        await hub.poll_once()
        return pred()

    await async_wait_until(step, timeout, what="hub condition")


def info(i: int) -> GpuInfo:
    return GpuInfo(i, SIM_UUID.format(i), "g", "", "nvidia", -1, 1, 300.0, 100.0, 300.0, 89.0,
                   95.0)


async def test_hub_marks_hung_gpu_unresponsive_without_pile_up() -> None:
    backend = SlowBackend()
    hub = GpuHub(backend, [info(0), info(1)], poll_interval_s=0.02, call_timeout_s=0.05)
    started = time.monotonic()
    for _ in range(10):
        await hub.poll_once()
    # ten polls, none of them blocked longer than the call timeout each
    assert time.monotonic() - started < 10 * 0.05 + 1.0
    snaps = {s.info.index: s for s in hub.snapshots()}
    assert snaps[0].status == "unresponsive"
    assert snaps[1].status == "ok" and snaps[1].reading is not None
    assert snaps[1].reading.temperature_c == 41.0
    # GPU0's hung call was never duplicated: one call for it in all ten polls
    assert backend.calls == 1 + 10
    assert hub.errors_total.get("gpu_timeout", 0) >= 1
    backend.release.set()
    await poll_until(hub, lambda: hub.snapshots()[0].status == "ok", 2)
    await hub.aclose()


async def test_hub_with_sim_lost_and_back(tmp_path: Path) -> None:
    state = tmp_path / "sim.json"
    backend = SimBackend(sims(1), str(state))
    gpus = backend.discover()
    hub = GpuHub(backend, gpus, 0.01, 0.5)
    await hub.poll_once()
    assert hub.snapshots()[0].status == "ok"
    write_state(state, {gpus[0].uuid: {"lost": True}})
    await hub.poll_once()
    assert hub.snapshots()[0].status == "lost"
    assert hub.snapshots()[0].reading is not None  # the last good reading is kept for display
    write_state(state, {gpus[0].uuid: {"hang": True}})
    await hub.poll_once()
    await hub.poll_once()
    assert hub.snapshots()[0].status == "unresponsive"
    write_state(state, {gpus[0].uuid: {"temperature_c": 60}})
    await poll_until(hub, lambda: hub.snapshots()[0].status == "ok", 3)
    await hub.aclose()


@pytest.mark.parametrize(("field", "value", "shown"), [
    ("temperature_c", 1e308, "temperature_c 1e+308 C"),
    ("temperature_c", 10000.0, "temperature_c 1e+04 C"),
    ("temperature_c", -41.0, "temperature_c -41 C"),
    ("temperature_c", math.nan, "temperature_c nan C"),
    ("memory_temperature_c", 151.0, "memory_temperature_c 151 C"),
    ("hotspot_c", math.inf, "hotspot_c inf C"),
    ("power_w", -1.0, "power_w -1 W"),
    ("power_w", 5001.0, "power_w 5001 W"),
    ("power_limit_w", 1e300, "power_limit_w 1e+300 W"),
    ("utilization_pct", 1e9, "utilization_pct 1e+09 %"),
    ("utilization_pct", -1, "utilization_pct -1 %"),
    ("memory_used_bytes", -5, "memory_used_bytes -5 B"),
    ("memory_used_bytes", -(10 ** 400), "memory_used_bytes huge B"),
])
def test_an_implausible_reading_is_a_sensor_error(field: str, value: float, shown: str) -> None:
    with pytest.raises(SensorError) as exc:
        fields: dict[str, Any] = {field: value}
        check_reading(info(0), GpuReading(**fields))
    assert str(exc.value).startswith(f"GPU0: implausible {shown} (")
    assert len(str(exc.value)) < 80


def test_plausible_readings_pass() -> None:
    # the bounds themselves, and nothing reported, are readings
    ok = GpuReading(temperature_c=-40.0, memory_temperature_c=150.0, hotspot_c=150,
                    power_w=0.0, power_limit_w=5000.0, utilization_pct=100,
                    memory_used_bytes=0)
    assert check_reading(info(0), ok) is ok
    assert check_reading(info(0), GpuReading()) == GpuReading()


async def test_hub_takes_an_implausible_reading_as_a_failed_read(tmp_path: Path) -> None:
    state = tmp_path / "sim.json"
    backend = SimBackend(sims(1), str(state))
    [g] = backend.discover()
    hub = GpuHub(backend, [g], 0.01, 0.5)
    write_state(state, {g.uuid: {"temperature_c": 70}})
    await hub.poll_once()
    assert hub.snapshots()[0].status == "ok"
    for bad in ({"temperature_c": 1e308}, {"temperature_c": 10000},
                {"memory_temperature_c": -300}, {"power_w": 1e9}, {"memory_used_bytes": -1}):
        write_state(state, {g.uuid: bad})
        await hub.poll_once()
        snap = hub.snapshots()[0]
        assert snap.status == "error", bad
        assert snap.error is not None and "implausible" in snap.error and len(snap.error) < 100
        assert snap.reading is not None and snap.reading.temperature_c == 70.0  # the last good
    assert hub.errors_total["gpu"] == 5
    write_state(state, {g.uuid: {"temperature_c": 71}})
    await hub.poll_once()
    assert hub.snapshots()[0].status == "ok" and hub.snapshots()[0].reading == \
        backend.read(g)
    await hub.aclose()


def test_a_degraded_link_is_a_narrow_one_not_a_slow_one() -> None:
    assert not GpuHealth().link_degraded
    assert not GpuHealth(pcie_gen=1, pcie_gen_max=5, pcie_width=16,
                         pcie_width_max=16).link_degraded  # idle: PCIe power management
    assert GpuHealth(pcie_gen=5, pcie_gen_max=5, pcie_width=8, pcie_width_max=16).link_degraded
    assert not GpuHealth(pcie_gen=5, pcie_gen_max=5, pcie_width=8).link_degraded  # no max


def test_llmctl_flags_a_narrow_link_only() -> None:
    def table(**health: Any) -> str:
        base = {"pcie_gen": 4, "pcie_gen_max": 5, "pcie_width": 16, "pcie_width_max": 16}
        h = {**base, **health}
        h["link_degraded"] = GpuHealth(**h).link_degraded
        return ctl.render_status({"gpus": [{"index": 0, "uuid": "u", "name": "g", "health": h}]})

    assert "PCIe" not in table()  # gen4 of gen5, all lanes: as it should be when idle
    assert "GPU0: PCIe link gen4 x8 below gen5 x16: 8 of 16 lanes" in table(pcie_width=8)


def test_llmctl_temp_is_the_one_the_policy_acts_on() -> None:
    def row(**gpu: Any) -> list[str]:
        text = ctl.render_status({"gpus": [{"index": 0, "uuid": "u", "name": "g",
                                            "thermal_state": "throttled", **gpu}]})
        header, line = [x.split() for x in text.splitlines() if x.startswith(("GPU ", "0 "))]
        return [line[header.index("TEMP")], line[header.index("MEMTEMP")]]

    # AMD: the junction (107), not the edge (42)
    assert row(temperature_c=42.0, hotspot_c=107.0, memory_temperature_c=68.0) == \
        ["107C", "68C"]
    assert row(temperature_c=83.0, hotspot_c=None) == ["83C", "-"]  # NVIDIA: the core
    assert row(temperature_c=None, hotspot_c=None) == ["-", "-"]  # no fresh reading


# --- one backend per GPU -----------------------------------------------------------------------


class FakeBackend:
    """Scripted backend: `hang` (a set of uuids) blocks reads until `release`; records which
    thread ran each operation; `close_hangs` blocks close() until `release`."""

    def __init__(self, name: str, base_c: float) -> None:
        self.name = name
        self.base_c = base_c
        self.hang: set[str] = set()
        self.release = threading.Event()
        self.entered = threading.Event()
        self.ops: list[tuple[str, str, str]] = []  # (op, uuid, thread name)
        self.lock = threading.Lock()
        self.concurrent = 0
        self.max_concurrent = 0
        self.close_hangs = False
        self.closed_on: str | None = None

    def _op(self, op: str, gpu: GpuInfo) -> None:
        with self.lock:
            self.ops.append((op, gpu.uuid, threading.current_thread().name))

    def reads(self, gpu: GpuInfo) -> int:
        with self.lock:
            return sum(1 for op, u, _ in self.ops if op == "read" and u == gpu.uuid)

    def discover(self) -> list[GpuInfo]:
        return []

    def read(self, gpu: GpuInfo) -> GpuReading:
        self._op("read", gpu)
        with self.lock:
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if gpu.uuid in self.hang:
                self.entered.set()
                self.release.wait(10)
            return GpuReading(temperature_c=self.base_c + gpu.index, power_limit_w=250.0)
        finally:
            with self.lock:
                self.concurrent -= 1

    def set_power_limit(self, gpu: GpuInfo, watts: float) -> None:
        self._op("set_power_limit", gpu)

    def read_health(self, gpu: GpuInfo) -> GpuHealth:
        return GpuHealth()

    def close(self) -> None:
        self.closed_on = threading.current_thread().name
        if self.close_hangs:
            self.release.wait(10)


def two_vendor_hub(timeout: float = 0.1) -> tuple[GpuHub, FakeBackend, FakeBackend,
                                                  GpuInfo, GpuInfo]:
    nv, amd = FakeBackend("fake-nv", 40.0), FakeBackend("fake-amd", 60.0)
    g0 = dataclasses.replace(info(0), backend="fake-nv")
    g1 = dataclasses.replace(info(1), vendor="amd", backend="fake-amd")
    backends: dict[str, GpuBackend] = {g0.uuid: nv, g1.uuid: amd}
    return GpuHub(backends, [g0, g1], 0.02, timeout), nv, amd, g0, g1


async def test_two_backends_in_one_hub_route_and_isolate() -> None:
    hub, nv, amd, g0, g1 = two_vendor_hub()
    assert hub.backend_names == "fake-nv+fake-amd"
    assert hub.backend_of(g1) is amd and hub.backends == (nv, amd)
    await hub.poll_once()
    s0, s1 = hub.snapshots()
    assert s0.reading is not None and s0.reading.temperature_c == 40.0
    assert s1.reading is not None and s1.reading.temperature_c == 61.0
    assert [u for _, u, _ in nv.ops] == [g0.uuid] and [u for _, u, _ in amd.ops] == [g1.uuid]
    # NVIDIA's GPU hangs: the AMD GPU is read at every poll, each poll within its deadline
    nv.hang.add(g0.uuid)
    for _ in range(5):
        started = time.monotonic()
        await hub.poll_once()
        assert time.monotonic() - started < 0.1 + 0.5
    s0, s1 = hub.snapshots()
    assert s0.status == "unresponsive" and s1.status == "ok"
    assert amd.reads(g1) == 6 and nv.reads(g0) == 2  # one hung read, never duplicated
    nv.release.set()
    await poll_until(hub, lambda: hub.snapshots()[0].status == "ok", 2)
    await hub.aclose()


async def test_a_hung_gpu_does_not_hold_back_the_readings_of_the_others() -> None:
    """One wait for every GPU's read, but each reading is published as it arrives: the other
    GPU's fresh reading is seen while the hung one's poll is still waiting for its deadline."""
    hub, nv, _amd, g0, _g1 = two_vendor_hub(timeout=5.0)
    await hub.poll_once()
    before = hub.snapshots()[1].read_at
    nv.hang.add(g0.uuid)
    poll = asyncio.create_task(hub.poll_once())
    await async_wait_until(lambda: hub.snapshots()[1].read_at != before, 2,
                           what="the answering GPU's reading")
    assert not poll.done() and hub.snapshots()[1].status == "ok"
    nv.release.set()
    await asyncio.wait_for(poll, 5)
    assert hub.snapshots()[0].status == "ok"
    await hub.aclose()


async def test_results_that_arrive_together_wake_the_loop_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The sources' threads hand their results to the loop through one inbox: the first of a
    burst schedules one callback (one write to the loop's self-pipe), which takes them all."""
    loop = asyncio.get_running_loop()
    scheduled: list[object] = []
    call_soon_threadsafe = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any, **kwargs: Any) -> asyncio.Handle:
        scheduled.append(callback)
        return call_soon_threadsafe(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    got: list[int] = []
    inbox = _inbox(loop)

    def send() -> None:
        for i in range(8):
            inbox.put(got.append, i)

    sender = threading.Thread(target=send)
    sender.start()
    sender.join()  # all eight are in before the loop runs again
    await async_wait_until(lambda: len(got) == 8, 2, what="the results")
    assert got == list(range(8)) and len(scheduled) == 1
    inbox.put(got.append, 8)  # a later one: a callback of its own
    await async_wait_until(lambda: len(got) == 9, 2, what="the next result")
    assert len(scheduled) == 2


async def test_hub_call_runs_on_the_gpu_thread_after_a_read_in_progress() -> None:
    hub, nv, amd, g0, g1 = two_vendor_hub(timeout=5.0)
    where = await hub.call(g0, lambda b, g: (threading.current_thread().name, b.name, g.index))
    assert where == ("gpu0", "fake-nv", 0)
    await hub.set_power_limit(g1, 200)
    assert amd.ops == [("set_power_limit", g1.uuid, "gpu1")]
    # a read in progress: the call waits for it, then runs on the same thread, never alongside
    nv.hang.add(g0.uuid)
    poll = asyncio.create_task(hub.poll_once())
    await async_wait_until(nv.entered.is_set, 5, what="the read to start")
    call = asyncio.create_task(hub.call(g0, lambda b, g: b.set_power_limit(g, 300)))
    await asyncio.sleep(0)  # let the call reach its wait (a yield, not a timed sleep)
    with pytest.raises(SensorBusyError, match="GPU0 busy: previous call still running"):
        await hub.call(g0, lambda b, g: None)  # one call waiting is enough
    nv.release.set()
    await asyncio.wait_for(call, 5)
    await asyncio.wait_for(poll, 5)
    assert [(op, t) for op, u, t in nv.ops if u == g0.uuid][-2:] == \
        [("read", "gpu0"), ("set_power_limit", "gpu0")]
    assert nv.max_concurrent == 1
    await hub.aclose()


async def test_hub_call_timeout_marks_unresponsive_and_refuses_while_busy() -> None:
    hub, nv, _, g0, _ = two_vendor_hub(timeout=0.1)
    await hub.poll_once()
    stuck = threading.Event()
    updates: list[int] = []
    hub.on_update(lambda: updates.append(1))
    with pytest.raises(SensorTimeoutError, match="GPU0 unresponsive: call did not return within"):
        await hub.call(g0, lambda b, g: stuck.wait(10))
    assert hub.snapshots()[0].status == "unresponsive" and updates
    assert hub.errors_total["gpu_timeout"] == 1
    started = time.monotonic()
    with pytest.raises(SensorBusyError, match="GPU0 busy: previous call still running"):
        await hub.call(g0, lambda b, g: None)
    assert time.monotonic() - started < 0.09  # at once, not after the 0.1 s deadline
    reads = nv.reads(g0)
    for _ in range(3):
        await hub.poll_once()
    assert nv.reads(g0) == reads  # nothing submitted behind the hung call
    assert hub.snapshots()[1].status == "ok"
    stuck.set()
    await poll_until(hub, lambda: hub.snapshots()[0].status == "ok", 2)
    assert await hub.call(g0, lambda b, g: "done") == "done"
    # a read hung past its deadline: a call is refused at once too
    nv.hang.add(g0.uuid)
    await hub.poll_once()
    assert hub.snapshots()[0].status == "unresponsive"
    with pytest.raises(SensorBusyError, match="GPU0 busy"):
        await hub.call(g0, lambda b, g: None)
    nv.release.set()
    await hub.aclose()


async def test_hub_call_errors_lost_and_refused(tmp_path: Path) -> None:
    state = tmp_path / "sim.json"
    backend = SimBackend(sims(1), str(state))
    [g] = backend.discover()
    hub = GpuHub(backend, [g], 0.02, 1.0)
    await hub.poll_once()
    await hub.set_power_limit(g, 200)
    await hub.poll_once()
    assert hub.snapshots()[0].power_limit_w == 200
    with pytest.raises(SensorError, match="outside"):
        await hub.set_power_limit(g, 10)
    assert hub.snapshots()[0].status == "ok"  # a refused setting is not a sensor failure
    write_state(state, {g.uuid: {"lost": True}})
    with pytest.raises(GpuLostError):
        await hub.call(g, lambda b, gpu: b.read(gpu))
    assert hub.snapshots()[0].status == "lost" and hub.errors_total["gpu_lost"] == 1
    with pytest.raises(SensorError, match="not one of this hub's GPUs"):
        await hub.call(info(7), lambda b, gpu: None)
    await hub.aclose()


async def test_hub_close_never_blocks_the_loop() -> None:
    hub, nv, amd, g0, _ = two_vendor_hub(timeout=0.1)
    nv.hang.add(g0.uuid)
    nv.close_hangs = True
    await hub.poll_once()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    await hub.aclose()  # a hung read and a hung close: waits at most two deadlines
    elapsed = time.monotonic() - started
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert elapsed < 2 * 0.1 + 0.5 and ticks >= 3
    assert amd.closed_on is not None and amd.closed_on != "MainThread"
    assert nv.closed_on is not None and nv.closed_on != "MainThread"
    await hub.poll_once()  # closed: nothing happens
    nv.release.set()
    # the synchronous close returns at once too
    hub2, nv2, *_ = two_vendor_hub(timeout=0.1)
    nv2.close_hangs = True
    started = time.monotonic()
    hub2.close()
    assert time.monotonic() - started < 0.09
    await async_wait_until(lambda: nv2.closed_on is not None, 5, what="background close")
    assert nv2.closed_on != "MainThread"
    nv2.release.set()


# --- the generic polled source (the UPS's slot) ------------------------------------------------


class FakeUps:
    """A UPS-like blocking source: a dict of variables, an error, or a hang."""

    name = "ups"

    def __init__(self) -> None:
        self.charge = 100
        self.fail: Exception | None = None
        self.hang = threading.Event()
        self.release = threading.Event()
        self.reads = 0
        self.closed = False

    def read(self) -> dict[str, str]:
        self.reads += 1
        if self.hang.is_set():
            self.release.wait(10)
        if self.fail is not None:
            raise self.fail
        return {"ups.status": "OL", "battery.charge": str(self.charge)}

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def test_source_poller_ok_error_hang_and_age() -> None:
    ups, clock = FakeUps(), Clock()
    poller: SourcePoller[dict[str, str]] = SourcePoller(ups, 0.02, 0.1, clock=clock)
    changes: list[Snapshot[dict[str, str]]] = []
    poller.on_change(changes.append)
    assert poller.snapshot.status == "unknown" and poller.snapshot.age_s(clock()) is None
    await poller.poll_once()
    snap = poller.snapshot
    assert (snap.name, snap.status, snap.error) == ("ups", "ok", None)
    assert snap.value == {"ups.status": "OL", "battery.charge": "100"}
    clock.t += 3
    assert snap.age_s(clock()) == 3.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.status = "error"  # type: ignore[misc]
    ups.fail = SensorError("upsd: connection refused")
    await poller.poll_once()
    snap = poller.snapshot
    assert snap.status == "error" and snap.error == "SensorError: upsd: connection refused"
    assert snap.value is not None and snap.read_at == 1000.0  # the last good value, its age
    assert poller.errors_total == {"ups": 1}
    ups.fail = None
    ups.hang.set()
    await poller.poll_once()
    assert poller.snapshot.status == "unresponsive"
    assert "did not return within 0.1 s" in (poller.snapshot.error or "")
    reads = ups.reads
    clock.t += 1
    await poller.poll_once()
    assert ups.reads == reads and poller.snapshot.error == "sensor call running for 1.0 s"
    assert poller.errors_total == {"ups": 1, "ups_timeout": 1}
    ups.hang.clear()
    ups.release.set()
    ups.charge = 80

    async def recovered() -> bool:
        await poller.poll_once()
        return poller.snapshot.status == "ok"

    await async_wait_until(recovered, 2, what="the source to answer again")
    assert poller.snapshot.value == {"ups.status": "OL", "battery.charge": "80"}
    assert [c.status for c in changes][:4] == ["ok", "error", "unresponsive", "unresponsive"]
    await poller.aclose()
    assert ups.closed


class AsyncFakeUps:
    name = "ups"

    def __init__(self) -> None:
        self.hang = False
        self.cancelled = 0

    async def read(self) -> float:
        if self.hang:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return 87.5


async def test_async_source_is_cancelled_at_its_deadline() -> None:
    ups = AsyncFakeUps()
    poller: SourcePoller[float] = SourcePoller(ups, 0.02, 0.1)
    updates: list[int] = []
    poller.on_update(lambda: updates.append(1))
    task = asyncio.create_task(poller.run())
    await async_wait_until(lambda: poller.snapshot.status == "ok", 5, what="first reading")
    assert poller.snapshot.value == 87.5
    ups.hang = True
    await async_wait_until(lambda: poller.snapshot.status == "unresponsive", 5,
                           what="unresponsive")
    await async_wait_until(lambda: ups.cancelled >= 1, 5, what="the hung read cancelled")
    ups.hang = False
    await async_wait_until(lambda: poller.snapshot.status == "ok", 5, what="recovery")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    with pytest.raises(TypeError, match="blocking read"):
        await poller.call(lambda: None)
    await poller.aclose()
    assert updates


def test_daemon_takes_no_action_on_an_implausible_temperature(tmp_path: Path) -> None:
    thermal = {"warn_c": 83, "throttle_c": 85, "critical_c": 88, "resume_c": 79,
               "step_interval_s": 0.3, "on_critical": "stop"}
    doc = base_config(tmp_path, [fake_service("a", free_port(), gpus=[0])], gpus=1,
                      thermal=thermal)
    doc["gpu"]["poll_interval_s"] = 0.1
    state = tmp_path / "sim.json"
    with running(tmp_path, doc) as d:
        d.wait_state("a", "ready")
        for temp in (1e308, 10000.0):
            write_state(state, {SIM_UUID.format(0): {"temperature_c": temp}})
            g = wait_until(lambda: (x := d.status()["gpus"][0])["thermal_state"] ==
                           "unresponsive" and x, 5, what="the GPU unresponsive")
            assert g["temperature_c"] is None and "implausible temperature_c" in g["error"]
            stays(lambda: d.service("a")["state"] == "ready"  # several polls: nothing is
                  and d.status()["gpus"][0]["power_limit_w"] == 300,  # done on it
                  0.5, "the service or the power limit was touched")
            row = [x for x in d.llmctl("status").stdout.splitlines() if x.startswith("0 ")]
            assert row and max(len(x) for x in row) < 120, row
            write_state(state, {SIM_UUID.format(0): {"temperature_c": 40}})
            wait_until(lambda: d.status()["gpus"][0]["thermal_state"] == "ok", 5, what="ok")
        assert d.service("a")["state"] == "ready" and "critical" not in d.logtext()
        assert max(len(x) for x in d.logtext().splitlines()) < 200
