"""The daemon's own cost: CPU time per second and resident memory while it supervises 16
services (fake backends) on 8 simulated GPUs, health every 2 s, GPU polls every 1 s.

    .venv/bin/python bench/overhead.py [--services 16] [--gpus 8] [--seconds 60] [--runs 1]

Prints the figures; docs/performance.md records them. The CPU figure is utime + stime of the
daemon (all its threads); the split between the event loop's thread and the others (the GPUs'
threads, the log writer, the gate's loop) comes from each thread's schedstat (nanoseconds).
On a shared machine the figure moves from run to run: `--runs 3` runs the daemon three times
and prints the median too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import Daemon, descendants, fake_service, free_port, sim_gpus, wait_until

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def thread_cpu_ns(pid: int) -> tuple[int, int]:
    """(the main thread's, all threads') CPU time in ns, from schedstat."""
    main = total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            ns = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
        total += ns
        if tid == str(pid):
            main = ns
    return main, total


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=16)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--health-interval", type=float, default=2.0)
    ap.add_argument("--gpu-poll", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=1, help="daemons run one after the other")
    a = ap.parse_args()
    figures = [run(a) for _ in range(max(1, a.runs))]
    if len(figures) > 1:
        med = statistics.median(figures)
        print(f"median of {len(figures)} runs: {med / 10:.2f}% of one core ({med:.1f} ms CPU "
              f"per second); runs: {', '.join(f'{f:.1f}' for f in figures)} ms/s")


def run(a: argparse.Namespace) -> float:
    """One daemon, measured; returns its CPU in ms per second."""
    with tempfile.TemporaryDirectory(prefix="llmsup-bench-") as d:
        tmp = Path(d)
        services = [fake_service(f"svc{i:02d}", free_port(), gpus=[i % a.gpus],
                                 health={"interval_s": a.health_interval,
                                         "timeout_s": min(1.0, a.health_interval),
                                         "failures": 3})
                    for i in range(a.services)]
        doc = {
            "supervisor": {"control_socket": str(tmp / "ctl.sock"),
                           "state_dir": str(tmp / "state"), "log_format": "text"},
            "metrics": {"listen": f"127.0.0.1:{free_port()}"},
            "gpu": {"backend": "sim", "poll_interval_s": a.gpu_poll, "sim": sim_gpus(a.gpus)},
            "service": services,
        }
        daemon = Daemon(tmp, doc).start()
        try:
            assert daemon.proc is not None
            pid = daemon.proc.pid
            wait_until(lambda: all(s["state"] == "ready" for s in daemon.status()["services"]),
                       120, what="all services ready")
            time.sleep(a.warmup)
            guardian = [p for p in descendants(pid)
                        if b"_guardian" in Path(f"/proc/{p}/cmdline").read_bytes()]
            (m0, s0), c0, t0 = thread_cpu_ns(pid), cpu_seconds(pid), time.monotonic()
            rss_samples = []
            while time.monotonic() - t0 < a.seconds:
                time.sleep(1.0)
                rss_samples.append(rss_mb(pid))
            c1, t1, (m1, s1) = cpu_seconds(pid), time.monotonic(), thread_cpu_ns(pid)
            data = daemon.status()
            restarts = sum(s["restarts"] for s in data["services"])
            cpu_pct = 100 * (c1 - c0) / (t1 - t0)
            print(f"services {a.services}, sim GPUs {a.gpus}, health every "
                  f"{a.health_interval:g} s, GPU poll {a.gpu_poll:g} s, "
                  f"measured over {t1 - t0:.0f} s")
            ms_per_s = (c1 - c0) * 1000 / (t1 - t0)
            print(f"daemon CPU: {cpu_pct:.2f}% of one core ({ms_per_s:.1f} "
                  f"ms CPU per second)")
            print(f"  by thread (schedstat): event loop {(m1 - m0) / 1e6 / (t1 - t0):.2f} ms/s, "
                  f"other threads {((s1 - s0) - (m1 - m0)) / 1e6 / (t1 - t0):.2f} ms/s")
            print(f"daemon RSS: max {max(rss_samples):.1f} MB, last {rss_samples[-1]:.1f} MB")
            if guardian:
                print(f"guardian RSS: {rss_mb(guardian[0]):.1f} MB")
            print(f"loop lag (last): {data['supervisor']['loop_lag_s'] * 1000:.2f} ms; "
                  f"restarts during the run: {restarts}")
        finally:
            daemon.stop()
    return ms_per_s


if __name__ == "__main__":
    main()
