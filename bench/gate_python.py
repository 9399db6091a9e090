"""The gate's own Python cost per small request, without the kernel: the real client
connection, gate and upstream connection, on uvloop, with transports that only collect what
is written. A request is its head fed to the client connection, the upstream's answer fed
to the upstream connection; the figure is CPU time (process) per request, the best of
`--rounds` rounds of `--n` requests.

    .venv/bin/python bench/gate_python.py [--turns 0] [--src TREE] [--door]

`--turns N` lets the loop turn N times after each half (what a request path with tasks needs
to go on; 4 + 4 is enough for the task-based path this replaced); `--src TREE` measures the
gate of another source tree (a `git worktree` of an older commit), for a before/after with
the same harness and the same `--turns`. It measures the request path as it loads (compiled,
or from source: supervisord_llm/native.py, printed); `LLM_SUPERVISOR_PURE=1` for the source.

`--door` measures the front door in the same run: the same requests (each with an
`Authorization` header) with no [auth] (only the path allowlist), with a key, with a key and
its limits (requests and tokens per minute, requests at once: the x-ratelimit-* headers on
each answer), and with all that and the audit log (written to /dev/null by its thread, whose
CPU counts); and an SSE answer of 200 events, its cost per event, with and without them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

REQ = (b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: bench\r\n"
       b"Authorization: Bearer sk-llm-bench-0123456789abcdef0123456789abcdef01234\r\n\r\n")
SECRET = "sk-llm-bench-0123456789abcdef0123456789abcdef01234"  # noqa: S105 - a made-up key
SSE_EVENTS = 200
SSE_REQ = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
           b"Authorization: Bearer " + SECRET.encode() + b"\r\nContent-Type: application/json"
           b"\r\nContent-Length: 58\r\n\r\n"
           b'{"model":"m","stream":true,"messages":[{"role":"user"}]}  ')
_EVENT = (b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":'
          b'{"content":" token"},"finish_reason":null}]}\n\n')
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
SSE_CHUNK = b"%x\r\n%s\r\n" % (len(_EVENT), _EVENT)
_LAST = (b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":200,'
         b'"total_tokens":205}}\n\ndata: [DONE]\n\n')
SSE_END = b"%x\r\n%s\r\n0\r\n\r\n" % (len(_LAST), _LAST)
RESP = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
        b'{"ok":true}')


def make_door(kind: str) -> object:
    """The front door of one variant (None: as before there was one)."""
    if kind == "none":
        return None
    from supervisord_llm.gate.door import Door
    from supervisord_llm.keys import ApiKey, hash_secret

    door = Door()
    limits = {"requests_per_minute": 10**6, "tokens_per_minute": 10**9,
              "max_concurrency": 10**6} if kind in ("limits", "audit") else {}
    door.set_keys([ApiKey("bench", hash_secret(SECRET), **limits).to_doc()])  # type: ignore[arg-type]
    if kind == "audit":
        from supervisord_llm.audit import AuditLog

        door.sink = AuditLog("/dev/null").put_batch
        door.audit = door.buffer_line
    return door


async def measure(n: int, rounds: int, turns: int, door: object = None) -> float:
    from collect import Wired

    w = Wired(door, max_concurrency=1024, max_queue=1024)
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


async def measure_sse(n: int, rounds: int, door: object = None, events: int = SSE_EVENTS
                      ) -> float:
    """CPU per SSE answer of `events` events (each event one read)."""
    from collect import Wired

    w = Wired(door, max_concurrency=1024, max_queue=1024)
    conn, up, client = w.conn, w.up, w.client

    def one() -> None:
        conn.data_received(SSE_REQ)
        up.data_received(SSE_HEAD)
        for _ in range(events):
            up.data_received(SSE_CHUNK)
        up.data_received(SSE_END)

    for _ in range(200):
        one()
    if not any(b"[DONE]" in x for x in client.out[-3:]):
        raise SystemExit(f"the gate did not stream as expected: {client.out[-3:]!r}")
    best = float("inf")
    for _ in range(rounds):
        client.out.clear()
        w.upstream.out.clear()
        t = time.process_time()
        for _ in range(n):
            one()
        best = min(best, (time.process_time() - t) / n)
    return best


async def door_figures(n: int, rounds: int) -> list[str]:
    out = []
    base = 0.0
    for kind, what in (("none", "no [auth] (the path allowlist only)"),
                       ("keys", "a key"), ("limits", "a key with its three limits"),
                       ("audit", "a key, its limits and the audit log")):
        best = await measure(n, rounds, 0, make_door(kind))
        if kind == "none":
            base = best
        out.append(f"  {what:40s} {best * 1e6:6.1f} us per request"
                   + (f" (+{(best - base) * 1e6:.1f})" if kind != "none" else ""))
    # per event: the slope between answers of SSE_EVENTS and 4x as many events (what a
    # request costs once, the usage read at its end included, falls out)
    m = max(n // 400, 20)
    per = []
    for door in (None, make_door("audit")):
        short = await measure_sse(m, rounds, door, SSE_EVENTS)
        long = await measure_sse(m, rounds, door, 4 * SSE_EVENTS)
        per.append(((long - short) / (3 * SSE_EVENTS), short))
    (base_e, base_r), (door_e, door_r) = per
    out.append(f"  SSE, per event: {base_e * 1e9:.0f} ns without, {door_e * 1e9:.0f} ns with a "
               f"key, limits and the audit ({(door_e - base_e) * 1e9:+.0f} ns); a stream of "
               f"{SSE_EVENTS} events: {base_r * 1e6:.0f} -> {door_r * 1e6:.0f} us")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--turns", type=int, default=0)
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--door", action="store_true", help="the front door's cost, same run")
    a = ap.parse_args()
    sys.path.insert(0, str(a.src.resolve()))
    sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))
    import uvloop

    best = uvloop.run(measure(a.n, a.rounds, a.turns))
    from supervisord_llm import native

    print(f"gate, Python per small request: {best * 1e6:.1f} us "
          f"(fake transports, {a.turns} loop turns after each half, best of {a.rounds}; "
          f"{native.WHY})")
    if a.door:
        print("the front door, the same requests:")
        for line in uvloop.run(door_figures(a.n, a.rounds)):
            print(line)


if __name__ == "__main__":
    main()
