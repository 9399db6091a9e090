"""The daemon's CPU while one client sends requests one after the other to an on-demand
model's gate: each answer leaves the gate idle, which the front tells the daemon (at most
every 100 ms per gate since 2026-12-07; before, twice per request).

    .venv/bin/python bench/ondemand_sequential.py [--seconds 10]

A real daemon and front, the fake backend as the model; the client is Python's http.client
on one kept connection. Prints requests/s and the daemon's CPU (utime + stime over the run).
"""

from __future__ import annotations

import argparse
import http.client
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from gate_latency import cpu_of

from helpers import Daemon, base_config, fake_service, free_port, wait_until


def answered(port: int) -> bool:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/health")
        c.getresponse().read()
        c.close()
    except OSError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmsup-ondemand-") as d:
        tmp = Path(d)
        port = free_port()
        svc = fake_service("a", free_port(), gpus=[0], start="on-demand", vram_gb=1,
                           gate={"listen": f"127.0.0.1:{port}"})
        daemon = Daemon(tmp, base_config(tmp, [svc], gpus=1, metrics=False)).start()
        try:
            wait_until(lambda: answered(port), 30, what="the model loaded on demand")
            wait_until(lambda: daemon.service("a")["state"] == "ready", 30, what="ready")
            assert daemon.proc is not None
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            n = 0
            t0, c0 = time.monotonic(), cpu_of([daemon.proc.pid])
            while time.monotonic() - t0 < a.seconds:
                c.request("GET", "/health")
                c.getresponse().read()
                n += 1
            took, c1 = time.monotonic() - t0, cpu_of([daemon.proc.pid])
            c.close()
        finally:
            daemon.stop()
    print(f"on demand, one client in sequence: {n / took:.0f} requests/s; "
          f"daemon CPU {(c1 - c0) / took * 100:.1f} % of a core")


if __name__ == "__main__":
    main()
