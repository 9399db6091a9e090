"""Hostile clients against the daemon as a real process: memory, file descriptors and the log
stay bounded while they attack, and come back to their baseline once they leave; the daemon
keeps serving real requests and its control socket throughout. Also: the daemon run out of
file descriptors backs off, says so in a few lines, and recovers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from helpers import Daemon, async_stays, async_wait_until, base_config, free_port, running

FLOOD = str(Path(__file__).resolve().parent / "floodbackend.py")


def flood_service(name: str, **gate: Any) -> dict[str, Any]:
    port = free_port()
    return {
        "name": name,
        "command": [sys.executable, FLOOD, "--port", "{port}"],
        "port": port,
        "health": {"interval_s": 0.5, "timeout_s": 0.5, "failures": 5, "startup_timeout_s": 10},
        "restart": {"backoff_initial_s": 0.1, "backoff_max_s": 1},
        "stop": {"timeout_s": 2},
        "gate": {"listen": f"127.0.0.1:{free_port()}", "allow_paths": ["/*"],
                 "max_concurrency": 32, "max_queue": 64,
                 "queue_timeout_s": 2, "header_timeout_s": 1, "body_timeout_s": 1,
                 "send_timeout_s": 1, **gate},
    }


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


async def request(port: int, raw: bytes, read: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        if not read:
            return b""
        async with asyncio.timeout(10):
            return await reader.read(65536)
    finally:
        writer.close()


def gate_port(d: Daemon) -> int:
    return int(d.doc["service"][0]["gate"]["listen"].rsplit(":", 1)[1])


async def hostile_round(port: int, held: list[asyncio.StreamWriter]) -> None:
    """One round of everything a stranger can do to a gate."""
    rng = random.Random()
    jobs = []

    async def slowloris() -> None:
        _r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /ok HTTP/1.1\r\nX-Slow: ")
        held.append(w)

    async def trickler() -> None:
        _r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"POST /ok HTTP/1.1\r\nHost: g\r\nContent-Length: 100000\r\n\r\n{")
        held.append(w)

    async def non_reader() -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /flood HTTP/1.1\r\nHost: g\r\n\r\n")
        await r.readexactly(1024)  # then never reads again
        held.append(w)

    async def mid_body() -> None:
        _r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"POST /ok HTTP/1.1\r\nHost: g\r\nContent-Length: 70000\r\n\r\n" + b"x" * 65536)
        await asyncio.sleep(rng.random() * 0.05)
        w.transport.abort()

    async def mid_stream() -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /sse HTTP/1.1\r\nHost: g\r\n\r\n")
        await r.readuntil(b"\r\n\r\n")
        await r.read(20)
        w.transport.abort()

    async def malformed() -> None:
        garbage = rng.choice([b"\x00\xff\r\n\r\n", b"GET / HTTP/1.1\nX: y\n\n",
                              b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                              b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 300 + b"\r\n"])
        await request(port, garbage)

    for fn, n in ((slowloris, 20), (trickler, 10), (non_reader, 4), (mid_body, 20),
                  (mid_stream, 20), (malformed, 20)):
        jobs += [fn() for _ in range(n)]
    rng.shuffle(jobs)
    for result in await asyncio.gather(*jobs, return_exceptions=True):
        if isinstance(result, BaseException) and not isinstance(result, (OSError, EOFError)):
            raise result


async def test_hostile_clients_soak(tmp_path: Path) -> None:
    doc = base_config(tmp_path, [flood_service("svc")], gpus=0, gpu={"backend": "none"})
    with running(tmp_path, doc) as d:
        d.wait_state("svc", "ready")
        pid = d.proc.pid if d.proc else 0
        port = gate_port(d)
        ok = b"GET /ok HTTP/1.1\r\nHost: g\r\n\r\n"
        held: list[asyncio.StreamWriter] = []
        await hostile_round(port, held)  # warm-up: whatever is allocated once is allocated
        for w in held:
            w.transport.abort()
        held.clear()

        async def quiet() -> bool:
            s = d.service("svc")
            return bool(s["inflight"] == 0)

        await async_wait_until(quiet, 10, what="warm-up over")
        # the gate's own timeouts close what the warm-up left: the descriptors settle
        last: list[int] = []

        def settled() -> bool:
            last.append(fds(pid))
            return len(last) >= 6 and len(set(last[-6:])) == 1

        await async_wait_until(settled, 15, interval=0.25, what="descriptors settled")
        base_fds, base_rss = fds(pid), rss_mb(pid)
        log_before = len(d.logtext().splitlines())
        peak = base_rss
        t_end = time.monotonic() + 8
        rounds = 0
        while time.monotonic() < t_end:
            await hostile_round(port, held)
            rounds += 1
            assert (await request(port, ok)).startswith(b"HTTP/1.1 200")  # still serving
            assert d.service("svc")["state"] == "ready"  # the control socket answers
            peak = max(peak, rss_mb(pid))
            if len(held) > 200:
                for w in held[:100]:
                    w.transport.abort()
                del held[:100]
        for w in held:
            w.transport.abort()

        async def back_to_baseline() -> bool:
            return fds(pid) <= base_fds and d.service("svc")["inflight"] == 0

        await async_wait_until(back_to_baseline, 15, interval=0.2,
                               what=f"fds back to {base_fds} (now {fds(pid)})")
        end_rss = rss_mb(pid)
        log_lines = len(d.logtext().splitlines()) - log_before
        print(f"soak: {rounds} rounds; rss {base_rss:.1f} MB -> peak {peak:.1f} MB -> "
              f"{end_rss:.1f} MB; fds {base_fds} -> {fds(pid)}; {log_lines} log lines")
        assert peak - base_rss < 120, (base_rss, peak)  # the bug: gigabytes
        assert end_rss - base_rss < 40, (base_rss, end_rss)
        assert log_lines < 150, d.logtext()[-3000:]
        assert "Traceback" not in d.logtext()


async def test_out_of_file_descriptors(tmp_path: Path) -> None:
    """The daemon with 256 descriptors and a gate that would take 1024 connections: accept
    fails with EMFILE; the gate backs off and logs a few lines (not 300,000 tracebacks), and
    serves again once clients leave."""
    doc = base_config(tmp_path, [flood_service("svc", header_timeout_s=30)], gpus=0,
                      gpu={"backend": "none"})
    with running(tmp_path, doc, nofile=256) as d:
        d.wait_state("svc", "ready")
        port = gate_port(d)
        log_before = len(d.logtext().splitlines())
        conns = []
        for _ in range(400):  # more than the daemon has descriptors
            with contextlib.suppress(OSError):
                conns.append(await asyncio.open_connection("127.0.0.1", port))
        # the accept loop is retrying meanwhile: it says so, then keeps quiet for a while
        await async_wait_until(lambda: any("cannot accept" in line for line in
                                           d.logtext().splitlines()[log_before:]), 10,
                               what="the accept loop says it cannot accept")
        await async_stays(lambda: len(d.logtext().splitlines()) - log_before < 40, 2,
                          "a few lines, not one per retry")
        new = d.logtext().splitlines()[log_before:]
        emfile = [line for line in new if "cannot accept" in line]
        assert 1 <= len(emfile) <= 6, new[-20:]
        assert len(new) < 40, new[-40:]
        for _r, w in conns:
            w.transport.abort()
        reply = b""

        async def serves() -> bool:
            nonlocal reply
            reply = await request(port, b"GET /ok HTTP/1.1\r\nHost: g\r\n\r\n")
            return reply.startswith(b"HTTP/1.1 200")

        await async_wait_until(serves, 15, interval=0.3, what="the gate serves again")
        assert d.service("svc")["state"] == "ready"
        assert "Traceback" not in d.logtext()
