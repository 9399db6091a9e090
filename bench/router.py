"""What the router adds over the gate alone, and what a cold start costs.

    .venv/bin/python bench/router.py [--rounds 3] [--cold 5]

1. Overhead: the same small JSON POST (`{"model": "bench", "messages": [...]}`, 110 bytes)
   to /small of bench/sse_backend.py, through the service's gate and through the router (which
   finds `model`, then hands the request to the same gate). Latency p50/p99 with 1 and 64
   clients (the measuring client pinned to one core), requests/s with wrk (64 connections,
   POST), and the daemon's CPU time per request over the same number of requests (3,000 from
   1 client, 12,800 from 64) through each; "added" = router - gate.
2. Cold start: a real llama-server on a generated tiny model, `start = "on-demand"`: the time
   from a request for the unloaded model to the first byte of its answer, split into the
   model's load (launch to the health check's first 200: the server's own start and load,
   measured at the health interval of 0.1 s) and the supervisor's part (the rest: taking the
   request, making room, launching, noticing ready, opening the gate, forwarding). Each run
   is stopped by `llmctl stop` + `llmctl reset` first, so that it starts cold.
Prints a table; docs/performance.md records it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import Daemon, free_port, llama_server_binary, make_tiny_model, wait_until

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gate_latency  # noqa: E402
from gate_latency import cpu_of, pct  # noqa: E402

BODY = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hello there"}],
                   "max_tokens": 8}).encode()


async def post_requests(port: int, n: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    req = (b"POST /small HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
    out = []
    for _ in range(n):
        t = time.perf_counter()
        writer.write(req)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        m = re.search(rb"(?i)content-length: *(\d+)", head)
        assert m is not None
        await reader.readexactly(int(m.group(1)))
        out.append(time.perf_counter() - t)
    writer.close()
    return out


async def client_phase(port: int, phase: str, n: int) -> dict[str, Any]:
    if phase == "post1":
        lat = await post_requests(port, n)
    else:
        parts = await asyncio.gather(*[post_requests(port, n // 64) for _ in range(64)])
        lat = [x for p in parts for x in p]
    return {"p50": pct(lat, 50), "p99": pct(lat, 99)}


def run_client(port: int, phase: str, n: int) -> dict[str, Any]:
    return gate_latency.run_client(port, phase, n, __file__)


def wrk_post(tmp: Path, port: int, seconds: int = 5) -> float:
    script = tmp / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = {json.dumps(BODY.decode())}\n")
    return gate_latency.wrk(port, seconds, script)


def config(tmp: Path, router_port: int, service: dict[str, Any]) -> dict[str, Any]:
    return {
        "supervisor": {"control_socket": str(tmp / "ctl.sock"),
                       "state_dir": str(tmp / "state"), "log_format": "text"},
        "metrics": {"listen": ""},
        "gpu": {"backend": "none"},
        "router": {"listen": f"127.0.0.1:{router_port}", "allow_paths": ["/small"]},
        "service": [service],
    }


def overhead(rounds: int) -> dict[str, list[dict[str, float]]]:
    with tempfile.TemporaryDirectory(prefix="llmsup-routerbench-") as d:
        tmp = Path(d)
        gate_port, router_port = free_port(), free_port()
        doc = config(tmp, router_port, {
            "name": "bench", "port": free_port(),
            "command": [sys.executable, str(HERE / "sse_backend.py"), "--port", "{port}"],
            "health": {"interval_s": 2, "timeout_s": 1},
            "gate": {"listen": f"127.0.0.1:{gate_port}", "max_concurrency": 1024,
                     "max_queue": 1024, "allow_paths": ["/small"]},
        })
        daemon = Daemon(tmp, doc).start()
        results: dict[str, list[dict[str, float]]] = {}
        try:
            wait_until(lambda: daemon.service("bench")["gate"] == "open", 30, what="gate open")
            time.sleep(0.5)
            assert daemon.proc is not None
            targets = {"gate": gate_port, "router": router_port}
            for _ in range(rounds):
                for name, port in targets.items():
                    row: dict[str, float] = {}
                    for phase, n in (("post1", 3000), ("post64", 12800)):
                        c0 = cpu_of([daemon.proc.pid])
                        r = run_client(port, phase, n)
                        c1 = cpu_of([daemon.proc.pid])
                        row[f"{phase}_p50"], row[f"{phase}_p99"] = r["p50"], r["p99"]
                        # the same number of requests through each: CPU per request
                        row[f"{phase}_cpu_us"] = (c1 - c0) / n * 1e6
                    rps = wrk_post(tmp, port)
                    row["rps"] = rps
                    results.setdefault(name, []).append(row)
        finally:
            daemon.stop()
    return results


def _stamp(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()


def cold_start(runs: int) -> list[dict[str, float]]:
    binary = llama_server_binary()
    if binary is None:
        print("cold start: llama-server not built (scripts/build-llama-server.sh); skipped")
        return []
    with tempfile.TemporaryDirectory(prefix="llmsup-coldbench-") as d:
        tmp = Path(d)
        model = make_tiny_model(tmp / "tiny.gguf")
        router_port = free_port()
        doc = config(tmp, router_port, {
            "name": "cold", "port": free_port(), "start": "on-demand",
            "command": [binary, "-m", str(model), "--host", "127.0.0.1", "--port",
                        "{port}", "-c", "512", "-t", "1", "--no-webui"],
            "health": {"interval_s": 0.1, "timeout_s": 0.1, "startup_timeout_s": 60},
        })
        daemon = Daemon(tmp, doc).start()
        out = []
        body = json.dumps({"model": "cold", "max_tokens": 1, "stream": True,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        try:
            for _ in range(runs):
                mark = len(daemon.logtext())
                t0 = time.time()
                import socket

                s = socket.create_connection(("127.0.0.1", router_port))
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                          b"application/json\r\nContent-Length: %d\r\nConnection: close\r\n"
                          b"\r\n%s" % (len(body), body))
                s.settimeout(60)
                first = s.recv(1)
                t1 = time.time()
                while s.recv(65536):
                    pass
                s.close()
                assert first == b"H"
                log = daemon.logtext()[mark:]
                launched = next(ln for ln in log.splitlines() if "cold: launched pid" in ln)
                ready = next(ln for ln in log.splitlines() if "cold: starting -> ready" in ln)
                load = _stamp(ready) - _stamp(launched)
                out.append({"total": t1 - t0, "load": load, "supervisor": t1 - t0 - load})
                r = daemon.llmctl("stop", "cold")
                assert r.returncode == 0, r.stderr
                daemon.llmctl("reset", "cold")
                wait_until(lambda: daemon.service("cold")["holds"] == ["idle"], 10)
        finally:
            daemon.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold", type=int, default=5)
    ap.add_argument("--client", nargs=3, metavar=("PORT", "PHASE", "N"))
    a = ap.parse_args()
    if a.client:
        print(json.dumps(asyncio.run(client_phase(int(a.client[0]), a.client[1],
                                                  int(a.client[2])))))
        return
    res = overhead(a.rounds)

    def med(name: str, key: str) -> float:
        return float(statistics.median(r[key] for r in res[name]))

    print(f"router over the gate alone: medians over {a.rounds} rounds, latencies in ms")
    for phase, title in (("post1", "POST, 1 client"), ("post64", "POST, 64 clients")):
        for q in ("p50", "p99"):
            g, r = med("gate", f"{phase}_{q}") * 1e3, med("router", f"{phase}_{q}") * 1e3
            print(f"  {title:18s} {q}  gate {g:.3f}  router {r:.3f}  added {r - g:+.3f}")
    g, r = med("gate", "rps"), med("router", "rps")
    print(f"  {'saturation':18s} req/s gate {g:.0f}  router {r:.0f}")
    for phase, title in (("post1", "1 client"), ("post64", "64 clients")):
        g, r = med("gate", f"{phase}_cpu_us"), med("router", f"{phase}_cpu_us")
        print(f"  CPU per request, {title:10s} gate {g:.1f} us  router {r:.1f} us  added "
              f"{r - g:+.1f} us")
    runs = cold_start(a.cold)
    if runs:
        def m(key: str) -> float:
            return float(statistics.median(x[key] for x in runs))

        print(f"cold start (llama-server, tiny model), medians of {len(runs)}: request to first "
              f"byte {m('total') * 1e3:.0f} ms = model load {m('load') * 1e3:.0f} ms + "
              f"supervisor {m('supervisor') * 1e3:.0f} ms (max supervisor "
              f"{max(x['supervisor'] for x in runs) * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
