"""Models on demand that do not fit together: how often they load, and how long a request
for an unloaded one waits.

    .venv/bin/python bench/swapping.py [--seconds 60] [--starved 3] [--load-s 0.5]
                                       [--min-residency S]

One simulated 8 GiB GPU and three on-demand fake backends of 5 GiB each (tests/fakebackend.py,
`/health` answering "loading" for `--load-s` after launch, a model's load), behind the router;
only one fits at a time. `--min-residency S` sets `min_residency_s` on all three (left out:
the daemon's default).

1. Alternating: one client asks for model-b, then model-c, then model-b... (each request
   after the answer to the last), and a second client asks for model-a every 50 ms, for
   `--seconds`. Loads per minute (cold starts in `llmctl status`), and per client the
   requests answered 200, 503s, and the latency median and worst.
2. Starved: four clients keep model-a busy (streams of 10 tokens, 20 ms apart, back to back:
   its gate is never empty); after 3 s one request asks for model-c. Its wait and answer,
   `--starved` times (a fresh daemon each).
Prints the figures; docs/performance.md records them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import Daemon, base_config, fake_service, free_port, wait_until

GIB = 1024**3


def config(tmp: Path, load_s: float, residency: float | None) -> tuple[dict[str, Any], int]:
    services = []
    for name in ("a", "b", "c"):
        extra: dict[str, Any] = {}
        if residency is not None:
            extra["min_residency_s"] = residency
        services.append(fake_service(name, free_port(), "--load-s", str(load_s), gpus=[0],
                                     start="on-demand", vram_gb=5, models=[f"model-{name}"],
                                     **extra))
    rport = free_port()
    doc = base_config(tmp, services, gpus=1, metrics=False,
                      router={"listen": f"127.0.0.1:{rport}"})
    doc["gpu"]["sim"][0]["memory_total_bytes"] = 8 * GIB
    return doc, rport


def chat(port: int, model: str, timeout: float = 120, **extra: Any) -> tuple[int, float]:
    body = json.dumps({"model": model, "max_tokens": 4,
                       "messages": [{"role": "user", "content": "hi"}], **extra}).encode()
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body,
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        return r.status, time.monotonic() - t0
    finally:
        conn.close()


def loads(d: Daemon) -> int:
    return sum(s.get("on_demand", {}).get("cold_starts", 0) for s in d.status()["services"])


def started(doc: dict[str, Any], tmp: Path, rport: int) -> Daemon:
    d = Daemon(tmp, doc).start()

    def answers() -> bool:
        try:
            return chat(rport, "nope", timeout=5)[0] == 404
        except OSError:
            return False

    wait_until(answers, 20, what="the router")
    return d


def alternating(seconds: float, load_s: float, residency: float | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="llmsup-swapbench-") as td:
        tmp = Path(td)
        doc, rport = config(tmp, load_s, residency)
        d = started(doc, tmp, rport)
        try:
            assert chat(rport, "model-a")[0] == 200  # the victim's model is loaded first
            base = loads(d)
            stop = threading.Event()
            got: dict[str, list[tuple[int, float]]] = {"alternating": [], "steady": []}

            def alternate() -> None:
                i = 0
                while not stop.is_set():
                    got["alternating"].append(chat(rport, ("model-b", "model-c")[i % 2]))
                    i += 1

            def steady() -> None:
                while not stop.is_set():
                    got["steady"].append(chat(rport, "model-a"))
                    stop.wait(0.05)

            threads = [threading.Thread(target=alternate), threading.Thread(target=steady)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            stop.wait(seconds)
            stop.set()
            for t in threads:
                t.join(180)
            elapsed = time.monotonic() - t0  # the last requests ran to their answers
            n = loads(d) - base
        finally:
            d.stop()
    out: dict[str, Any] = {"loads": n, "elapsed": elapsed, "loads_per_min": n * 60 / elapsed}
    for who, rows in got.items():
        lat = [s for _c, s in rows]
        out[who] = {"ok": sum(c == 200 for c, _s in rows),
                    "503": sum(c == 503 for c, _s in rows),
                    "other": sum(c not in (200, 503) for c, _s in rows),
                    "median": statistics.median(lat) if lat else None,
                    "worst": max(lat) if lat else None}
    return out


def starved(load_s: float, residency: float | None) -> tuple[int, float]:
    with tempfile.TemporaryDirectory(prefix="llmsup-swapbench-") as td:
        tmp = Path(td)
        doc, rport = config(tmp, load_s, residency)
        d = started(doc, tmp, rport)
        stop = threading.Event()
        try:
            assert chat(rport, "model-a")[0] == 200

            def busy() -> None:
                while not stop.is_set():
                    chat(rport, "model-a", stream=True, max_tokens=10, fake_token_delay_s=0.02)

            threads = [threading.Thread(target=busy) for _ in range(4)]
            for t in threads:
                t.start()
            stop.wait(3)
            code, waited = chat(rport, "model-c")
        finally:
            stop.set()
            for t in threads:
                t.join(180)
            d.stop()
    return code, waited


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--starved", type=int, default=3)
    ap.add_argument("--load-s", type=float, default=0.5)
    ap.add_argument("--min-residency", type=float, default=None)
    a = ap.parse_args()
    what = "default" if a.min_residency is None else f"{a.min_residency:g} s"
    print(f"three 5 GiB on-demand models, one 8 GiB GPU, load {a.load_s:g} s; "
          f"min_residency_s: {what}")
    r = alternating(a.seconds, a.load_s, a.min_residency)
    print(f"1. alternating client (b, c, b, ...) + steady client (a every 50 ms), "
          f"{r['elapsed']:.0f} s: {r['loads']} loads = {r['loads_per_min']:.1f} loads/min")
    for who in ("alternating", "steady"):
        x = r[who]
        med = "-" if x["median"] is None else f"{x['median'] * 1e3:.0f} ms"
        worst = "-" if x["worst"] is None else f"{x['worst']:.2f} s"
        print(f"   {who:11s} client: {x['ok']} answered 200, {x['503']} 503, "
              f"{x['other']} other; latency median {med}, worst {worst}")
    for i in range(a.starved):
        code, waited = starved(a.load_s, a.min_residency)
        print(f"2. model-a kept busy by 4 clients, one request for model-c (run {i + 1}): "
              f"{code} after {waited:.2f} s")


if __name__ == "__main__":
    main()
