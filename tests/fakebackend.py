"""A fake inference backend with fault knobs, for what a real server cannot do on demand.

    python tests/fakebackend.py --port N [knobs]

Knobs (command line, or at run time with `POST /_ctl?key=value`):
  --load-s S         /health answers 503 ("loading") for S seconds after start
  --health-status N  the status /health answers once loaded (default 200)
  --health-hang      /health never answers
  --ignore-term      ignore SIGTERM (only SIGKILL ends it)
  --grandchild       fork a grandchild that ignores SIGTERM and holds stdout/stderr
  --escape           fork a child that leaves the process group (setsid) and holds
                     stdout/stderr; it inherits the SIGTERM disposition (--ignore-term)
  --escape-clean-env the escaped child re-executes itself with an empty environment (it no
                     longer carries the supervisor's launch marker)
  --exit-after S     exit by itself S seconds after start, with --exit-code (default 1)
  --pidfile PATH     write "PID GRANDCHILD_PID" here once listening (with --escape:
                     "PID GRANDCHILD_PID ESCAPED_PID"; 0 for a child not asked for)
  --no-listen        never listen (a server stuck before binding its port)
  --sim-memory PATH UUID BYTES
                     like a model on a GPU: adds BYTES to `memory_used_bytes` of that GPU in
                     the sim state file once loaded (before /health answers 200) and takes
                     them away when it exits; also under `processes` by its pid (what NVML
                     would say per process) unless --sim-memory-no-pid
Serves `/v1/models` and `/v1/chat/completions` (plain and `stream: true`, with
`fake_token_delay_s` between chunks and `fake_die_after` chunks to crash mid-stream), like
llama.cpp; `/echo` answers the request's method, path, headers and body size; `/_stats` counts
streams completed and streams whose client went away (the generation was stopped).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from typing import Any

from aiohttp import web


def _grandchild() -> int:
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # keeps the inherited stdout/stderr (the supervisor's log pipe) open
        while True:
            time.sleep(3600)
    return pid


def _escapee(clean_env: bool) -> int:
    pid = os.fork()
    if pid == 0:
        os.setsid()  # out of the service's process group and session
        if clean_env:
            os.execve(sys.executable, [sys.executable, "-c",  # noqa: S606 - the knob
                                       "import time\nwhile True: time.sleep(3600)"], {})
        # keeps the inherited stdout/stderr (the supervisor's log pipe) open
        while True:
            time.sleep(3600)
    return pid


def _sim_memory(path: str, uuid: str, delta: int, per_process: bool) -> None:
    """Add `delta` to a sim GPU's used memory in the state file (under a lock: several
    backends share it); written atomically, as the daemon re-reads it at every poll."""
    import fcntl

    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path) as fh:
                state = json.load(fh)
        except (OSError, ValueError):
            state = {}
        gpu = state.setdefault(uuid, {})
        gpu["memory_used_bytes"] = max(0, int(gpu.get("memory_used_bytes", 0)) + delta)
        if per_process:
            procs = gpu.setdefault("processes", {})
            if delta > 0:
                procs[str(os.getpid())] = delta
            else:
                procs.pop(str(os.getpid()), None)
        with open(path + f".{os.getpid()}", "w") as fh:
            json.dump(state, fh)
        os.replace(path + f".{os.getpid()}", path)


def _prompt_tokens(body: dict[str, Any]) -> int:
    """A stand-in for a tokenizer: a token per word of the messages."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--load-s", type=float, default=0.0)
    ap.add_argument("--health-status", type=int, default=200)
    ap.add_argument("--health-hang", action="store_true")
    ap.add_argument("--ignore-term", action="store_true")
    ap.add_argument("--grandchild", action="store_true")
    ap.add_argument("--escape", action="store_true")
    ap.add_argument("--escape-clean-env", action="store_true")
    ap.add_argument("--exit-after", type=float, default=None)
    ap.add_argument("--exit-code", type=int, default=1)
    ap.add_argument("--pidfile", default=None)
    ap.add_argument("--starts", default=None)  # a file: one line (the pid) per start
    ap.add_argument("--no-listen", action="store_true")
    ap.add_argument("--sim-memory", nargs=3, default=None)
    ap.add_argument("--sim-memory-no-pid", action="store_true")
    a = ap.parse_args()
    started = time.monotonic()
    knobs: dict[str, object] = {"health_status": a.health_status, "health_hang": a.health_hang,
                                "load_s": a.load_s, "gen_hang": False}
    if a.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    gc_pid = _grandchild() if a.grandchild else 0
    escaped_pid = _escapee(a.escape_clean_env) if a.escape else 0

    async def health(request: web.Request) -> web.StreamResponse:
        if knobs["health_hang"]:
            await asyncio.sleep(3600)
        if time.monotonic() - started < float(knobs["load_s"]):  # type: ignore[arg-type]
            return web.json_response({"error": "Loading model"}, status=503)
        status = int(knobs["health_status"])  # type: ignore[call-overload]
        return web.json_response({"status": "ok" if status == 200 else "error"}, status=status)

    async def ctl(request: web.Request) -> web.Response:
        for key, value in request.query.items():
            if key in ("health_hang", "gen_hang"):
                knobs[key] = value in ("1", "true")
            elif key == "health_status":
                knobs[key] = int(value)
            elif key == "load_s":
                knobs[key] = float(value)
            elif key == "exit":
                asyncio.get_running_loop().call_later(0.01, os._exit, int(value))
        return web.json_response(knobs)

    stats = {"streams_done": 0, "streams_aborted": 0, "streams_active": 0, "probes": 0}

    async def stats_view(request: web.Request) -> web.Response:
        return web.json_response(stats)

    async def echo(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        return web.json_response({"method": request.method, "path": request.path_qs,
                                  "headers": dict(request.headers), "body_bytes": size},
                                 headers={"X-Backend-Port": str(a.port), "Connection": "close"
                                          if request.query.get("close") else "keep-alive"})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if request.headers.get("User-Agent") == "llm-supervisor-probe":
            stats["probes"] += 1
        if knobs["gen_hang"]:  # the engine is wedged; /health still says 200
            await asyncio.sleep(3600)
        n = int(body.get("max_tokens", 8))
        delay = float(body.get("fake_token_delay_s", 0.0))
        die_after = body.get("fake_die_after")
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "X-Backend-Port": str(a.port)})
            await resp.prepare(request)
            stats["streams_active"] += 1
            try:
                for i in range(n):
                    if die_after is not None and i == die_after:
                        os._exit(3)  # the model server crashes mid-stream
                    text = f"t{i} " + "x" * int(body.get("fake_chunk_bytes", 0))
                    chunk = {"object": "chat.completion.chunk", "choices": [
                        {"index": 0, "delta": {"content": text}, "finish_reason": None}]}
                    await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    if delay:
                        await asyncio.sleep(delay)
                if (body.get("stream_options") or {}).get("include_usage"):
                    usage = {"prompt_tokens": _prompt_tokens(body), "completion_tokens": n,
                             "total_tokens": _prompt_tokens(body) + n}
                    await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}"
                                     "\n\n".encode())
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
            except (ConnectionResetError, asyncio.CancelledError):
                stats["streams_aborted"] += 1
                raise
            finally:
                stats["streams_active"] -= 1
            stats["streams_done"] += 1
            return resp
        if delay:
            await asyncio.sleep(delay * n)
        return web.json_response({
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant",
                                                  "content": " ".join(f"t{i}" for i in range(n))},
                         "finish_reason": "length"}],
            "usage": {"prompt_tokens": _prompt_tokens(body), "completion_tokens": n,
                      "total_tokens": _prompt_tokens(body) + n},
        })

    async def run() -> None:
        if a.starts:
            with open(a.starts, "a") as fh:
                fh.write(f"{os.getpid()}\n")
        if a.exit_after is not None:
            asyncio.get_running_loop().call_later(a.exit_after, os._exit, a.exit_code)
        if a.no_listen:
            await asyncio.sleep(3600 * 24)
        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_post("/_ctl", ctl)
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_post("/v1/completions", chat)
        app.router.add_route("*", "/echo", echo)
        app.router.add_get("/_stats", stats_view)
        runner = web.AppRunner(app, access_log=None, handle_signals=False,
                               handler_cancellation=True)
        await runner.setup()
        if a.sim_memory:
            path, uuid, size = a.sim_memory
            _sim_memory(path, uuid, int(size), not a.sim_memory_no_pid)
        await web.TCPSite(runner, a.host, a.port).start()
        if a.pidfile:
            tmp = a.pidfile + ".tmp"
            with open(tmp, "w") as fh:
                fh.write(f"{os.getpid()} {gc_pid}" + (f" {escaped_pid}" if a.escape else "")
                         + "\n")
            os.replace(tmp, a.pidfile)
        print(f"fakebackend listening on {a.host}:{a.port}", flush=True)
        stop = asyncio.Event()
        if not a.ignore_term:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        try:
            await stop.wait()
        finally:
            if a.sim_memory:
                path, uuid, size = a.sim_memory
                _sim_memory(path, uuid, -int(size), not a.sim_memory_no_pid)
        await runner.cleanup()

    asyncio.run(run())
    sys.exit(0)


if __name__ == "__main__":
    main()
