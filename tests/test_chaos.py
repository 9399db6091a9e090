"""The chaos soak, short: bench/soak.py for 30 s (kill -9, SIGSTOP, failing health, wedged
engines, hot and lost GPUs, UPS flaps and a low battery, swaps, reloads, drains, all under
streaming load through the router), and every invariant holds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from nutserver import nut_missing

pytestmark = pytest.mark.e2e
SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def test_short_chaos_soak() -> None:
    if (why := nut_missing()) is not None:
        pytest.skip(why)
    out = subprocess.run([sys.executable, str(SOAK), "--seconds", "30", "--seed", "7",
                          "--clients", "8", "--json"], capture_output=True, text=True,
                         timeout=600, check=False)
    assert out.stdout.strip(), out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["faults_total"] >= 10, report  # about one a second, some take seconds
    assert report["requests"].get("complete", 0) > 100, report
    failed = [k for k, ok in report["invariants"].items() if not ok]
    assert not failed, (failed, report)
    assert out.returncode == 0
