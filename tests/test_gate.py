"""The request gate, in the daemon as a real process, in front of fake backends: proxying,
streaming without buffering, accounting, drain, admission, failover, mid-stream failures."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from helpers import Daemon, async_wait_until, base_config, fake_service, free_port, running

Stream = tuple[int, list[str], list[float]]


def gated(name: str, *knobs: str, backup: str | None = None, **gate: Any) -> dict[str, Any]:
    # (any path: these drive the gate's HTTP; the allowlist is tests/test_door.py's)
    cfg: dict[str, Any] = {"listen": f"127.0.0.1:{free_port()}", "max_concurrency": 64,
                           "max_queue": 64, "queue_timeout_s": 5, "allow_paths": ["/*"]}
    cfg.update(gate)
    if backup:
        cfg["backup"] = backup
    return fake_service(name, free_port(), *knobs, gate=cfg)


def gate_url(d: Daemon, name: str) -> str:
    for svc in d.doc["service"]:
        if svc["name"] == name:
            return f"http://{svc['gate']['listen']}"
    raise KeyError(name)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        yield s


async def stream(client: aiohttp.ClientSession, url: str, tokens: int = 5, delay: float = 0.0,
                 **extra: Any) -> Stream:
    """A streamed chat completion: (status, data lines, arrival times)."""
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_tokens": tokens, "fake_token_delay_s": delay, **extra}
    lines: list[str] = []
    times: list[float] = []
    async with client.post(f"{url}/v1/chat/completions", json=body) as r:
        if r.status != 200:
            return r.status, [await r.text()], []
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("data: "):
                lines.append(line[6:])
                times.append(time.monotonic())
    return r.status, lines, times


def status(d: Daemon, name: str) -> dict[str, Any]:
    return d.service(name)


async def test_transparent_proxy(tmp_path: Path, client: aiohttp.ClientSession) -> None:
    with running(tmp_path, base_config(tmp_path, [gated("svc")])) as d:
        d.wait_state("svc", "ready")
        url = gate_url(d, "svc")
        body = b"x" * (3 * 1024 * 1024)
        headers = {"Connection": "keep-alive, X-Secret", "X-Secret": "drop me",
                   "Keep-Alive": "timeout=5", "TE": "trailers", "X-Keep": "yes",
                   "Authorization": "Bearer k"}
        for method in ("POST", "PUT", "PATCH", "DELETE", "GET"):
            data = io.BytesIO(body) if method in ("POST", "PUT") else None
            async with client.request(method, f"{url}/echo?a=1&b=%20x", data=data,
                                      headers=headers) as r:
                assert r.status == 200
                echo = await r.json()
                assert r.headers["X-Backend-Port"] == str(d.doc["service"][0]["port"])
            assert echo["method"] == method and echo["path"] == "/echo?a=1&b=%20x"
            assert echo["body_bytes"] == (len(body) if data else 0)
            sent = {k.lower(): v for k, v in echo["headers"].items()}
            assert sent["x-keep"] == "yes" and sent["authorization"] == "Bearer k"
            assert "x-secret" not in sent and "keep-alive" not in sent and "te" not in sent
            assert sent["x-forwarded-for"] == "127.0.0.1"
        async with client.get(f"{url}/no/such/path") as r:
            assert r.status == 404
        reply = await (await client.post(f"{url}/v1/chat/completions",
                                         json={"max_tokens": 4})).json()
        assert reply["choices"][0]["finish_reason"] == "length"


async def test_sse_is_not_buffered(tmp_path: Path, client: aiohttp.ClientSession) -> None:
    with running(tmp_path, base_config(tmp_path, [gated("svc")])) as d:
        d.wait_state("svc", "ready")
        t0 = time.monotonic()
        code, lines, times = await stream(client, gate_url(d, "svc"), tokens=6, delay=0.15)
        assert code == 200 and lines[-1] == "[DONE]" and len(lines) == 7
        assert times[0] - t0 < 0.12  # the first chunk came before the second was generated
        gaps = [b - a for a, b in itertools.pairwise(times)][:5]
        assert all(g > 0.08 for g in gaps), gaps  # chunk by chunk, as generated


async def test_drain_under_load(tmp_path: Path, client: aiohttp.ClientSession) -> None:
    """32 concurrent streaming clients: every admitted request completes; every request that
    arrives while draining gets 503 at once and never reaches the backend."""
    with running(tmp_path, base_config(tmp_path, [gated("svc")])) as d:
        d.wait_state("svc", "ready")
        url = gate_url(d, "svc")
        port = d.doc["service"][0]["port"]
        first = [asyncio.create_task(stream(client, url, tokens=20, delay=0.05))
                 for _ in range(32)]
        await async_wait_until(lambda: status(d, "svc")["inflight"] == 32, 10,
                               what="32 in flight")
        loop = asyncio.get_running_loop()
        drain = loop.run_in_executor(None, lambda: d.llmctl("drain", "svc", "--timeout", "30"))
        await async_wait_until(lambda: status(d, "svc")["gate"] == "draining", 5,
                               what="draining")
        t = time.monotonic()
        late = await asyncio.gather(*[stream(client, url, tokens=20) for _ in range(16)])
        assert all(code == 503 for code, _l, _t in late)
        assert time.monotonic() - t < 1.0  # answered at once, not after the drain
        err = json.loads(late[0][1][0])["error"]
        assert err["code"] == "draining" and "draining" in err["message"]
        results = await asyncio.gather(*first)
        assert all(code == 200 and lines[-1] == "[DONE]" and len(lines) == 21
                   for code, lines, _t in results)
        r = await drain
        assert r.returncode == 0, r.stderr
        assert "svc: draining (gate draining, 0 in flight)" in r.stdout
        async with client.get(f"http://127.0.0.1:{port}/_stats") as resp:
            stats = await resp.json()
        assert stats["streams_done"] == 32 and stats["streams_aborted"] == 0
        assert d.llmctl("resume", "svc").returncode == 0
        code, _lines, _t = await stream(client, url)
        assert code == 200 and status(d, "svc")["state"] == "ready"
        r2 = await asyncio.get_running_loop().run_in_executor(
            None, lambda: d.llmctl("drain", "svc", "--timeout", "0.5"))
        assert r2.returncode == 0  # nothing in flight: drained at once


async def test_drain_timeout_says_what_remains(tmp_path: Path,
                                               client: aiohttp.ClientSession) -> None:
    with running(tmp_path, base_config(tmp_path, [gated("svc")])) as d:
        d.wait_state("svc", "ready")
        url = gate_url(d, "svc")
        slow = [asyncio.create_task(stream(client, url, tokens=30, delay=0.1)) for _ in range(3)]
        await async_wait_until(lambda: status(d, "svc")["inflight"] == 3, 10, what="3 in flight")
        r = await asyncio.get_running_loop().run_in_executor(
            None, lambda: d.llmctl("drain", "svc", "--timeout", "0.3"))
        assert r.returncode == 1 and "svc 3 requests" in r.stderr
        await asyncio.gather(*slow)


async def test_admission_limit_queue_and_429(tmp_path: Path,
                                             client: aiohttp.ClientSession) -> None:
    svc = gated("svc", max_concurrency=2, max_queue=2, queue_timeout_s=0.6)
    with running(tmp_path, base_config(tmp_path, [svc])) as d:
        d.wait_state("svc", "ready")
        url = gate_url(d, "svc")
        running_ = [asyncio.create_task(stream(client, url, tokens=10, delay=0.1))
                    for _ in range(2)]
        await async_wait_until(lambda: status(d, "svc")["inflight"] == 2, 5, what="2 running")
        queued = [asyncio.create_task(stream(client, url, tokens=1)) for _ in range(2)]
        await async_wait_until(lambda: status(d, "svc")["queued"] == 2, 5, what="2 queued")
        code, lines, _t = await stream(client, url)
        assert code == 429
        assert json.loads(lines[0])["error"]["code"] == "queue_full"
        # the queue's deadline (0.6 s) passes before the running requests end (1 s)
        results = await asyncio.gather(*queued)
        assert [c for c, _l, _t in results] == [429, 429]
        assert all(json.loads(lines[0])["error"]["code"] == "queue_timeout"
                   for _c, lines, _t in results)
        assert all(c == 200 for c, _l, _t in await asyncio.gather(*running_))
        # a queued request that gets a slot in time runs
        running_ = [asyncio.create_task(stream(client, url, tokens=3, delay=0.1))
                    for _ in range(2)]
        await async_wait_until(lambda: status(d, "svc")["inflight"] == 2, 5, what="2 running")
        code, lines, _t = await stream(client, url, tokens=2)
        assert code == 200 and lines[-1] == "[DONE]"
        await asyncio.gather(*running_)
        await async_wait_until(lambda: status(d, "svc")["inflight"] == 0, 5, what="accounted")
        text = await (await client.get(f"http://{d.doc['metrics']['listen']}/metrics")).text()
        assert 'llm_supervisor_gate_rejected_total{reason="queue_full",service="svc"} 1.0' in text
        assert 'llm_supervisor_gate_rejected_total{reason="queue_timeout",service="svc"} 2.0' \
            in text
        assert 'llm_supervisor_gate_requests_total{code="429",service="svc"} 3.0' in text
        assert "llm_supervisor_gate_time_to_first_byte_seconds_bucket" in text
        assert 'llm_supervisor_gate_inflight_requests{service="svc"} 0.0' in text


async def test_backend_dies_mid_stream(tmp_path: Path, client: aiohttp.ClientSession) -> None:
    with running(tmp_path, base_config(tmp_path, [gated("svc")])) as d:
        d.wait_state("svc", "ready")
        code, lines, _t = await stream(client, gate_url(d, "svc"), tokens=10, delay=0.02,
                                       fake_die_after=3)
        assert code == 200 and len(lines) == 4  # three chunks, then the gate's error event
        assert json.loads(lines[-1])["error"]["code"] == "upstream_cut"
        await async_wait_until(lambda: status(d, "svc")["inflight"] == 0, 5, what="accounted")
        # the crash is seen by the supervisor, the gate closes and reopens with the restart
        await async_wait_until(lambda: (s := status(d, "svc"))["restarts"] == 1
                               and s["state"] == "ready", 20, what="restarted")
        plain = await client.post(f"{gate_url(d, 'svc')}/v1/chat/completions",
                                  json={"max_tokens": 10, "fake_die_after": 0, "stream": True})
        assert plain.status in (200, 502)
        await plain.read()
        await async_wait_until(lambda: status(d, "svc")["inflight"] == 0, 5, what="accounted")


async def test_client_disconnect_cancels_upstream(tmp_path: Path,
                                                  client: aiohttp.ClientSession) -> None:
    with running(tmp_path, base_config(tmp_path, [gated("svc")])) as d:
        d.wait_state("svc", "ready")
        port = d.doc["service"][0]["port"]
        body = {"stream": True, "max_tokens": 100, "fake_token_delay_s": 0.1}
        r = await client.post(f"{gate_url(d, 'svc')}/v1/chat/completions", json=body)
        await r.content.readline()
        assert status(d, "svc")["inflight"] == 1
        r.close()  # the client goes away mid-stream

        async def aborted() -> bool:
            async with client.get(f"http://127.0.0.1:{port}/_stats") as resp:
                stats = await resp.json()
            return bool(stats["streams_aborted"] == 1 and stats["streams_active"] == 0)

        await async_wait_until(aborted, 5, what="the backend stopped generating")
        await async_wait_until(lambda: status(d, "svc")["inflight"] == 0, 5, what="accounted")


async def test_closed_while_not_ready_and_failover(tmp_path: Path,
                                                   client: aiohttp.ClientSession) -> None:
    primary = gated("primary", backup="spare")
    spare = gated("spare")
    with running(tmp_path, base_config(tmp_path, [primary, spare])) as d:
        d.wait_state("primary", "ready")
        d.wait_state("spare", "ready")
        url = gate_url(d, "primary")

        async def served_by() -> str:
            async with client.get(f"{url}/echo") as r:
                assert r.status == 200
                return r.headers["X-Backend-Port"]

        assert await served_by() == str(primary["port"])
        assert d.llmctl("stop", "primary").returncode == 0
        assert await served_by() == str(spare["port"])  # failover
        assert d.llmctl("drain", "spare").returncode == 0  # a drained backup takes nothing new
        async with client.get(f"{url}/echo") as r:
            assert r.status == 503, r.headers
        assert d.llmctl("resume", "spare").returncode == 0
        await async_wait_until(lambda: status(d, "spare")["state"] == "ready", 5, what="ready")
        assert await served_by() == str(spare["port"])
        assert d.llmctl("stop", "spare").returncode == 0
        async with client.get(f"{url}/echo") as r:  # neither ready: closed
            assert r.status == 503 and r.headers["Retry-After"] == "5"
            assert (await r.json())["error"]["code"] == "closed"
        assert status(d, "primary")["gate"] == "closed"
        assert d.llmctl("start", "primary").returncode == 0
        d.wait_state("primary", "ready")
        await async_wait_until(lambda: status(d, "primary")["gate"] == "open", 5, what="open")
        assert await served_by() == str(primary["port"])


async def test_graceful_stop_drains_first(tmp_path: Path, client: aiohttp.ClientSession) -> None:
    with running(tmp_path, base_config(tmp_path, [gated("svc")])) as d:
        d.wait_state("svc", "ready")
        long = asyncio.create_task(stream(client, gate_url(d, "svc"), tokens=15, delay=0.1))
        await async_wait_until(lambda: status(d, "svc")["inflight"] == 1, 5, what="in flight")
        d.signal(signal.SIGTERM)
        code, lines, _t = await long
        assert code == 200 and lines[-1] == "[DONE]"
        assert await asyncio.get_running_loop().run_in_executor(None, d.wait, 20) == 0


async def test_swap_under_load_loses_nothing(tmp_path: Path,
                                             client: aiohttp.ClientSession) -> None:
    svc = gated("svc", swap_port=free_port())
    with running(tmp_path, base_config(tmp_path, [svc])) as d:
        d.wait_state("svc", "ready")
        url = gate_url(d, "svc")
        old_pid = status(d, "svc")["pid"]
        stop = asyncio.Event()
        results: list[Stream] = []

        async def user() -> None:
            while not stop.is_set():
                results.append(await stream(client, url, tokens=8, delay=0.03))

        users = [asyncio.create_task(user()) for _ in range(32)]
        await async_wait_until(lambda: len(results) >= 32, 20, what="load running")
        r = await asyncio.get_running_loop().run_in_executor(None, d.llmctl, "swap", "svc")
        assert r.returncode == 0, r.stderr
        assert f"port {svc['port']} -> {svc['gate']['swap_port']}" in r.stdout
        after = len(results)
        await async_wait_until(lambda: len(results) >= after + 32, 20, what="load after swap")
        stop.set()
        await asyncio.gather(*users)
        failed = [x for x in results if x[0] != 200 or x[1][-1] != "[DONE]"]
        assert not failed, failed[:3]
        new = status(d, "svc")
        assert new["port"] == svc["gate"]["swap_port"] and new["pid"] != old_pid
        assert new["state"] == "ready"
        # and back: instances alternate between port and swap_port
        r = await asyncio.get_running_loop().run_in_executor(None, d.llmctl, "swap", "svc")
        assert r.returncode == 0 and status(d, "svc")["port"] == svc["port"]


async def test_reload_of_a_gated_service_swaps(tmp_path: Path,
                                               client: aiohttp.ClientSession) -> None:
    svc = gated("svc")
    doc = base_config(tmp_path, [svc])
    with running(tmp_path, doc) as d:
        d.wait_state("svc", "ready")
        url = gate_url(d, "svc")
        long = asyncio.create_task(stream(client, url, tokens=20, delay=0.05))
        await async_wait_until(lambda: status(d, "svc")["inflight"] == 1, 5, what="in flight")
        doc["service"][0]["env"] = {"NEW": "1"}
        d.write(doc)
        r = await asyncio.get_running_loop().run_in_executor(None, d.llmctl, "--json", "reload")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["swapped"] == ["svc"]
        code, lines, _t = await long
        assert code == 200 and lines[-1] == "[DONE]"  # the old instance finished it
        assert status(d, "svc")["port"] != svc["port"]
        r2 = d.llmctl("swap", "nope")
        assert r2.returncode == 1 and "no service named" in r2.stderr


async def test_limit_changes_at_run_time(tmp_path: Path, client: aiohttp.ClientSession) -> None:
    """In-process: the admission limit can be lowered and raised (the thermal policy
    throttles through it); raising it admits queued requests at once."""
    import subprocess
    import sys

    from helpers import FAKE
    from supervisord_llm.config import GateSection, parse_listen
    from supervisord_llm.gate import GateHost

    port = free_port()
    backend = subprocess.Popen([sys.executable, FAKE, "--port", str(port)])
    host = GateHost()
    try:
        listen = parse_listen(f"127.0.0.1:{free_port()}")
        gate = await host.add("svc", GateSection(listen, max_concurrency=4, max_queue=10,
                                                 queue_timeout_s=10))
        host.call(gate.set_upstreams, ("127.0.0.1", port), None)
        url = f"http://{listen}"

        async def up() -> bool:
            try:
                async with client.get(f"{url}/v1/models") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await async_wait_until(up, 10, what="backend up")
        host.call(gate.set_limit_factor, 0.25)
        tasks = [asyncio.create_task(stream(client, url, tokens=10, delay=0.1))
                 for _ in range(4)]
        await async_wait_until(lambda: gate.inflight == 1 and gate.queued == 3, 5,
                               what="one admitted, three queued")
        host.call(gate.set_limit_factor, 1.0)
        await async_wait_until(lambda: gate.inflight == 4 and gate.queued == 0, 2,
                               what="all admitted once the limit is raised")
        assert all(code == 200 for code, _l, _t in await asyncio.gather(*tasks))
        await async_wait_until(lambda: gate.inflight == 0, 5, what="accounted")
    finally:
        await host.close()
        backend.terminate()
        backend.wait()


async def test_reload_adds_removes_and_reconfigures_gates(
        tmp_path: Path, client: aiohttp.ClientSession) -> None:
    one, two = gated("one", max_concurrency=4), gated("two")
    doc = base_config(tmp_path, [one, two])
    with running(tmp_path, doc) as d:
        d.wait_state("one", "ready")
        d.wait_state("two", "ready")
        one_pid = status(d, "one")["pid"]
        doc["service"][0]["gate"]["max_concurrency"] = 9  # limits only: applied live
        moved, old_listen = f"127.0.0.1:{free_port()}", two["gate"]["listen"]
        doc["service"][1]["gate"]["listen"] = moved  # a new address: bound again
        three = gated("three")
        doc["service"].append(three)
        d.write(doc)
        r = await asyncio.get_running_loop().run_in_executor(None, d.llmctl, "--json", "reload")
        assert r.returncode == 0, r.stderr
        assert status(d, "one")["max_concurrency"] == 9 and status(d, "one")["pid"] == one_pid
        d.wait_state("three", "ready")
        await async_wait_until(lambda: status(d, "three")["gate"] == "open", 5, what="open")
        for listen in (moved, three["gate"]["listen"]):
            async with client.get(f"http://{listen}/v1/models") as resp:
                assert resp.status == 200
        with pytest.raises(aiohttp.ClientConnectionError):
            await client.get(f"http://{old_listen}/v1/models")
        del doc["service"][2]
        d.write(doc)
        assert (await asyncio.get_running_loop().run_in_executor(
            None, d.llmctl, "reload")).returncode == 0
        with pytest.raises(aiohttp.ClientConnectionError):
            await client.get(f"http://{three['gate']['listen']}/v1/models")
