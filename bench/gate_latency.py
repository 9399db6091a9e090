"""What the request gate adds, against a direct connection and against nginx as the proxy, on
the same backend (bench/sse_backend.py) in the same run.

    .venv/bin/python bench/gate_latency.py [--rounds 3]

Targets are interleaved and the whole set repeated `--rounds` times; figures are medians over
the rounds. The measuring client runs pinned to one core (`taskset -c 1`). Measured:
- small non-streamed requests, 1 and 64 concurrent clients: latency p50/p99;
- SSE streams, 1 and 64 concurrent: per-chunk latency (the backend stamps each chunk with
  CLOCK_MONOTONIC; the client subtracts on receipt), time to first byte;
- at saturation: requests/s (wrk, 64 connections) and chunks/s (64 streams, no gap);
- the gate's CPU time per request and per chunk (the front process's CPU over the
  saturation runs), and nginx's (its worker's);
- the daemon's event-loop lag while the gate is flooded (the largest `loop_lag_s` in
  `llmctl status`, read every 0.2 s): the flood runs in the front, not in the daemon.
Prints a table; docs/performance.md records it. The front runs the request path as the
package loads it (compiled, or from source: the first line says which); `LLM_SUPERVISOR_PURE=1`
measures the source.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from supervisord_llm import ctl

HERE = Path(__file__).resolve().parent
TICK = os.sysconf("SC_CLK_TCK")


# --- the client (runs in a child process pinned to one core) --------------------------------


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
    return status, headers


async def small_requests(port: int, n: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    req = b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n"
    out = []
    for _ in range(n):
        t = time.perf_counter()
        writer.write(req)
        status, headers = await _read_head(reader)
        await reader.readexactly(int(headers[b"content-length"]))
        out.append(time.perf_counter() - t)
        assert status == 200
    writer.close()
    return out


async def sse_stream(port: int, n: int, gap_us: int) -> tuple[float, list[float], int]:
    """Returns (ttfb, per-chunk latencies, chunks)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    writer.write(f"GET /stream?n={n}&gap_us={gap_us} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    status, _headers = await _read_head(reader)
    ttfb = time.perf_counter() - t0
    assert status == 200, status
    lat: list[float] = []
    count = 0
    buf = b""
    done = False
    while not done:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            break
        data = await reader.readexactly(size + 2)
        now = time.monotonic_ns()
        buf += data[:-2]
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if event == b"data: [DONE]":
                done = True
                continue
            count += 1
            stamp = int(event[event.index(b'"t":') + 4:event.rindex(b"}")])
            lat.append((now - stamp) / 1e9)
    if done:
        # drain the terminating chunk
        with_end = await reader.readuntil(b"0\r\n\r\n") if not reader.at_eof() else b""
        del with_end
    writer.close()
    return ttfb, lat, count


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


async def client_phase(port: int, phase: str, n: int) -> dict[str, Any]:
    if phase == "small1":
        lat = await small_requests(port, n)
        return {"p50": pct(lat, 50), "p99": pct(lat, 99)}
    if phase == "small64":
        t = time.perf_counter()
        parts = await asyncio.gather(*[small_requests(port, n // 64) for _ in range(64)])
        lat = [x for p in parts for x in p]
        return {"p50": pct(lat, 50), "p99": pct(lat, 99), "rps": len(lat) /
                (time.perf_counter() - t)}
    if phase == "sse1":
        ttfb, lat, _c = await sse_stream(port, n, 2000)
        return {"p50": pct(lat, 50), "p99": pct(lat, 99), "ttfb": ttfb}
    if phase == "sse64":
        streams = await asyncio.gather(*[sse_stream(port, n, 5000) for _ in range(64)])
        lat = [x for s in streams for x in s[1]]
        return {"p50": pct(lat, 50), "p99": pct(lat, 99),
                "ttfb": statistics.median(s[0] for s in streams)}
    if phase == "sse_sat":
        t = time.perf_counter()
        streams = await asyncio.gather(*[sse_stream(port, n, 0) for _ in range(64)])
        chunks = sum(s[2] for s in streams)
        return {"chunks": chunks, "cps": chunks / (time.perf_counter() - t)}
    raise ValueError(phase)


def run_client(port: int, phase: str, n: int, script: str = __file__) -> dict[str, Any]:
    """Run one client phase of `script` (`--client PORT PHASE N`) pinned to core 1."""
    cmd = [sys.executable, script, "--client", str(port), phase, str(n)]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", "1", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"client {phase} on port {port} failed: {out.stderr[-600:]}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


# --- the set-up ---------------------------------------------------------------------------------


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(f[11]) + int(f[12])) / TICK
    return total


def wrk(port: int, seconds: int = 5, script: Path | None = None) -> float:
    """Requests/s of wrk (64 connections, pinned to core 1) on /small; `script`: a wrk Lua
    script (a POST)."""
    extra = ["-s", str(script)] if script is not None else []
    cmd = ["wrk", "-t1", "-c64", f"-d{seconds}s", *extra, f"http://127.0.0.1:{port}/small"]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", "1", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    raise RuntimeError(out)


def nginx_proxy(tmp: Path, listen: int, backend: int) -> subprocess.Popen[bytes]:
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
user root;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    keepalive_requests 1000000;
    # idle upstream connections kept 4 s, as the gate keeps them (under the 5 s keep-alive of
    # the engines behind it: past it, a request races the engine's close; nginx's default
    # is 60 s, which only a server without an idle timeout, like this backend, allows)
    upstream backend {{ server 127.0.0.1:{backend}; keepalive 128;
                        keepalive_requests 1000000; keepalive_timeout 4s; }}
    server {{
        listen 127.0.0.1:{listen} backlog=1024;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
""")
    return subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp), "-e",
                             str(tmp / "nginx-error.log"), "-g", "daemon off;"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--client", nargs=3, metavar=("PORT", "PHASE", "N"))
    a = ap.parse_args()
    if a.client:
        port, phase, n = int(a.client[0]), a.client[1], int(a.client[2])
        print(json.dumps(asyncio.run(client_phase(port, phase, n))))
        return
    with tempfile.TemporaryDirectory(prefix="llmsup-gatebench-") as d:
        tmp = Path(d)
        backend, gate_port, nginx_port = free_port(), free_port(), free_port()
        doc = {
            "supervisor": {"control_socket": str(tmp / "ctl.sock"),
                           "state_dir": str(tmp / "state"), "log_format": "text"},
            "metrics": {"listen": ""},
            "gpu": {"backend": "none"},
            "service": [{
                "name": "bench", "port": backend,
                "command": [sys.executable, str(HERE / "sse_backend.py"), "--port", "{port}"],
                "health": {"interval_s": 2, "timeout_s": 1},
                "gate": {"listen": f"127.0.0.1:{gate_port}", "max_concurrency": 1024,
                         "max_queue": 1024, "allow_paths": ["/small", "/stream"]},
            }],
        }
        daemon = Daemon(tmp, doc).start()
        nginx = nginx_proxy(tmp, nginx_port, backend)
        try:
            wait_until(lambda: daemon.service("bench")["gate"] == "open", 30, what="gate open")
            wait_until((tmp / "nginx.pid").exists, 10,
                       what=f"nginx ({(tmp / 'nginx-error.log').read_text(errors='replace')})"
                       if (tmp / "nginx-error.log").exists() else "nginx")
            time.sleep(0.5)
            assert daemon.proc is not None
            nginx_workers = [int(p) for p in subprocess.run(
                ["pgrep", "-P", str(nginx.pid)], capture_output=True, text=True,
                check=False).stdout.split()]
            targets = {"direct": backend, "gate": gate_port, "nginx": nginx_port}
            front = daemon.status()["front"]
            cpu_pids = {"gate": [int(front["pid"])], "nginx": nginx_workers}
            lags: list[float] = []
            phases = [("small1", 3000), ("small64", 12800), ("sse1", 1000), ("sse64", 200)]
            results: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for _round in range(a.rounds):
                for phase, n in phases:
                    for name, port in targets.items():
                        results.setdefault((phase, name), []).append(run_client(port, phase, n))
                for name, port in targets.items():
                    pids = cpu_pids.get(name, [])
                    c0 = cpu_of(pids)
                    with LagWatch(daemon) as watch:
                        rps = wrk(port)
                    if name == "gate":
                        lags.append(watch.max_lag)
                    c1 = cpu_of(pids)
                    sat = run_client(port, "sse_sat", 2000)
                    c2 = cpu_of(pids)
                    results.setdefault(("sat", name), []).append({
                        "rps": rps, "cps": sat["cps"],
                        "cpu_req_us": (c1 - c0) / (rps * 5) * 1e6 if pids else None,
                        "cpu_chunk_us": (c2 - c1) / sat["chunks"] * 1e6 if pids else None,
                    })
        finally:
            nginx.terminate()
            nginx.wait(10)
            daemon.stop()
    report(results, a.rounds)
    print(f"{'daemon loop lag':28s} max {max(lags) * 1000:.2f} ms while the gate was "
          "flooded (wrk, 64 connections)")


class LagWatch:
    """The daemon's loop lag, read from its status every 0.2 s on a thread."""

    def __init__(self, daemon: Daemon) -> None:
        import threading

        self.daemon = daemon
        self.max_lag = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                lag = float(self.daemon.status()["supervisor"]["loop_lag_s"])
            except (OSError, ValueError, KeyError, ctl.CtlError):
                continue  # a missed sample is no result
            self.max_lag = max(self.max_lag, lag)

    def __enter__(self) -> LagWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def med(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def report(results: dict[tuple[str, str], list[dict[str, Any]]], rounds: int) -> None:
    names = ("direct", "gate", "nginx")
    from supervisord_llm import native  # (the front runs what this process would import)
    print(f"medians over {rounds} rounds; latencies in ms; 'added' = proxy - direct; "
          f"the request path: {native.WHY}")
    for phase, title in (("small1", "small request, 1 client"),
                         ("small64", "small request, 64 clients"),
                         ("sse1", "SSE chunk, 1 stream"), ("sse64", "SSE chunk, 64 streams")):
        row = {n: results[(phase, n)] for n in names}
        p50 = {n: med(row[n], "p50") * 1000 for n in names}
        p99 = {n: med(row[n], "p99") * 1000 for n in names}
        line = (f"{title:28s} p50 direct {p50['direct']:.3f}  gate {p50['gate']:.3f} "
                f"(+{p50['gate'] - p50['direct']:.3f})  nginx {p50['nginx']:.3f} "
                f"(+{p50['nginx'] - p50['direct']:.3f})\n{'':28s} p99 direct "
                f"{p99['direct']:.3f}  gate {p99['gate']:.3f} "
                f"(+{p99['gate'] - p99['direct']:.3f})  nginx {p99['nginx']:.3f} "
                f"(+{p99['nginx'] - p99['direct']:.3f})")
        if "ttfb" in row["direct"][0]:
            ttfb = {n: med(row[n], "ttfb") * 1000 for n in names}
            line += (f"\n{'':28s} ttfb direct {ttfb['direct']:.3f}  gate {ttfb['gate']:.3f}"
                     f"  nginx {ttfb['nginx']:.3f}")
        print(line)
    sat = {n: results[("sat", n)] for n in names}
    print(f"{'saturation':28s} req/s direct {med(sat['direct'], 'rps'):.0f}  gate "
          f"{med(sat['gate'], 'rps'):.0f}  nginx {med(sat['nginx'], 'rps'):.0f}")
    print(f"{'':28s} chunks/s direct {med(sat['direct'], 'cps'):.0f}  gate "
          f"{med(sat['gate'], 'cps'):.0f}  nginx {med(sat['nginx'], 'cps'):.0f}")
    print(f"{'CPU':28s} per request gate {med(sat['gate'], 'cpu_req_us'):.0f} us, nginx "
          f"{med(sat['nginx'], 'cpu_req_us'):.0f} us; per chunk gate "
          f"{med(sat['gate'], 'cpu_chunk_us'):.1f} us, nginx "
          f"{med(sat['nginx'], 'cpu_chunk_us'):.1f} us")

    def added(phase: str, name: str) -> float:
        return med(results[(phase, name)], "p99") - med(results[(phase, "direct")], "p99")

    # the front's targets (the gate against nginx in this run)
    ratios = [
        ("requests/s", med(sat["gate"], "rps") / med(sat["nginx"], "rps"), ">= 0.5"),
        ("CPU per request", med(sat["gate"], "cpu_req_us") / med(sat["nginx"], "cpu_req_us"),
         "<= 3"),
        ("p99 added, 64 clients", added("small64", "gate") / max(added("small64", "nginx"),
                                                                   1e-6), "<= 2"),
        ("ttfb, 64 streams", med(results[("sse64", "gate")], "ttfb")
         / med(results[("sse64", "nginx")], "ttfb"), "<= 2"),
    ]
    print(f"{'gate / nginx':28s} " + "  ".join(f"{what} {value:.2f}x ({target})"
                                              for what, value, target in ratios))


if __name__ == "__main__":
    main()
