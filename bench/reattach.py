"""Re-attach after a crash: kill -9 of the daemon, a new daemon at once, and the time from the
new daemon's start (its process spawned) until `llmctl status` shows every service `ready`
and adopted, over N kills (p50 and p99). The models (fake engines) are never restarted:
their pids are checked at each round.

    .venv/bin/python bench/reattach.py [--kills 20] [--services 4]

Also printed: the daemon's own figure (`llm_supervisor_reattach_seconds`, from its process's
start time to the last adopted service's first good health check) and the keepers' memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import Daemon, base_config, fake_service, free_port, wait_until


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def keeper_memory(state: Path) -> tuple[float, float]:
    """Median VmRSS and Pss of the keepers, in MB."""
    import json

    rss, pss = [], []
    for f in (state / "keep").glob("*/state.json"):
        pid = json.loads(f.read_text())["keeper_pid"]
        status = Path(f"/proc/{pid}/status").read_text()
        rss.append(int(status.split("VmRSS:")[1].split()[0]) / 1024)
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        pss.append(int(rollup.split("\nPss:")[1].split()[0]) / 1024)
    return statistics.median(rss), statistics.median(pss)


def run(kills: int, services: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        doc = base_config(tmp, [fake_service(f"s{i}", free_port()) for i in range(services)])
        doc["supervisor"]["adopt_grace_s"] = 30
        daemon = Daemon(tmp, doc).start()
        pids = {f"s{i}": daemon.wait_state(f"s{i}", "ready")["pid"] for i in range(services)}
        rss, pss = keeper_memory(tmp / "state")
        seen, own = [], []
        try:
            for _ in range(kills):
                daemon.crash()
                daemon.pids_seen.clear()
                daemon.stop()
                daemon = Daemon(tmp, doc)
                t0 = time.monotonic()
                daemon.start(wait=False)

                def all_adopted(d: Daemon = daemon) -> bool:
                    try:
                        status = d.status()
                    except Exception:
                        return False
                    return all(s["state"] == "ready" and s["adopted"]
                               for s in status["services"])

                wait_until(all_adopted, 30, interval=0.005, what="every service adopted")
                seen.append(time.monotonic() - t0)
                got = {s["name"]: s["pid"] for s in daemon.status()["services"]}
                assert got == pids, (got, pids)  # no model restarted
                url = f"http://{doc['metrics']['listen']}/metrics"
                for _try in range(50):
                    with urllib.request.urlopen(url, timeout=5) as r:
                        lines = [ln for ln in r.read().decode().splitlines()
                                 if ln.startswith("llm_supervisor_reattach_seconds ")]
                    if lines:
                        own.append(float(lines[0].split()[1]))
                        break
                    time.sleep(0.02)
        finally:
            daemon.stop()
    ms = [v * 1000 for v in seen]
    own_ms = [v * 1000 for v in own]
    print(f"{kills} kills of the daemon, {services} models (fake engines), none restarted")
    print(f"start -> every service ready+adopted in llmctl status: p50 {statistics.median(ms):6.0f}"
          f" ms   p99 {pct(ms, 99):6.0f} ms   max {max(ms):6.0f} ms")
    if own_ms:
        print(f"the daemon's llm_supervisor_reattach_seconds:        p50 "
              f"{statistics.median(own_ms):6.0f} ms   p99 {pct(own_ms, 99):6.0f} ms")
    print(f"keeper memory (median of {services}): VmRSS {rss:.1f} MB, Pss {pss:.1f} MB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--services", type=int, default=4)
    args = ap.parse_args()
    run(args.kills, args.services)


if __name__ == "__main__":
    main()
