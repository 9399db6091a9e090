"""The chaos soak, short: bench/soak.py for 30 s (kill -9, SIGSTOP, failing health, wedged
engines, hot and lost GPUs, UPS flaps and a low battery, swaps, reloads, drains, all under
streaming load through the router), and every invariant holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from nutserver import nut_missing

pytestmark = pytest.mark.e2e
SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"
# what a failed invariant is explained by: the daemon's mode and power lines, the stops
TELLING = (" mode ", "power", "UPS", "watchdog", "exited", "restart", "lost", "critical")


def test_short_chaos_soak(tmp_path: Path) -> None:
    if (why := nut_missing()) is not None:
        pytest.skip(why)
    log = tmp_path / "daemon.log"  # the soak's daemon log, kept for the failure's message
    out = subprocess.run([sys.executable, str(SOAK), "--seconds", "30", "--seed", "7",
                          "--clients", "8", "--json"], capture_output=True, text=True,
                         timeout=600, check=False, env={**os.environ, "SOAK_KEEP_LOG": str(log)})
    assert out.stdout.strip(), out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["faults_total"] >= 10, report  # about one a second, some take seconds
    assert report["requests"].get("complete", 0) > 100, report
    failed = [k for k, ok in report["invariants"].items() if not ok]
    if failed:
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        telling = "\n".join(x[:300] for x in lines if any(t in x for t in TELLING))
        pytest.fail(f"invariants failed: {failed}\nreport: {json.dumps(report)}\n"
                    f"the daemon's log ({log}), its mode, power and stop lines:\n"
                    f"{telling[-20000:]}")
    assert out.returncode == 0
