"""Does a flooded gate starve the supervisor? The daemon runs one gated service (the fast
bench backend) and 4 simulated GPUs polled every 0.5 s, with a systemd watchdog of 1 s (a
ping every 0.5 s, received by a fake NOTIFY_SOCKET). wrk floods the gate (128 connections)
while the bench samples the supervisor's loop lag, the age of the GPU readings and of the
last health check, and times the watchdog pings; the same without the flood, for reference.

    .venv/bin/python bench/gate_flood.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import Daemon, NotifyListener, free_port, sim_gpus, wait_until

HERE = Path(__file__).resolve().parent


def sample(d: Daemon, seconds: float) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"lag": [], "gpu_age": [], "health_age": []}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        data = d.status()
        out["lag"].append(data["supervisor"]["loop_lag_s"])
        out["gpu_age"].append(max(g["reading_age_s"] or 0 for g in data["gpus"]))
        out["health_age"].append(data["services"][0]["health"]["checked_s_ago"] or 0)
        time.sleep(0.2)
    return out


def gaps(times: list[float], start: float, end: float) -> list[float]:
    inside = [t for t in times if start <= t <= end]
    return [b - a for a, b in itertools.pairwise(inside)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmsup-flood-") as dname:
        tmp = Path(dname)
        pings = NotifyListener(tmp / "notify.sock")
        gate = free_port()
        doc: dict[str, Any] = {
            "supervisor": {"control_socket": str(tmp / "ctl.sock"),
                           "state_dir": str(tmp / "state"), "log_format": "text"},
            "metrics": {"listen": ""},
            "gpu": {"backend": "sim", "poll_interval_s": 0.5, "sim": sim_gpus(4)},
            "service": [{
                "name": "bench", "port": free_port(),
                "command": [sys.executable, str(HERE / "sse_backend.py"), "--port", "{port}"],
                "health": {"interval_s": 1, "timeout_s": 1, "failures": 3},
                "gate": {"listen": f"127.0.0.1:{gate}", "max_concurrency": 1024,
                         "max_queue": 1024, "allow_paths": ["/small"]},
            }],
        }
        d = Daemon(tmp, doc, {"NOTIFY_SOCKET": str(tmp / "notify.sock"),
                              "WATCHDOG_USEC": "1000000"}).start()
        try:
            wait_until(lambda: d.service("bench")["gate"] == "open", 30, what="gate open")
            t0 = time.monotonic()
            idle = sample(d, a.seconds / 2)
            t1 = time.monotonic()
            cmd = ["wrk", "-t1", "-c128", f"-d{a.seconds:.0f}s", f"http://127.0.0.1:{gate}/small"]
            if shutil.which("taskset"):
                cmd = ["taskset", "-c", "1", *cmd]
            flood = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            time.sleep(1)
            t2 = time.monotonic()
            busy = sample(d, a.seconds - 2)
            t3 = time.monotonic()
            out, _ = flood.communicate()
            rps = next(line.split()[1] for line in out.splitlines()
                       if line.startswith("Requests/sec"))
            failures = d.service("bench")["restarts"]
        finally:
            d.stop()
            pings.close()
    print(f"flood: wrk -c128 on the gate, {rps} requests/s; service restarts during it: "
          f"{failures}")
    print(f"{'':24s} {'idle':>16s} {'flooded':>16s}")
    for name, label in (("lag", "loop lag (ms)"), ("gpu_age", "GPU reading age (ms)"),
                        ("health_age", "health check age (ms)")):
        i, b = idle[name], busy[name]
        print(f"{label:24s} {statistics.median(i) * 1000:7.1f} / {max(i) * 1000:6.1f}"
              f"  {statistics.median(b) * 1000:7.1f} / {max(b) * 1000:6.1f}   (median / max)")
    watchdog = pings.times("WATCHDOG=1")
    gi, gb = gaps(watchdog, t0, t1), gaps(watchdog, t2, t3)
    print(f"{'watchdog ping gap (ms)':24s} {statistics.median(gi) * 1000:7.1f} / "
          f"{max(gi) * 1000:6.1f}  {statistics.median(gb) * 1000:7.1f} / {max(gb) * 1000:6.1f}"
          f"   (every 500 ms expected; systemd would act after 1000 ms)")


if __name__ == "__main__":
    main()
