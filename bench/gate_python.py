"""The gate's own Python cost per small request, without the kernel: the real client
connection, gate and upstream connection, on uvloop, with transports that only collect what
is written. A request is its head fed to the client connection, the upstream's answer fed
to the upstream connection; the figure is CPU time (process) per request, the best of
`--rounds` rounds of `--n` requests.

    .venv/bin/python bench/gate_python.py [--turns 0] [--src TREE]

`--turns N` lets the loop turn N times after each half (what a request path with tasks needs
to go on; 4 + 4 is enough for the task-based path this replaced); `--src TREE` measures the
gate of another source tree (a `git worktree` of an older commit), for a before/after with
the same harness and the same `--turns`. It measures the request path as it loads (compiled,
or from source: supervisord_llm/native.py, printed); `LLM_SUPERVISOR_PURE=1` for the source.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

REQ = b"GET /small HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: bench\r\n\r\n"
RESP = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
        b'{"ok":true}')


async def measure(n: int, rounds: int, turns: int) -> float:
    from collect import Wired

    w = Wired(max_concurrency=1024, max_queue=1024)
    conn, up, client, upstream = w.conn, w.up, w.client, w.upstream

    async def one() -> None:
        conn.data_received(REQ)
        for _ in range(turns):
            await asyncio.sleep(0)
        up.data_received(RESP)
        for _ in range(turns):
            await asyncio.sleep(0)

    for _ in range(2000):
        await one()
    if not client.out or not client.out[-1].startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"the gate did not answer as expected: {client.out[-1:]!r}")
    best = float("inf")
    for _ in range(rounds):
        client.out.clear()
        upstream.out.clear()
        t = time.process_time()
        for _ in range(n):
            await one()
        best = min(best, (time.process_time() - t) / n)
        if len(client.out) != n:
            raise SystemExit(f"{n} requests, {len(client.out)} answers")
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--turns", type=int, default=0)
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parent.parent)
    a = ap.parse_args()
    sys.path.insert(0, str(a.src.resolve()))
    sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))
    import uvloop

    best = uvloop.run(measure(a.n, a.rounds, a.turns))
    from supervisord_llm import native

    print(f"gate, Python per small request: {best * 1e6:.1f} us "
          f"(fake transports, {a.turns} loop turns after each half, best of {a.rounds}; "
          f"{native.WHY})")


if __name__ == "__main__":
    main()
