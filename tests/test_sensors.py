"""The simulated GPU backend and the hub: timeouts, no pile-up, lost GPUs, bad readings."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import SIM_UUID, async_wait_until
from supervisord_llm.config import SimGpu
from supervisord_llm.errors import GpuLostError, SensorError
from supervisord_llm.sensors.base import GpuInfo, GpuReading
from supervisord_llm.sensors.hub import GpuHub
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
    hub.close()


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
    hub.close()
