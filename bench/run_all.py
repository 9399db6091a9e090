"""Rerun every benchmark and print one table: each figure beside its target.

    bench/run_all.sh [--quick]

Each benchmark runs as its own process (as documented in docs/performance.md), its output is
kept under build/bench/NAME.txt, and the figures are read from it. `--quick` runs the shorter
forms (fewer rounds, a shorter soak): the same figures, noisier. Exit status 1 if a figure
misses its target or a benchmark fails.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "bench"
PY = sys.executable

# name, argv (full, quick), [(figure, regex with one group, unit, target text, check)]
Check = Callable[[float], bool]
BENCHES: list[tuple[str, list[str], list[str], list[tuple[str, str, str, str, Check]]]] = [
    ("overhead", ["bench/overhead.py"], ["bench/overhead.py", "--seconds", "20"], [
        ("daemon CPU, 16 services, 8 GPUs", r"daemon CPU: ([\d.]+)%", "% of a core", "< 1",
         lambda v: v < 1.0),
        ("daemon RSS", r"daemon RSS: max ([\d.]+) MB", "MB", "< 80", lambda v: v < 80)]),
    ("restart_latency", ["bench/restart_latency.py"], ["bench/restart_latency.py"], [
        ("exit -> relaunch (median)", r"exit -> launch \(supervisor reaction\)\s+median\s+"
         r"([\d.]+) ms", "ms", "<= 50",
         lambda v: v <= 50),
        ("exit -> the new engine exec'd (median)", r"exit -> real command exec'd\s+median\s+"
         r"([\d.]+) ms", "ms", "<= 20", lambda v: v <= 20)]),
    ("reattach", ["bench/reattach.py", "--kills", "20"], ["bench/reattach.py", "--kills", "5"], [
        ("kill -9 -> every model adopted (p99)", r"ready\+adopted in llmctl status: p50\s+\d+"
         r" ms\s+p99\s+(\d+) ms", "ms", "<= 1000", lambda v: v <= 1000),
        ("a keeper's memory (VmRSS)", r"VmRSS ([\d.]+) MB", "MB", "<= 12",
         lambda v: v <= 12)]),
    ("gate_latency", ["bench/gate_latency.py", "--rounds", "3"],
     ["bench/gate_latency.py", "--rounds", "1"], [
        ("gate CPU per request", r"per request gate ([\d.]+) us", "us", "report", lambda v: True),
        ("gate requests/s at saturation", r"req/s direct \d+\s+gate (\d+)", "req/s", "report",
         lambda v: True),
        ("gate / nginx, requests/s", r"requests/s ([\d.]+)x", "x", ">= 0.5",
         lambda v: v >= 0.5),
        ("gate / nginx, CPU per request", r"CPU per request ([\d.]+)x", "x", "<= 3",
         lambda v: v <= 3),
        ("gate / nginx, p99 added at 64 clients", r"p99 added, 64 clients ([\d.]+)x", "x",
         "<= 2", lambda v: v <= 2),
        ("gate / nginx, time to first byte at 64 streams", r"ttfb, 64 streams ([\d.]+)x", "x",
         "<= 2", lambda v: v <= 2)]),
    ("gate_python", ["bench/gate_python.py"], ["bench/gate_python.py", "--rounds", "3"], [
        ("gate Python per small request (no kernel)", r"per small request: ([\d.]+) us", "us",
         "report", lambda v: True)]),
    ("door_python", ["bench/gate_python.py", "--door"],
     ["bench/gate_python.py", "--door", "--rounds", "3"], [
        ("the door: a key, its limits, the audit (Python)",
         r"a key, its limits and the audit log\s+[\d.]+ us per request \(\+([\d.]+)\)", "us",
         "<= 10", lambda v: v <= 10),
        ("the door: per SSE event", r"SSE, per event: .*\(([+-]?\d+) ns\)", "ns",
         "nothing measurable", lambda v: v <= 100)]),
    ("door", ["bench/door.py", "--rounds", "3"], ["bench/door.py", "--rounds", "1"], [
        ("the door end to end: CPU per request added", r"added by the door: ([+-][\d.]+) us",
         "us", "<= 10", lambda v: v <= 10)]),
    ("container", ["bench/container.py", "--rounds", "5"],
     ["bench/container.py", "--rounds", "2"], [
        ("a container: start -> ready added (median)", r"a container adds: start ([+-]\d+) ms",
         "ms", "report", lambda v: True),
        ("a container: stop added (median)", r"stop ([+-]\d+) ms \(medians\)", "ms", "report",
         lambda v: True)]),
    ("gate_flood", ["bench/gate_flood.py"], ["bench/gate_flood.py"], [
        ("watchdog gap while flooded (max)",
         r"watchdog ping gap \(ms\)\s+[\d.]+ /\s+[\d.]+\s+[\d.]+ /\s+([\d.]+)", "ms", "< 1000",
         lambda v: v < 1000)]),
    ("gpu_poll", ["bench/gpu_poll.py"], ["bench/gpu_poll.py", "--polls", "50", "--trials", "5"], [
        ("hot reading -> power limit (max)", r"median\s+[\d.]+ ms\s+max\s+([\d.]+) ms\s+target",
         "ms", "<= 520", lambda v: v <= 520)]),
    ("power", ["bench/power.py"],
     ["bench/power.py", "--trials", "3", "--seq-trials", "1", "--streams", "0,8"], [
        ("upsd LB -> every gate 503 (max)",
         r"\(2\) upsd -> every gate 503\s+median\s+[\d.]+\s+min\s+[\d.]+\s+max\s+([\d.]+) ms",
         "ms", "<= one poll + 20", lambda v: v <= 2020)]),
    ("probe", ["bench/probe.py", "--window", "20", "--trials", "5"],
     ["bench/probe.py", "--window", "10", "--trials", "2"], [
        ("probes while loaded", r"loaded\s+(\d+) probes/h", "per hour", "0", lambda v: v == 0),
        ("hang -> replacement serves (median)", r"replacement serves median\s+([\d.]+) s", "s",
         "report", lambda v: True)]),
    ("router", ["bench/router.py", "--rounds", "3", "--cold", "5"],
     ["bench/router.py", "--rounds", "1", "--cold", "2"], [
        ("router CPU per request over the gate", r"CPU per request, 64 clients.*added "
         r"([+-][\d.]+) us", "us", "< 30", lambda v: v < 30),
        ("router p99 over the gate, 1 client",
         r"POST, 1 client\s+p99.*added ([+-][\d.]+)", "ms", "< 0.2", lambda v: v < 0.2),
        ("cold start: supervisor's part", r"\+ supervisor (\d+) ms", "ms", "report",
         lambda v: True)]),
    ("swapping", ["bench/swapping.py", "--seconds", "60", "--starved", "2"],
     ["bench/swapping.py", "--seconds", "30", "--starved", "1"], [
        ("on demand: loads/min, alternating client", r"= ([\d.]+) loads/min", "per min",
         "<= 60 / min_residency_s", lambda v: v <= 60 / 10 + 1),
        ("on demand: request vs a busy model, answer", r"\(run 1\): (\d+) after", "", "200",
         lambda v: v == 200),
        ("on demand: request vs a busy model, wait", r"\(run 1\): \d+ after ([\d.]+) s", "s",
         "report", lambda v: True)]),
    ("soak", ["bench/soak.py", "--seconds", "300"], ["bench/soak.py", "--seconds", "60"], [
        ("chaos soak: faults injected", r"(\d+) faults\s+injected", "faults", "report",
         lambda v: True),
        ("chaos soak: invariants failed", r"^(\d+) invariants failed", "", "0",
         lambda v: v == 0)]),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", default=None)
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str, str]] = []
    bad = 0
    for name, full, quick, figures in BENCHES:
        if a.only and name not in a.only:
            continue
        argv = quick if a.quick else full
        t0 = time.monotonic()
        print(f"== {name}: {' '.join(argv)}", file=sys.stderr, flush=True)
        run = subprocess.run([PY, *argv], cwd=ROOT, capture_output=True, text=True,
                             check=False, timeout=3600)
        text = run.stdout + run.stderr
        if name == "soak":  # one line the table can read
            text += f"\n{text.count(' FAIL ')} invariants failed\n"
        (OUT / f"{name}.txt").write_text(text)
        took = time.monotonic() - t0
        if run.returncode != 0 and name != "soak":
            rows.append((f"{name} (failed, exit {run.returncode})", "-", "-", "MISSED"))
            bad += 1
            continue
        for figure, pattern, unit, target, ok in figures:
            m = re.search(pattern, text, re.M)
            if m is None:
                rows.append((figure, "not found", target, "?"))
                bad += 1
                continue
            value = float(m.group(1))
            verdict = "report" if target == "report" else ("met" if ok(value) else "MISSED")
            bad += verdict == "MISSED"
            rows.append((figure, f"{m.group(1)} {unit}".strip(), target, verdict))
        print(f"   {took:.0f} s", file=sys.stderr, flush=True)
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':{width}s}  {'measured':>18s}  {'target':>16s}  verdict")
    for figure, shown, target, verdict in rows:
        print(f"{figure:{width}s}  {shown:>18s}  {target:>16s}  {verdict}")
    print(f"(outputs in {OUT.relative_to(ROOT)}/; docs/performance.md explains each figure)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
