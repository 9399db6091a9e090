"""The supervisor's own reaction to a crash: the time from a service's exit to the launch of
its replacement, with backoff_initial_s = 0, over N kills (median and p99).

    .venv/bin/python bench/restart_latency.py [--kills 50]

The service actor runs in this process with the real spawner (the model's keeper, its
process group, the guardian) and a real child (/bin/sleep). Each kill is SIGKILL at t0; the
keeper reaps it and tells the actor, which decides on the restart; `launch` is when the actor
calls the spawner for the replacement, `started` when the keeper has answered (a fork in the
same keeper: no Python start-up), `exec` when the real command has replaced the fork.

Each process is killed only once it has run FAST_RUN_S (1 s): the restart policy puts a floor
of 1 s under the delay of a service whose runs keep ending sooner (policy/backoff.py), and this
measures the reaction to a crash, not that floor. 50 kills take about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supervisord_llm.config import parse_config
from supervisord_llm.health import HttpProber
from supervisord_llm.plan import resolve_plan
from supervisord_llm.policy.backoff import FAST_RUN_S
from supervisord_llm.service import ServiceActor
from supervisord_llm.spawn import KeptProcess, LaunchSpec, Spawner
from supervisord_llm.states import State

CONFIG = """
[gpu]
backend = "none"
[[service]]
name = "bench"
command = ["/bin/sleep", "3600"]
[service.restart]
backoff_initial_s = 0
backoff_max_s = 0
max_restarts = 1000000
window_s = 1
[service.stop]
timeout_s = 5
"""


class TimedSpawner(Spawner):
    def __init__(self, state_dir: str) -> None:
        super().__init__(state_dir)
        self.calls: list[float] = []
        self.returns: list[float] = []

    async def launch(self, spec: LaunchSpec) -> KeptProcess:
        self.calls.append(time.monotonic())
        proc = await super().launch(spec)
        self.returns.append(time.monotonic())
        return proc


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def exec_done(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"/bin/sleep\0")
    except OSError:
        return False


async def run(kills: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        spawner = TimedSpawner(d)
        await spawner.start()
        prober = HttpProber()
        plan = resolve_plan(parse_config(CONFIG), [])[0]
        actor = ServiceActor(plan, spawner, prober, base_env={"PATH": "/bin:/usr/bin"})
        actor.run()
        await actor.command("start")
        launch, spawned, execd = [], [], []
        for _ in range(kills):
            assert actor.proc is not None
            pid = actor.proc.pid
            while not exec_done(pid):
                await asyncio.sleep(0.001)
            # a run shorter than FAST_RUN_S counts towards the restart-rate floor
            await asyncio.sleep(max(0.0, actor.proc.launched_at + FAST_RUN_S + 0.05
                                    - time.monotonic()))
            gen = actor.gen
            calls_before = len(spawner.calls)
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            while len(spawner.returns) <= calls_before or actor.gen == gen:
                await asyncio.sleep(0.0002)
            launch.append(spawner.calls[calls_before] - t0)
            spawned.append(spawner.returns[calls_before] - t0)
            assert actor.proc is not None
            new = actor.proc.pid
            while not exec_done(new):
                await asyncio.sleep(0.0002)
            execd.append(time.monotonic() - t0)
            assert actor.state is State.READY
        assert actor.model.budget.fast_runs == 0, "kills closer than FAST_RUN_S: the floor applied"
        actor.kill_now()
        await actor.wait_stopped(5)
        await actor.shutdown()
        await spawner.close()
        await prober.close()
    print(f"{kills} kills, backoff_initial_s = 0")
    for name, values in (("exit -> launch (supervisor reaction)", launch),
                         ("exit -> relaunched (keeper answered)", spawned),
                         ("exit -> real command exec'd", execd)):
        ms = [v * 1000 for v in values]
        print(f"{name:40s} median {statistics.median(ms):6.2f} ms   p99 {pct(ms, 99):6.2f} ms"
              f"   max {max(ms):6.2f} ms")


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=50)
    asyncio.run(run(ap.parse_args().kills))


if __name__ == "__main__":
    main()
