"""Generation probes: what they cost, and how fast a wedged engine is replaced.

    .venv/bin/python bench/probe.py [--window 20] [--trials 5]

Real daemons (the installed entry point), fake model servers (tests/fakebackend.py) behind
gates, simulated GPUs.

1. Cost: probes sent to a service in a window of `--window` seconds, with `interval_s` 2,
   idle and under load (a request through the gate every 0.5 s), as probes per service per
   hour. The target under load is zero.
2. Hang -> serving: the engine's completions hang while /health stays 200 (the fake's
   `gen_hang` knob); the time until a request through the gate is answered again by the
   replacement (probe interval 1 s, timeout 1 s, failures 2), and its parts from the
   daemon's log: the hang declared, the swap done.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import base_config, fake_service, free_port, running


def _ctl(port: int, **query: str) -> None:
    import urllib.request

    url = f"http://127.0.0.1:{port}/_ctl?" + "&".join(f"{k}={v}" for k, v in query.items())
    urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=5).read()


def _probes(port: int) -> int:
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats", timeout=5) as r:
        return int(json.loads(r.read())["probes"])


def _logged_at(text: str, needle: str) -> float:
    """The wall time of the first log line with `needle` (text logs: local time, ms)."""
    for line in text.splitlines():
        if needle in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f")
            return stamp.timestamp()
    return float("nan")


async def cost(window: float) -> tuple[float, float]:
    probe = {"kind": "completion", "interval_s": 2.0, "timeout_s": 1.0, "failures": 3}
    out = []
    for loaded in (False, True):
        tmp = Path(tempfile.mkdtemp(prefix="bench-probe-"))
        svc = fake_service("chat", free_port(), probe=probe,
                           gate={"listen": f"127.0.0.1:{free_port()}", "max_concurrency": 8})
        url = f"http://{svc['gate']['listen']}/v1/chat/completions"
        with running(tmp, base_config(tmp, [svc], gpus=1)) as d:
            port = d.wait_state("chat", "ready")["port"]
            await asyncio.sleep(3)  # past the first probe after start
            before = _probes(port)
            end = time.monotonic() + window
            async with aiohttp.ClientSession() as client:
                while time.monotonic() < end:
                    if loaded:
                        async with client.post(url, json={"max_tokens": 2}) as r:
                            await r.read()
                    await asyncio.sleep(0.5)
            out.append((_probes(port) - before) * 3600.0 / window)
    return out[0], out[1]


async def hang_to_serving(trials: int) -> list[tuple[float, float]]:
    probe = {"kind": "completion", "interval_s": 1.0, "timeout_s": 1.0, "failures": 2}
    results = []
    for _ in range(trials):
        tmp = Path(tempfile.mkdtemp(prefix="bench-probe-"))
        svc = fake_service("chat", free_port(), probe=probe,
                           gate={"listen": f"127.0.0.1:{free_port()}", "max_concurrency": 8,
                                 "drain_timeout_s": 1})
        url = f"http://{svc['gate']['listen']}/v1/chat/completions"
        with running(tmp, base_config(tmp, [svc], gpus=1)) as d:
            port = d.wait_state("chat", "ready")["port"]
            await asyncio.sleep(1.5)
            t0 = time.monotonic()
            wall0 = time.time()
            _ctl(port, gen_hang="1")
            async with aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=0.1)) as client:
                while True:
                    try:
                        async with client.post(url, json={"max_tokens": 1}) as r:
                            await r.read()
                            if r.status == 200 and d.service("chat")["port"] != port:
                                break
                    except (aiohttp.ClientError, TimeoutError):
                        pass
                    if time.monotonic() - t0 > 60:
                        raise SystemExit("bench/probe.py: no replacement within 60 s")
                    await asyncio.sleep(0.05)
            results.append((_logged_at(d.logtext(), "hung:") - wall0, time.monotonic() - t0))
    return results


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--window", type=float, default=20.0)
    ap.add_argument("--trials", type=int, default=5)
    a = ap.parse_args()
    idle, loaded = await cost(a.window)
    print(f"probe cost, interval_s 2, {a.window:g} s window (per service per hour):")
    print(f"  idle   {idle:8.0f} probes/h   (one per interval_s: {3600 / 2:.0f})")
    print(f"  loaded {loaded:8.0f} probes/h   (a request through the gate every 0.5 s; "
          f"target 0: {'met' if loaded == 0 else 'NOT met'})")
    res = await hang_to_serving(a.trials)
    hung = [h for h, _ in res]
    serving = [s for _, s in res]
    print(f"hang -> serving again (interval 1 s, timeout 1 s, failures 2), {a.trials} trials:")
    print(f"  hang declared     median {statistics.median(hung):6.2f} s   max {max(hung):6.2f} s")
    print(f"  replacement serves median {statistics.median(serving):6.2f} s   "
          f"max {max(serving):6.2f} s")
    print("  each (declared, serving):", ", ".join(f"({h:.2f}, {s:.2f})" for h, s in res))


if __name__ == "__main__":
    asyncio.run(main())
