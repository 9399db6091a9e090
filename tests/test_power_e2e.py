"""A power cut end to end, with real peers all around: a real upsd + dummy-ups
(tests/nutserver), two real llama-server services behind gates under streaming load, a real
Redis checkpointed by a `command` hook (BGSAVE), and a RAG store stand-in (tests/ragstore)
checkpointed by an `http` hook. The UPS goes on battery past the grace: the daemon drains the
gates (every admitted stream finishes, later requests get 503 + Retry-After), runs both
checkpoints (their files are checked for completeness, the Redis dump by loading it into a
second redis-server), stops the services and waits; the power returns and everything serves
again.

The RAG store is a supervised service (no GPU, no gate), as the RAG API of the box would be:
so the power-down stops it after its checkpoint and the power's return starts it again, and
it comes back with the vectors of its snapshot. Redis is not: like a system Redis under its
own systemd unit, the test runs it beside the daemon and it stays up through the power-down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from nutserver import NutServer, require_nut
from ragstore import read_snapshot

from helpers import (
    Daemon,
    alive,
    async_wait_until,
    base_config,
    free_port,
    make_tiny_model,
    require_llama_server,
    running,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

BIN = require_llama_server()
require_nut()
REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
REDIS_CHECK_RDB = shutil.which("redis-check-rdb")
if REDIS_SERVER is None or REDIS_CLI is None:
    if os.environ.get("LLM_SUPERVISOR_REQUIRE_E2E") == "1":
        raise RuntimeError("redis-server and redis-cli are required "
                           "(LLM_SUPERVISOR_REQUIRE_E2E=1): apt-get install redis-server")
    pytest.skip("redis-server is not installed (apt-get install redis-server)",
                allow_module_level=True)

RAGSTORE = str(Path(__file__).resolve().parent / "ragstore.py")
# Bigger than test_llama_e2e's default (still random weights, 68 MB), so that a stream of a
# few hundred tokens takes a second or two on a CPU: a token costs 4-7 ms with one thread.
CTX = 8192
MODEL_ARGS = ("--embd", "512", "--layers", "4", "--ff", "2048", "--ctx", str(CTX))
GRACE_S = 1.5
STREAMS_PER_GATE = 3
MAX_TOKENS = (120, 320)  # each stream asks for a random length in this range (desynchronized)
# Besides those, one long stream per gate, started just before the power fails and sized from
# the token rate measured under the load, to be sure that one is still in flight when its gate
# closes (the short ones may all end within the same few ms: their ends are not enough).
SENTINEL_MARGIN_S = 3.0
SENTINEL_MAX_TOKENS = 4000  # + 3 streams of MAX_TOKENS[1] each, well within CTX
DIM = 64
VECTORS = 3000
REDIS_KEYS = 2000


# --- Redis ------------------------------------------------------------------------------------


class Redis:
    """redis-server in the foreground, on loopback, its own process group, no automatic
    saves (`--save ''`): dump.rdb in `directory` only ever comes from a BGSAVE. It dies with
    the test's process (PR_SET_PDEATHSIG through setpriv, as tests/nutserver does), should
    pytest itself be killed."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.dir = directory
        self.port = port or free_port()
        self.dump = directory / "dump.rdb"
        self.log = directory / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Redis:
        assert REDIS_SERVER is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        setpriv = shutil.which("setpriv")
        prefix = ([setpriv, "--pdeathsig", "KILL", "--"]
                  if setpriv and threading.current_thread() is threading.main_thread() else [])
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*prefix, REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                 "--dbfilename", "dump.rdb", "--daemonize", "no", "--logfile", ""],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        wait_until(self._pong, 10, interval=0.05,
                   what=f"redis-server on port {self.port} ({self.log})")
        return self

    def _pong(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited {self.proc.returncode}: "
                                 f"{self.log.read_text(errors='replace')[-2000:]}")
        return self.cli("PING", check=False) == "PONG"

    def cli(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        assert REDIS_CLI is not None
        r = subprocess.run([REDIS_CLI, "-p", str(self.port), *args], input=stdin,
                           capture_output=True, text=True, timeout=20, check=False)
        if check and r.returncode != 0:
            raise AssertionError(f"redis-cli {' '.join(args)}: exit {r.returncode}: "
                                 f"{r.stdout[-500:]} {r.stderr[-500:]}")
        return r.stdout.strip()

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path / "redis")
    try:
        yield server.start()
    finally:
        server.stop()


def check_rdb(dump: Path) -> None:
    """redis-check-rdb's verdict on a dump file, where it is installed."""
    if REDIS_CHECK_RDB is None:
        return
    r = subprocess.run([REDIS_CHECK_RDB, str(dump)], capture_output=True, text=True,
                       timeout=30, check=False)
    assert r.returncode == 0 and "RDB looks OK" in r.stdout, r.stdout + r.stderr


def redis_hook(path: Path, port: int) -> Path:
    """The `command` checkpoint for Redis: BGSAVE, and exit 0 once LASTSAVE says it is done
    (1 if the save failed)."""
    path.write_text(f"""#!/bin/bash
set -euo pipefail
cli() {{ {REDIS_CLI} -p {port} "$@"; }}
before=$(cli LASTSAVE)
# LASTSAVE counts whole seconds: a save done within the second of the last one would not show
while [ "$(date +%s)" -le "$before" ]; do sleep 0.05; done
reply=$(cli BGSAVE)
[ "$reply" = "Background saving started" ] || {{ echo "BGSAVE: $reply" >&2; exit 1; }}
while [ "$(cli LASTSAVE)" = "$before" ]; do
  info=$(cli INFO persistence | tr -d '\\r')
  if grep -qx 'rdb_bgsave_in_progress:0' <<<"$info" \\
      && grep -qx 'rdb_last_bgsave_status:err' <<<"$info"; then
    echo "BGSAVE failed" >&2; exit 1
  fi
  sleep 0.05
done
echo "redis: saved at $(cli LASTSAVE)"
""")
    path.chmod(0o755)
    return path


# --- the daemon's config ----------------------------------------------------------------------


@pytest.fixture
def ups(tmp_path: Path) -> Iterator[NutServer]:
    with NutServer(tmp_path / "nut") as server:
        yield server


def llama(name: str, model: Path, gpu: int) -> dict[str, Any]:
    assert BIN is not None
    return {
        "name": name,
        "command": [BIN, "-m", str(model), "--host", "127.0.0.1", "--port", "{port}",
                    "-c", str(CTX), "-t", "1", "--no-webui"],
        "port": free_port(),
        "gpus": [gpu],
        # two CPU-bound servers on a small box: a probe gets a second, not 0.2 s
        "health": {"interval_s": 1, "timeout_s": 1, "failures": 3, "startup_timeout_s": 60},
        "restart": {"backoff_initial_s": 0.1, "backoff_max_s": 0.5, "max_restarts": 4,
                    "window_s": 60},
        "stop": {"timeout_s": 3},
        "gate": {"listen": f"127.0.0.1:{free_port()}", "max_concurrency": 4,
                 "drain_timeout_s": 30},
    }


def ragstore(snapshot: Path) -> dict[str, Any]:
    return {
        "name": "rag",
        "command": [sys.executable, RAGSTORE, "--port", "{port}", "--snapshot", str(snapshot),
                    "--dim", str(DIM)],
        "port": free_port(),
        "health": {"interval_s": 1, "timeout_s": 1, "failures": 3, "startup_timeout_s": 30},
        "restart": {"backoff_initial_s": 0.1, "backoff_max_s": 0.5, "max_restarts": 4,
                    "window_s": 60},
        "stop": {"timeout_s": 3},
    }


def gate_port(d: Daemon, name: str) -> int:
    svc = next(s for s in d.doc["service"] if s["name"] == name)
    return int(svc["gate"]["listen"].rsplit(":", 1)[1])


def service_port(d: Daemon, name: str) -> int:
    return int(next(s for s in d.doc["service"] if s["name"] == name)["port"])


# --- streaming clients ------------------------------------------------------------------------


@dataclass
class Outcome:
    gate: str
    worker: int
    max_tokens: int
    started: float  # monotonic, as the request was sent
    ended: float = 0.0  # monotonic, once the whole answer was read (or it failed)
    status: int = 0
    retry_after: str | None = None
    error_code: str | None = None  # a rejection's error.code
    events: list[str] = field(default_factory=list)  # the SSE data payloads
    failure: str | None = None  # the connection failed or the stream broke

    def problem(self) -> str | None:
        """What is wrong with a 200 stream, or None if it is whole."""
        if self.failure:
            return self.failure
        if not self.events or self.events[-1] != "[DONE]":
            return f"no [DONE] at the end ({len(self.events)} events)"
        chunks = [json.loads(e) for e in self.events[:-1]]
        if any(c.get("object") != "chat.completion.chunk" for c in chunks):
            return "a chunk that is not a chat.completion.chunk"
        finish = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
        if "length" not in finish:
            return f"no finish_reason length: {[f for f in finish if f]}"
        usage = [c["usage"] for c in chunks if c.get("usage")]
        if not usage or usage[-1]["completion_tokens"] != self.max_tokens:
            return f"usage {usage[-1:] or None}, asked for {self.max_tokens} tokens"
        return None

    def __str__(self) -> str:
        return (f"{self.gate}#{self.worker} {self.status} max_tokens={self.max_tokens} "
                f"{self.ended - self.started:.2f} s events={len(self.events)} "
                f"retry_after={self.retry_after} code={self.error_code} "
                f"failure={self.failure}")


async def stream_chat(session: aiohttp.ClientSession, gate: str, port: int, max_tokens: int,
                      *, worker: int = -1, out: Outcome | None = None) -> Outcome:
    """A streamed chat completion through a gate, read to its end; `out` (filled in as the
    stream comes) lets a caller watch it."""
    if out is None:
        out = Outcome(gate, worker, max_tokens, time.monotonic())
    out.started = time.monotonic()
    body = {"messages": [{"role": "user", "content": "tell me about the power grid"}],
            "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    try:
        async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=60)) as resp:
            out.status = resp.status
            out.retry_after = resp.headers.get("Retry-After")
            if resp.status != 200:
                raw = await resp.read()
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    out.error_code = json.loads(raw)["error"]["code"]
            else:
                async for line in resp.content:
                    text = line.decode().rstrip("\r\n")
                    if text.startswith("data: "):
                        out.events.append(text[6:])
    except (aiohttp.ClientError, TimeoutError) as exc:
        out.failure = f"{type(exc).__name__}: {exc}"
    out.ended = time.monotonic()
    return out


async def load(session: aiohttp.ClientSession, gate: str, port: int, *, worker: int,
               rng: random.Random, outcomes: list[Outcome]) -> None:
    """One client: streams, one after the other, until one is not a 200 (a well-behaved
    client then backs off for Retry-After: here it stops)."""
    while True:
        o = await stream_chat(session, gate, port, rng.randint(*MAX_TOKENS), worker=worker)
        outcomes.append(o)
        if o.status != 200 or o.failure:
            return


# --- reading the daemon -----------------------------------------------------------------------


async def astatus(d: Daemon) -> dict[str, Any]:
    """`status` off the event loop (the streams keep flowing meanwhile)."""
    return await asyncio.to_thread(d.status)


def gate_requests(d: Daemon) -> dict[tuple[str, str], float]:
    """llm_supervisor_gate_requests_total by (service, code)."""
    url = f"http://{d.doc['metrics']['listen']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("llm_supervisor_gate_requests_total{"):
            labels, value = line[len("llm_supervisor_gate_requests_total{"):].split("} ")
            kv = dict(item.split("=", 1) for item in labels.split(","))
            out[(kv["service"].strip('"'), kv["code"].strip('"'))] = float(value)
    return out


# --- the test ---------------------------------------------------------------------------------


async def test_power_cut_under_streaming_load_checkpoints_stops_and_comes_back(
        tmp_path: Path, ups: NutServer, redis: Redis) -> None:
    t0 = time.monotonic()
    model = make_tiny_model(tmp_path / "tiny.gguf", *MODEL_ARGS)
    snapshot = tmp_path / "rag" / "vectors.snap"
    snapshot.parent.mkdir()
    hook = redis_hook(tmp_path / "redis-checkpoint", redis.port)
    rag_svc = ragstore(snapshot)
    doc = base_config(tmp_path, [llama("chat-a", model, 0), llama("chat-b", model, 1), rag_svc],
                      gpus=2, power={
        "source": "nut", "ups": ups.ups, "poll_interval_s": 0.2, "on_battery_grace_s": GRACE_S,
        "deadtime_s": 5, "low_runtime_s": 60, "low_charge_pct": 20, "drain_timeout_s": 30,
        "stop_timeout_s": 10},
        checkpoint=[
            {"name": "rag-store", "kind": "http", "timeout_s": 15,
             "url": f"http://127.0.0.1:{rag_svc['port']}/checkpoint"},
            {"name": "redis", "kind": "command", "command": [str(hook)], "timeout_s": 15},
        ])
    gates = ("chat-a", "chat-b")
    names = (*gates, "rag")

    with running(tmp_path, doc) as d:
        # --- up and serving, the UPS on line ------------------------------------------------
        for name in names:
            d.wait_state(name, "ready", 60)
        wait_until(lambda: all(d.service(g)["gate"] == "open" for g in gates), 10,
                   what="gates open")
        wait_until(lambda: d.status()["power"]["state"] == "online", 10, what="UPS online")
        assert d.status()["supervisor"]["mode"] == "normal"
        before = {name: d.service(name)["pid"] for name in names}

        # --- data in the stores, none of it on disk yet ------------------------------------
        vectors = np.random.default_rng(7).standard_normal((VECTORS, DIM)).astype("<f4")
        blob = vectors.tobytes()
        rag = f"http://127.0.0.1:{service_port(d, 'rag')}"
        async with aiohttp.ClientSession() as session:
            for i in range(0, VECTORS, 500):
                async with session.post(f"{rag}/add", data=blob[i * DIM * 4:
                                                                (i + 500) * DIM * 4]) as r:
                    assert r.status == 200, await r.text()
            async with session.get(f"{rag}/stats") as r:
                stats = await r.json()
        assert stats["count"] == VECTORS and stats["checkpoints"] == 0
        assert stats["sha256"] == hashlib.sha256(blob).hexdigest()
        redis.cli(stdin="".join(f"SET doc:{i} chunk-{i}-{i * 7919 % 10007}\n"
                                for i in range(REDIS_KEYS))
                  + "HSET meta model tiny dim 64 source power-e2e\n"
                  + "RPUSH queue " + " ".join(f"job{i}" for i in range(50)) + "\n")
        assert redis.cli("DBSIZE") == str(REDIS_KEYS + 2)
        assert not snapshot.exists() and not redis.dump.exists()
        setup_s = time.monotonic() - t0

        # --- streaming load, then the power fails --------------------------------------------
        outcomes: list[Outcome] = []
        modes: list[str] = []
        rng = random.Random(20240611)
        # keep-alive, as OpenAI clients do: a refusal comes on a connection that served before
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            workers = [asyncio.create_task(load(session, g, gate_port(d, g), worker=w,
                                                rng=random.Random(rng.random()),
                                                outcomes=outcomes),
                                           name=f"load-{g}-{w}")
                       for g in gates for w in range(STREAMS_PER_GATE)]
            sentinels = {g: Outcome(g, STREAMS_PER_GATE, 0, 0.0) for g in gates}
            long_ones: list[asyncio.Task[Outcome]] = []
            try:
                # every client has had a whole stream: the load is steady
                await async_wait_until(
                    lambda: len({(o.gate, o.worker) for o in outcomes})
                    == len(workers) or any(t.done() for t in workers),
                    60, interval=0.05, what="a first stream from every client")
                assert not any(t.done() for t in workers), "\n".join(map(str, outcomes))
                # a long stream per gate, to outlast the grace and the first refusal; the
                # fastest rate seen, so that it is long enough (more streams: slower still)
                rate = max(o.max_tokens / (o.ended - o.started) for o in outcomes
                           if o.status == 200)
                for o in sentinels.values():
                    o.max_tokens = min(SENTINEL_MAX_TOKENS,
                                       int(rate * (GRACE_S + SENTINEL_MARGIN_S)) + MAX_TOKENS[1])
                    long_ones.append(asyncio.create_task(
                        stream_chat(session, o.gate, gate_port(d, o.gate), o.max_tokens,
                                    out=o), name=f"sentinel-{o.gate}"))
                await async_wait_until(lambda: all(o.events or o.ended
                                                   for o in sentinels.values()),
                                       30, interval=0.01, what="the long streams flowing")
                cut = time.monotonic()
                ups.set(status="OB DISCHRG", charge=80, runtime=900)

                async def powered_down() -> bool:
                    mode = str((await astatus(d))["supervisor"]["mode"])
                    if not modes or modes[-1] != mode:
                        modes.append(mode)
                    return mode == "powered_down"

                try:
                    await async_wait_until(powered_down, 60, interval=0.1, what="powered down")
                except AssertionError as exc:
                    raise AssertionError(f"{exc}; modes {modes}; log: {d.logtext()[-3000:]}"
                                         ) from None
                down_s = time.monotonic() - cut
                # every client ends on its own: its next request after the close is refused
                await asyncio.wait_for(asyncio.gather(*workers, *long_ones), 30)
                # and so is a new one now
                late = [await stream_chat(session, g, gate_port(d, g), 10) for g in gates]
            finally:
                for t in [*workers, *long_ones]:
                    t.cancel()
                await asyncio.gather(*workers, *long_ones, return_exceptions=True)

        report = "\n".join(map(str, sorted([*outcomes, *sentinels.values()],
                                             key=lambda o: o.started)))
        order = ["normal", "on_battery", "powering_down", "powered_down"]
        assert modes == [m for m in order if m in modes], modes
        assert "on_battery" in modes and "powering_down" in modes, modes
        # no stream broke, nothing but 200 and 503
        assert all(o.failure is None for o in outcomes), report
        assert {o.status for o in outcomes} == {200, 503}, report
        for g in gates:
            for w in range(STREAMS_PER_GATE):
                mine = [o for o in outcomes if (o.gate, o.worker) == (g, w)]
                assert [o.status for o in mine] == [200] * (len(mine) - 1) + [503], report
        # every request admitted (before the drain was done) finished whole
        ok = [o for o in outcomes if o.status == 200]
        for o in ok:
            assert o.problem() is None, f"{o}: {o.problem()}\n{report}"
        # those that came after the gates closed were refused, with a Retry-After
        for o in [o for o in outcomes if o.status != 200] + late:
            assert o.status == 503 and o.error_code in ("draining", "closed"), f"{o}\n{report}"
            assert o.retry_after is not None and int(o.retry_after) > 0, f"{o}\n{report}"
        # and the drain did wait for streams: on each gate, the long one still streamed
        # after that gate had refused a request, and it finished whole
        for g, o in sentinels.items():
            first_503 = min(x.ended for x in outcomes if x.gate == g and x.status == 503)
            assert o.status == 200 and o.problem() is None, f"{o}: {o.problem()}\n{report}"
            assert o.ended > first_503, f"{o} was not in flight when {g} closed\n{report}"
        ok += sentinels.values()
        # the gate saw what the clients saw: no 499, no 502
        counted = gate_requests(d)
        for g in gates:
            assert counted.get((g, "200")) == sum(o.gate == g for o in ok), counted
            assert counted.get((g, "503")) == sum(o.gate == g and o.status == 503
                                                  for o in [*outcomes, *late]), counted
            assert {c for s, c in counted if s == g} == {"200", "503"}, counted

        # --- powered down: the sequence, the checkpoints, no process left ---------------------
        st = d.status()
        assert st["supervisor"]["mode"] == "powered_down"
        power = st["power"]
        assert power["state"] == "on_battery" and power["phase"] == "powered_down", power
        steps = power["power_down"]["steps"]
        assert [s["step"] for s in steps] == ["drain", "checkpoint", "stop"], steps
        assert all(s["duration_s"] is not None for s in steps), steps
        assert "cut off" not in steps[0]["detail"], steps
        assert "all done" in steps[1]["detail"], steps
        assert "killed" not in steps[2]["detail"], steps
        cps = {c["name"]: c for c in power["checkpoints"]}
        assert list(cps) == ["rag-store", "redis"], cps
        for c in cps.values():
            assert c["result"] == "ok" and c["error"] is None and c["why"] == "power-down", c
            assert c["age_s"] < 120, c
        for name in names:
            svc = next(s for s in st["services"] if s["name"] == name)
            assert svc["state"] == "stopped" and "powered_down" in svc["holds"], svc
            assert not alive(before[name]), f"{name} pid {before[name]} is still there"

        # the RAG store's snapshot: complete, consistent, every vector; no temporary file
        snap = read_snapshot(snapshot)
        assert (snap.count, snap.dim) == (VECTORS, DIM)
        assert snap.sha256 == hashlib.sha256(blob).hexdigest() and snap.data == blob
        assert sorted(p.name for p in snapshot.parent.iterdir()) == [snapshot.name]

        # the Redis dump: written by the hook, sound, and it loads with every key
        assert redis.dump.stat().st_size > 0
        check_rdb(redis.dump)
        copy = Redis(tmp_path / "redis-reload")
        copy.dir.mkdir()
        shutil.copy(redis.dump, copy.dump)
        try:
            copy.start()
            assert copy.cli("DBSIZE") == str(REDIS_KEYS + 2)
            for i in (0, 1234, REDIS_KEYS - 1):
                assert copy.cli("GET", f"doc:{i}") == f"chunk-{i}-{i * 7919 % 10007}"
            assert copy.cli("HGET", "meta", "source") == "power-e2e"
            assert copy.cli("LLEN", "queue") == "50"
        finally:
            copy.stop()

        # --- the power returns ---------------------------------------------------------------
        back = time.monotonic()
        ups.set(status="OL CHRG", charge=80, runtime=900)
        for name in names:
            d.wait_state(name, "ready", 60)
        wait_until(lambda: all(d.service(g)["gate"] == "open" for g in gates), 10,
                   what="gates open")
        wait_until(lambda: d.status()["supervisor"]["mode"] == "normal", 10, what="mode normal")
        up_s = time.monotonic() - back
        st = d.status()
        assert st["power"]["phase"] == "online" and st["power"]["state"] == "online"
        for svc in st["services"]:
            assert svc["pid"] != before[svc["name"]] and not svc["holds"], svc
        async with aiohttp.ClientSession() as session:
            for g in gates:
                o = await stream_chat(session, g, gate_port(d, g), 64)
                assert o.status == 200 and o.problem() is None, str(o)
            async with session.get(f"{rag}/stats") as r:
                stats = await r.json()
        # the RAG store came back from its snapshot
        assert stats["restored"] == VECTORS and stats["count"] == VECTORS
        assert stats["sha256"] == hashlib.sha256(blob).hexdigest()
        closed = min(o.ended for o in outcomes if o.status == 503)
        timings = ", ".join(f"{s['step']} {s['duration_s']:.2f} s" for s in steps)
        print(f"\nsetup {setup_s:.1f} s; power cut -> powered_down {down_s:.1f} s ({timings}); "
              f"power back -> serving {up_s:.1f} s; {len(ok)} streams finished whole, "
              f"{sum(o.ended > closed for o in ok)} after the first 503; long ones "
              f"{[str(o) for o in sentinels.values()]}; modes {modes}")
