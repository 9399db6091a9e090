"""The daemon's own cost: CPU time per second and resident memory while it supervises 16
services (fake backends) on 8 simulated GPUs, health every 2 s, GPU polls every 1 s.

    .venv/bin/python bench/overhead.py [--services 16] [--gpus 8] [--seconds 60]

Prints the figures; docs/performance.md records them.
"""

from __future__ import annotations

import argparse
import os
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
    a = ap.parse_args()
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
            c0, t0 = cpu_seconds(pid), time.monotonic()
            rss_samples = []
            while time.monotonic() - t0 < a.seconds:
                time.sleep(1.0)
                rss_samples.append(rss_mb(pid))
            c1, t1 = cpu_seconds(pid), time.monotonic()
            data = daemon.status()
            restarts = sum(s["restarts"] for s in data["services"])
            cpu_pct = 100 * (c1 - c0) / (t1 - t0)
            print(f"services {a.services}, sim GPUs {a.gpus}, health every "
                  f"{a.health_interval:g} s, GPU poll {a.gpu_poll:g} s, "
                  f"measured over {t1 - t0:.0f} s")
            print(f"daemon CPU: {cpu_pct:.2f}% of one core ({(c1 - c0) * 1000 / (t1 - t0):.1f} "
                  f"ms CPU per second)")
            print(f"daemon RSS: max {max(rss_samples):.1f} MB, last {rss_samples[-1]:.1f} MB")
            if guardian:
                print(f"guardian RSS: {rss_mb(guardian[0]):.1f} MB")
            print(f"loop lag (last): {data['supervisor']['loop_lag_s'] * 1000:.2f} ms; "
                  f"restarts during the run: {restarts}")
        finally:
            daemon.stop()


if __name__ == "__main__":
    main()
