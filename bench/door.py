"""The front door's cost end to end: one gate in front of bench/sse_backend.py, flooded by wrk
(64 connections, the same requests, each with an `Authorization` header), with no [auth] and
with a key, its three limits and the audit log (to a file), switched by `llmctl reload` in
the same run, in turns. Figures: requests/s and the front process's CPU per request, the
median of `--rounds` turns of each.

    .venv/bin/python bench/door.py [--rounds 3] [--seconds 5]

bench/gate_python.py --door gives the same without the kernel (Python only, each part
apart, and per SSE event).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import Daemon, free_port, wait_until
from supervisord_llm.keys import ApiKey, hash_secret, write_keys

HERE = Path(__file__).resolve().parent
TICK = os.sysconf("SC_CLK_TCK")
SECRET = "sk-llm-bench-0123456789abcdef0123456789abcdef01234"  # noqa: S105 - a made-up key


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(f[11]) + int(f[12])) / TICK
    return total


def wrk(port: int, seconds: int) -> float:
    cmd = ["wrk", "-t1", "-c64", f"-d{seconds}s", "-H", f"Authorization: Bearer {SECRET}",
           f"http://127.0.0.1:{port}/small"]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", "1", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    non2xx = [line for line in out.splitlines() if "Non-2xx" in line]
    if non2xx:
        raise SystemExit(f"wrk got errors: {non2xx}")
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    raise RuntimeError(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmsup-door-") as d:
        tmp = Path(d)
        write_keys(str(tmp / "keys.toml"), (ApiKey(
            "bench", hash_secret(SECRET), requests_per_minute=10**6,
            tokens_per_minute=10**9, max_concurrency=10**6),), None)
        gate_port = free_port()
        base: dict[str, Any] = {
            "supervisor": {"control_socket": str(tmp / "ctl.sock"),
                           "state_dir": str(tmp / "state"), "log_format": "text"},
            "metrics": {"listen": ""},
            "gpu": {"backend": "none"},
            "service": [{
                "name": "bench", "port": free_port(),
                "command": [sys.executable, str(HERE / "sse_backend.py"), "--port", "{port}"],
                "health": {"interval_s": 2, "timeout_s": 1},
                "gate": {"listen": f"127.0.0.1:{gate_port}", "max_concurrency": 1024,
                         "max_queue": 1024, "allow_paths": ["/small"]},
            }],
        }
        keys = {**base, "auth": {"keys_file": str(tmp / "keys.toml")}}
        door = {**keys, "audit": {"path": str(tmp / "audit.log")}}
        daemon = Daemon(tmp, base).start()
        results: dict[str, list[tuple[float, float]]] = {"off": [], "keys": [], "on": []}
        try:
            wait_until(lambda: daemon.service("bench")["gate"] == "open", 30, what="gate open")
            pid = int(daemon.status()["front"]["pid"])
            for _ in range(a.rounds):
                for mode, doc in (("off", base), ("keys", keys), ("on", door)):
                    daemon.write(doc)
                    r = daemon.llmctl("reload")
                    if r.returncode != 0:
                        raise SystemExit(r.stderr)
                    time.sleep(0.5)
                    c0 = cpu_of([pid])
                    rps = wrk(gate_port, a.seconds)
                    c1 = cpu_of([pid])
                    results[mode].append((rps, (c1 - c0) / (rps * a.seconds) * 1e6))
            lines = (tmp / "audit.log").read_text().count("\n")
        finally:
            daemon.stop()
    med = {m: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v))
           for m, v in results.items()}
    print(f"the front door end to end: wrk -c64 on a gate, {a.seconds} s x {a.rounds} turns "
          "each, medians")
    print(f"  {'':44s} {'requests/s':>11s} {'CPU/request':>12s}")
    print(f"  {'no [auth], no audit':44s} {med['off'][0]:11,.0f} {med['off'][1]:10.1f} us")
    print(f"  {'a key with 3 limits':44s} {med['keys'][0]:11,.0f} {med['keys'][1]:10.1f} us")
    print(f"  {'a key with 3 limits, the audit log (a file)':44s} {med['on'][0]:11,.0f} "
          f"{med['on'][1]:10.1f} us")
    print(f"  added by the door: {med['on'][1] - med['off'][1]:+.1f} us of CPU per request; "
          f"{lines:,} audit lines written")


if __name__ == "__main__":
    main()
