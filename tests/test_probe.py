"""Generation probes end to end: a real daemon, fake model servers whose completions can hang
while /health stays 200."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from helpers import (
    async_stays,
    async_wait_until,
    base_config,
    fake_service,
    free_port,
    running,
    wait_until,
)


def backend(port: int, path: str, **query: str) -> Any:
    url = f"http://127.0.0.1:{port}{path}"
    if query:
        url += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    req = urllib.request.Request(url, method="POST" if path == "/_ctl" else "GET")  # noqa: S310 - loopback
    with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310 - loopback
        return json.loads(r.read())


PROBE = {"kind": "completion", "interval_s": 0.5, "timeout_s": 0.5, "failures": 2}


def test_a_wedged_engine_without_a_gate_is_restarted_as_hung(tmp_path: Path) -> None:
    svc = fake_service("gen", free_port(), probe=PROBE)
    doc = base_config(tmp_path, [svc], gpus=1)
    with running(tmp_path, doc) as d:
        st = d.wait_state("gen", "ready")
        wait_until(lambda: d.service("gen")["probe"]["probes"] >= 2, 5, what="probes")
        assert d.service("gen")["probe"]["failures"] == 0
        backend(st["port"], "/_ctl", gen_hang="1")
        pid = st["pid"]
        wait_until(lambda: d.service("gen")["pid"] not in (None, pid), 10, what="restarted")
        d.wait_state("gen", "ready", 10)
        assert d.service("gen")["restarts"] >= 1
        assert "gen: hung: no answer to POST /v1/completions within 0.5 s" in d.logtext()
        with urllib.request.urlopen(f"http://{doc['metrics']['listen']}/metrics",
                                    timeout=5) as r:
            text = r.read().decode()
        assert 'llm_supervisor_service_restarts_total{reason="hung",service="gen"} 1.0' in text
        assert 'llm_supervisor_service_probes_total{result="failed",service="gen"} 2.0' in text


async def test_a_wedged_engine_behind_a_gate_is_hot_swapped_without_losing_a_request(
        tmp_path: Path) -> None:
    svc = fake_service("chat", free_port(), probe=PROBE,
                       gate={"listen": f"127.0.0.1:{free_port()}", "max_concurrency": 8})
    url = f"http://{svc['gate']['listen']}/v1/chat/completions"
    with running(tmp_path, base_config(tmp_path, [svc], gpus=1)) as d:
        st = d.wait_state("chat", "ready")
        async with aiohttp.ClientSession() as client:
            async def stream() -> tuple[int, bytes]:
                body = {"stream": True, "max_tokens": 40, "fake_token_delay_s": 0.05}
                async with client.post(url, json=body) as r:
                    return r.status, await r.read()

            running_stream = asyncio.ensure_future(stream())
            await async_wait_until(lambda: d.service("chat")["inflight"] == 1, 5,
                                   what="a stream in flight")
            # the streams in flight keep going; new completions hang: the probe finds it
            backend(st["port"], "/_ctl", gen_hang="1")
            status, body = await running_stream
            assert status == 200 and body.rstrip().endswith(b"data: [DONE]")
            await async_wait_until(lambda: d.service("chat")["port"] != st["port"], 15,
                                   what="swapped to a new instance")
            await async_wait_until(lambda: d.service("chat")["state"] == "ready", 10,
                                   what="the new one ready")
            status, body = await stream()
            assert status == 200 and body.rstrip().endswith(b"data: [DONE]")
        assert "chat: hung:" in d.logtext() and "hot swap" in d.logtext()


async def test_no_probe_while_the_gate_sees_traffic(tmp_path: Path) -> None:
    svc = fake_service("chat", free_port(), probe={**PROBE, "interval_s": 1.0},
                       gate={"listen": f"127.0.0.1:{free_port()}", "max_concurrency": 8})
    url = f"http://{svc['gate']['listen']}/v1/chat/completions"
    with running(tmp_path, base_config(tmp_path, [svc], gpus=1)) as d:
        st = d.wait_state("chat", "ready")
        async with aiohttp.ClientSession() as client:
            await async_wait_until(lambda: backend(st["port"], "/_stats")["probes"] >= 1, 5,
                                   what="a first probe while idle")
            before = backend(st["port"], "/_stats")["probes"]
            loop = asyncio.get_running_loop()
            end = loop.time() + 4.0
            while loop.time() < end:  # a request every 0.3 s for 4 s
                async with client.post(url, json={"max_tokens": 2}) as r:
                    assert r.status == 200
                    await r.read()
                await asyncio.sleep(0.3)
            assert backend(st["port"], "/_stats")["probes"] == before


async def test_stalled_requests_then_a_failed_probe_is_hung_and_swapped(tmp_path: Path) -> None:
    """No [service.probe]: the gate's stall detection alone. Every request in flight silent
    for stall_timeout_s, then one probe that fails: hung, hot-swapped; the gate serves again."""
    svc = fake_service("chat", free_port(),
                       gate={"listen": f"127.0.0.1:{free_port()}", "max_concurrency": 8,
                             "stall_timeout_s": 1, "drain_timeout_s": 1})
    url = f"http://{svc['gate']['listen']}/v1/chat/completions"
    with running(tmp_path, base_config(tmp_path, [svc], gpus=1)) as d:
        st = d.wait_state("chat", "ready")
        backend(st["port"], "/_ctl", gen_hang="1")
        async with aiohttp.ClientSession() as client:
            async def ask() -> int:
                try:
                    async with client.post(url, json={"max_tokens": 2}) as r:
                        await r.read()
                        return r.status
                except aiohttp.ClientError:
                    return -1

            stuck = asyncio.ensure_future(ask())  # waits on the wedged engine
            await async_wait_until(lambda: d.service("chat")["port"] != st["port"], 20,
                                   what="swapped after the stall")
            await async_wait_until(lambda: d.service("chat")["state"] == "ready", 10,
                                   what="the new one ready")
            assert await ask() == 200
            stuck.cancel()
        text = d.logtext()
        assert "every request in flight has had nothing from the server" in text
        assert "chat: hung: requests stalled, and then no answer" in text


async def test_a_client_that_does_not_read_is_not_a_stall(tmp_path: Path) -> None:
    svc = fake_service("chat", free_port(),
                       gate={"listen": f"127.0.0.1:{free_port()}", "max_concurrency": 8,
                             "stall_timeout_s": 1})
    host, port = svc["gate"]["listen"].split(":")
    with running(tmp_path, base_config(tmp_path, [svc], gpus=1)) as d:
        st = d.wait_state("chat", "ready")
        body = json.dumps({"stream": True, "max_tokens": 400, "fake_chunk_bytes": 65536})
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     f"application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        await writer.drain()
        await reader.read(1024)  # the head, then nothing read for 4 s: 26 MB wait upstream
        await async_stays(lambda: d.service("chat")["pid"] == st["pid"]
                          and "has had nothing from the server" not in d.logtext(), 4,
                          "a client that does not read is no stall")
        assert backend(st["port"], "/_stats")["probes"] == 0
        writer.close()  # and closed now, not when this loop next runs: the daemon's stop
        await writer.wait_closed()  # would wait for the request (the loop blocked in it)


async def test_the_gate_measures_time_to_first_token_and_events_per_second(
        tmp_path: Path) -> None:
    svc = fake_service("chat", free_port(),
                       gate={"listen": f"127.0.0.1:{free_port()}", "max_concurrency": 8})
    doc = base_config(tmp_path, [svc], gpus=1)
    url = f"http://{svc['gate']['listen']}/v1/chat/completions"
    with running(tmp_path, doc) as d:
        d.wait_state("chat", "ready")
        lines: dict[str, float] = {}
        ttft_count = 'llm_supervisor_gate_time_to_first_token_seconds_count{service="chat"}'
        rate_count = 'llm_supervisor_gate_stream_events_per_second_count{service="chat"}'
        async with aiohttp.ClientSession() as client:
            for _ in range(3):  # 20 events 0.02 s apart: about 50 events/s
                body = {"stream": True, "max_tokens": 20, "fake_token_delay_s": 0.02}
                async with client.post(url, json=body) as r:
                    assert r.status == 200
                    await r.read()

            async def counted() -> bool:
                # the gate observes a stream once its last byte is written (on the gate's
                # thread): a scrape at once may come before the third observation
                async with client.get(f"http://{doc['metrics']['listen']}/metrics") as r:
                    text = await r.text()
                lines.clear()
                lines.update({line.split(" ")[0]: float(line.split(" ")[1])
                              for line in text.splitlines()
                              if line.startswith("llm_supervisor_gate_")
                              and not line.startswith("#")})
                return lines.get(ttft_count) == 3 and lines.get(rate_count) == 3

            await async_wait_until(counted, 10, what="3 streams in the gate's metrics")
    assert lines[ttft_count] == 3 and lines[rate_count] == 3
    rate = lines['llm_supervisor_gate_stream_events_per_second_sum{service="chat"}'] / 3
    # 21 events (with [DONE]) over 19-20 gaps of 0.02 s and more: never faster than the server
    # sends them; slower on a loaded machine (the server's timer late), and a rate per
    # millisecond or over the whole request would be far off
    assert 5 < rate < 60, rate
    assert lines['llm_supervisor_gate_stream_events_per_second_bucket{le="75.0",service="chat"}'] \
        == 3


async def test_no_interval_probe_while_a_request_thinks_silently(tmp_path: Path) -> None:
    """A request in flight that has had nothing from the server yet (a long prompt on one
    slot): the interval probe waits; that is the stall check's to judge."""
    svc = fake_service("chat", free_port(), probe={**PROBE, "interval_s": 0.5},
                       gate={"listen": f"127.0.0.1:{free_port()}", "max_concurrency": 8})
    url = f"http://{svc['gate']['listen']}/v1/chat/completions"
    with running(tmp_path, base_config(tmp_path, [svc], gpus=1)) as d:
        st = d.wait_state("chat", "ready")
        await async_wait_until(lambda: backend(st["port"], "/_stats")["probes"] >= 1, 5,
                               what="a probe while idle")
        async with aiohttp.ClientSession() as client:
            # not streamed: 30 tokens x 0.1 s, nothing from the server for 3 s
            body = {"max_tokens": 30, "fake_token_delay_s": 0.1}
            task = asyncio.ensure_future(client.post(url, json=body))
            await async_wait_until(lambda: d.service("chat")["inflight"] == 1, 5,
                                   what="in flight")
            before = backend(st["port"], "/_stats")["probes"]
            async with await task as r:
                assert r.status == 200
                await r.read()
            assert backend(st["port"], "/_stats")["probes"] == before
        assert d.service("chat")["pid"] == st["pid"]


async def test_gets_and_retries_through_the_gate_do_not_hide_a_wedged_engine(
        tmp_path: Path) -> None:
    """GET /v1/models through the gate is no generation, and clients that give up and retry
    are no progress: the stall check still finds the wedged engine, and it is swapped."""
    svc = fake_service("chat", free_port(), probe=PROBE,
                       gate={"listen": f"127.0.0.1:{free_port()}", "max_concurrency": 8,
                             "stall_timeout_s": 1, "drain_timeout_s": 1})
    base = f"http://{svc['gate']['listen']}"
    with running(tmp_path, base_config(tmp_path, [svc], gpus=1)) as d:
        st = d.wait_state("chat", "ready")
        backend(st["port"], "/_ctl", gen_hang="1")
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as client:
            async def poll() -> None:
                while not stop.is_set():
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with client.get(base + "/v1/models") as r:
                            await r.read()
                    await asyncio.sleep(0.3)

            async def retry() -> None:
                while not stop.is_set():
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with asyncio.timeout(0.6), client.post(
                                base + "/v1/chat/completions", json={"max_tokens": 2}) as r:
                            await r.read()

            tasks = [asyncio.ensure_future(f()) for f in (poll, retry, retry)]
            try:
                await async_wait_until(lambda: d.service("chat")["port"] != st["port"], 20,
                                       what="swapped despite the GETs and the retries")
            finally:
                stop.set()
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
