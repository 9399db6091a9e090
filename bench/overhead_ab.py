"""The daemon's own cost, several source trees side by side: the configuration of
bench/overhead.py (16 fake backends, 8 simulated GPUs, health every 2 s, GPU polls every 1 s),
one daemon per tree, all measured over the same window, so that a busy shared machine weighs
on each the same way (a comparison of runs one after the other moves by 1-3 ms/s here).

    git archive HEAD~3 | tar -x -C /tmp/before
    .venv/bin/python bench/overhead_ab.py before=/tmp/before after=. [--seconds 60]
    .venv/bin/python bench/overhead_ab.py idle=.:HI=1000:GP=1000 health=.:GP=1000 all=.

Each argument is LABEL=TREE[:HI=seconds][:GP=seconds] (the health interval and the GPU poll
interval for that daemon). A tree is a checkout whose `supervisord_llm` the daemon runs
(PYTHONPATH). Prints each daemon's CPU in ms per second (all its threads, and the event
loop's, from schedstat in nanoseconds) and its restarts (0 expected).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import Daemon, fake_service, free_port, sim_gpus, wait_until


def cpu_ns(pid: int) -> tuple[int, int]:
    """(all threads', the main thread's) CPU time in ns."""
    total = main = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            ns = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        total += ns
        if tid == str(pid):
            main = ns
    return total, main


def all_ready(daemon: Daemon) -> bool:
    return all(s["state"] == "ready" for s in daemon.status()["services"])


def config(tmp: Path, health_s: float, poll_s: float) -> dict[str, object]:
    services = [fake_service(f"svc{i:02d}", free_port(), gpus=[i % 8],
                             health={"interval_s": health_s, "timeout_s": min(1.0, health_s),
                                     "failures": 3})
                for i in range(16)]
    return {
        "supervisor": {"control_socket": str(tmp / "ctl.sock"),
                       "state_dir": str(tmp / "state"), "log_format": "text"},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "gpu": {"backend": "sim", "poll_interval_s": poll_s, "sim": sim_gpus(8)},
        "service": services,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("daemons", nargs="+", metavar="LABEL=TREE[:HI=s][:GP=s]")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=10.0)
    a = ap.parse_args()
    running: list[tuple[str, Daemon]] = []
    dirs: list[tempfile.TemporaryDirectory[str]] = []
    try:
        for spec in a.daemons:
            label, _, rest = spec.partition("=")
            tree, *opts = rest.split(":")
            knobs = dict(o.split("=", 1) for o in opts)
            d = tempfile.TemporaryDirectory(prefix="llmsup-ab-")
            dirs.append(d)
            tmp = Path(d.name)
            doc = config(tmp, float(knobs.get("HI", 2.0)), float(knobs.get("GP", 1.0)))
            env = {"PYTHONPATH": str(Path(tree).resolve())}
            running.append((label, Daemon(tmp, doc, env=env).start()))
        for label, daemon in running:
            wait_until(functools.partial(all_ready, daemon), 120,
                       what=f"{label}: all services ready")
        time.sleep(a.warmup)
        pids = {label: d.proc.pid for label, d in running if d.proc is not None}
        before, t0 = {label: cpu_ns(pid) for label, pid in pids.items()}, time.monotonic()
        time.sleep(a.seconds)
        after, t1 = {label: cpu_ns(pid) for label, pid in pids.items()}, time.monotonic()
        print(f"16 services, 8 sim GPUs, side by side over {t1 - t0:.0f} s:")
        for label, daemon in running:
            restarts = sum(s["restarts"] for s in daemon.status()["services"])
            total = (after[label][0] - before[label][0]) / 1e6 / (t1 - t0)
            loop = (after[label][1] - before[label][1]) / 1e6 / (t1 - t0)
            print(f"  {label:12s} {total:6.2f} ms CPU per second (event loop {loop:5.2f}); "
                  f"restarts {restarts}")
    finally:
        for _label, daemon in running:
            daemon.stop()
        for d in dirs:
            d.cleanup()


if __name__ == "__main__":
    main()
