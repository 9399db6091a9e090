"""GPU telemetry and the thermal reaction, measured in process.

    .venv/bin/python bench/gpu_poll.py [--gpus 8] [--polls 200] [--trials 20]

1. One telemetry poll of N simulated GPUs (each on its own thread, the backend re-reading
   its state file as a real sysfs backend reads files): the event loop's CPU time per poll
   (what the supervisor's loop pays), the thread CPU time per GPU read, and the wall time of
   a poll (all GPUs in parallel).
2. The thermal reaction: a GPU's reading crosses `throttle_c` (the state file is rewritten at
   a random moment of the poll cycle) and the time until the power-limit call reaches the
   backend, over `--trials`; target: within one poll interval + 20 ms.
Prints a table; docs/performance.md records it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import SIM_UUID, toml_dumps
from supervisord_llm.config import ThermalSection, parse_config
from supervisord_llm.guard import GpuGuard, LimitStore
from supervisord_llm.health import HttpProber
from supervisord_llm.host import Host
from supervisord_llm.sensors.base import GpuInfo, GpuReading
from supervisord_llm.sensors.hub import GpuHub
from supervisord_llm.sensors.sim import SimBackend
from supervisord_llm.spawn import Spawner
from supervisord_llm.supervisor import Supervisor


class TimedSim(SimBackend):
    """The sim backend, with each read's thread CPU time and each limit call's time kept."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.read_cpu: list[float] = []
        self.limit_calls: list[float] = []
        self._rlock = threading.Lock()

    def read(self, gpu: GpuInfo) -> GpuReading:
        t = time.thread_time()
        reading = super().read(gpu)
        with self._rlock:
            self.read_cpu.append(time.thread_time() - t)
        return reading

    def set_power_limit(self, gpu: GpuInfo, watts: float) -> None:
        self.limit_calls.append(time.monotonic())
        super().set_power_limit(gpu, watts)


def config(tmp: Path, gpus: int, poll_s: float) -> tuple[str, object]:
    doc = {
        "gpu": {"backend": "sim", "poll_interval_s": poll_s, "sim_state_file": str(tmp / "s.json"),
                "sim": [{"uuid": SIM_UUID.format(i), "pci_bus_id": f"00000000:{0x41 + i:02x}:00.0"}
                        for i in range(gpus)]},
        "thermal": {"warn_c": 83, "throttle_c": 85, "critical_c": 95, "resume_c": 79,
                    "step_interval_s": 0.001},
    }
    return str(tmp / "s.json"), parse_config(toml_dumps(doc))


async def poll_cost(gpus: int, polls: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        state, cfg = config(Path(d), gpus, 1.0)
        Path(state).write_text(json.dumps({SIM_UUID.format(i): {"temperature_c": 50 + i}
                                           for i in range(gpus)}))
        backend = TimedSim(cfg.gpu.sim, state)  # type: ignore[attr-defined]
        infos = backend.discover()
        hub = GpuHub(backend, infos, 1.0, 2.0)
        await hub.poll_once()  # warm
        backend.read_cpu.clear()
        loop_cpu, wall = [], []
        for _ in range(polls):
            c, w = time.thread_time(), time.perf_counter()
            await hub.poll_once()
            wall.append(time.perf_counter() - w)
            loop_cpu.append(time.thread_time() - c)
        await hub.aclose()
    q = statistics.quantiles
    print(f"telemetry poll, {gpus} GPUs ({polls} polls):")
    print(f"  loop CPU per poll    median {statistics.median(loop_cpu) * 1e3:6.3f} ms   p99 "
          f"{q(loop_cpu, n=100)[98] * 1e3:6.3f} ms")
    print(f"  thread CPU per read  median {statistics.median(backend.read_cpu) * 1e3:6.3f} ms   "
          f"p99 {q(backend.read_cpu, n=100)[98] * 1e3:6.3f} ms")
    print(f"  wall time per poll   median {statistics.median(wall) * 1e3:6.3f} ms   p99 "
          f"{q(wall, n=100)[98] * 1e3:6.3f} ms")


async def reaction(trials: int, poll_s: float) -> None:
    delays = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        state, cfg = config(tmp, 1, poll_s)
        uuid = SIM_UUID.format(0)
        for _ in range(trials):
            Path(state).write_text(json.dumps({uuid: {"temperature_c": 50}}))
            limits = Path(state + ".limits.json")
            if limits.exists():
                limits.unlink()
            backend = TimedSim(cfg.gpu.sim, state)  # type: ignore[attr-defined]
            infos = backend.discover()
            hub = GpuHub(backend, infos, poll_s, 2.0)
            spawner = Spawner(None, use_guardian=False)
            sup = Supervisor(cfg, [], hub, spawner, HttpProber())  # type: ignore[arg-type]
            host = Host(sup)
            thermal: ThermalSection = cfg.thermal  # type: ignore[attr-defined]
            guard = GpuGuard(sup, host, hub, thermal, LimitStore(str(tmp / "state")))
            hub.on_update(guard.poke)
            runner = asyncio.get_running_loop().create_task(hub.run())
            await asyncio.sleep(poll_s * (1 + random.random()))
            new = tmp / "s.json.new"
            new.write_text(json.dumps({uuid: {"temperature_c": 86}}))
            t0 = time.monotonic()
            os.replace(new, state)
            while not backend.limit_calls:
                await asyncio.sleep(0.001)
            delays.append(backend.limit_calls[0] - t0)
            runner.cancel()
            await guard.restore_all()
            await hub.aclose()
    print(f"reading over throttle_c -> power limit call, poll_interval_s {poll_s:g}, "
          f"{trials} trials:")
    print(f"  median {statistics.median(delays) * 1e3:7.1f} ms   max {max(delays) * 1e3:7.1f} ms"
          f"   target <= {poll_s * 1e3 + 20:.0f} ms: "
          f"{'met' if max(delays) <= poll_s + 0.020 else 'MISSED'}")


def main() -> None:
    import logging

    logging.basicConfig(level=logging.ERROR)  # the guard's own lines would bury the table
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--polls", type=int, default=200)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--poll-interval", type=float, default=0.5)
    a = ap.parse_args()
    asyncio.run(poll_cost(a.gpus, a.polls))
    asyncio.run(reaction(a.trials, a.poll_interval))


if __name__ == "__main__":
    main()
