"""The host actor with the daemon as a real process: a stop pre-empts a swap in progress,
concurrent operations on one service are refused, no instance exists outside what `status`
shows; holds, drain reasons and the limit factor; the mode everywhere it is shown."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

import helpers
from helpers import (
    FAKE,
    Daemon,
    NotifyListener,
    alive,
    async_wait_until,
    base_config,
    fake_service,
    free_port,
    running,
    wait_until,
)
from supervisord_llm.config import GateSection, parse_listen
from supervisord_llm.gate import GateHost

TAG = f"LLM_SUPERVISOR_TEST_TAG={os.getpid()}-{time.monotonic_ns()}"


def gated(name: str, *knobs: str, **gate: Any) -> dict[str, Any]:
    key, value = TAG.split("=")
    return helpers.gated(name, *knobs, service={"health": {"startup_timeout_s": 120},
                                                "env": {key: value}},
                         **{"max_concurrency": 64, "drain_timeout_s": 5, **gate})


def processes_of(service: str) -> list[int]:
    """Live processes of this test run whose environment carries the launch marker of
    `service` (other daemons on this machine may run services of the same name); not the
    keepers, which carry it too."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            env = Path(f"/proc/{name}/environ").read_bytes()
            if b"_keeper" in Path(f"/proc/{name}/cmdline").read_bytes():
                continue
        except OSError:
            continue
        if f"LLM_SUPERVISOR_SERVICE={service}\0".encode() in env and TAG.encode() in env \
                and alive(int(name)):
            out.append(int(name))
    return out


def test_sigterm_preempts_a_swap_in_progress(tmp_path: Path) -> None:
    """SIGHUP with a change that hot-swaps a gated service whose replacement loads for
    minutes, then SIGTERM: the daemon stops within its stop timeouts, the replacement too."""
    doc = base_config(tmp_path, [gated("chat")])
    with running(tmp_path, doc) as d:
        d.wait_state("chat", "ready")
        doc["service"][0]["command"] += ["--load-s", "600"]  # the replacement loads "for ever"
        d.write(doc)
        d.signal(signal.SIGHUP)
        swap = wait_until(lambda: d.service("chat").get("swap"), 10, what="swap in progress")
        assert swap["role"] == "replacement" and swap["state"] == "starting"
        status = d.status()
        assert any("reload" in op for op in status["supervisor"]["operations"])
        wait_until(lambda: (s := d.service("chat").get("swap")) and s["pid"], 5,
                   what="replacement launched")
        replacement = d.service("chat")["swap"]["pid"]
        old = d.service("chat")["pid"]
        assert alive(replacement) and alive(old)
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 0
        took = time.monotonic() - t0
        assert took < 2 * 2 + 5 + 5, took  # two stop timeouts and the graces, not 120 s
        assert not alive(replacement) and not alive(old)
        assert "hot swap abandoned" in d.logtext()
    assert processes_of("chat") == []


def test_two_swaps_at_once_one_is_refused(tmp_path: Path) -> None:
    doc = base_config(tmp_path, [gated("chat", "--load-s", "1")])
    with running(tmp_path, doc) as d:
        d.wait_state("chat", "ready", 20)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(d.llmctl, "swap", "chat")
            wait_until(lambda: d.service("chat").get("swap"), 10, what="first swap running")
            second = pool.submit(d.llmctl, "swap", "chat")
            r1, r2 = first.result(60), second.result(60)
        assert r1.returncode == 0, r1.stderr
        assert r2.returncode == 1 and "swap of chat" in r2.stderr \
            and "in progress" in r2.stderr, r2.stderr
        # one instance, the one status shows; nothing else of chat is alive
        svc = d.service("chat")
        assert "swap" not in svc and svc["state"] == "ready"
        wait_until(lambda: processes_of("chat") == [svc["pid"]], 10,
                   what=f"only {svc['pid']} left (have {processes_of('chat')})")
        # a stop of a service being swapped is refused too, with the reason
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            swap = pool.submit(d.llmctl, "swap", "chat")
            wait_until(lambda: d.service("chat").get("swap"), 10, what="swap running")
            r = d.llmctl("stop", "chat")
            assert r.returncode == 1 and "swap of chat" in r.stderr
            assert swap.result(60).returncode == 0


def test_holds_and_messages_of_a_closed_gate(tmp_path: Path) -> None:
    svc = gated("chat")
    with running(tmp_path, base_config(tmp_path, [svc])) as d:
        d.wait_state("chat", "ready")
        r = d.llmctl("restart", "chat")
        assert r.returncode == 0 and "chat: ready (gate open, 0 in flight)" in r.stdout, r.stdout
        assert d.llmctl("stop", "chat").returncode == 0
        s = d.service("chat")
        assert s["holds"] == ["operator"] and s["desired"] == "down" and s["gate"] == "closed"
        assert "held: operator" in d.llmctl("status").stdout
        url = f"http://{svc['gate']['listen']}/v1/models"
        try:
            urllib.request.urlopen(url, timeout=5)
            raise AssertionError("a stopped service answered")
        except urllib.error.HTTPError as e:
            body = json.loads(e.read())
            assert e.code == 503 and body["error"]["message"] == "chat is stopped"
        assert d.llmctl("start", "chat").returncode == 0
        s = d.wait_state("chat", "ready")
        assert s["holds"] == [] and s["desired"] == "up"


def test_drain_reasons_and_limit_factor_survive(tmp_path: Path) -> None:
    """In process: a gate closed for two reasons stays closed until both are gone; `resume`
    (the operator's) removes only the operator's; a reload's reconfigure keeps the reasons and
    the factor."""

    async def scenario() -> None:
        port = free_port()
        backend = subprocess.Popen([sys.executable, FAKE, "--port", str(port)])
        host = GateHost()
        try:
            listen = parse_listen(f"127.0.0.1:{free_port()}")
            cfg = GateSection(listen, max_concurrency=8)
            gate = await host.add("svc", cfg)
            await host.run(gate.set_upstreams, ("127.0.0.1", port), None)
            assert gate.state == "open"
            await host.run(gate.drain, "thermal")
            await host.run(gate.drain, "operator")
            await host.run(gate.resume, "operator")
            assert gate.state == "draining" and gate.drains == {"thermal"}
            await host.run(gate.set_limit_factor, 0.5)
            assert gate.limit == 4
            await host.run(gate.reconfigure, GateSection(listen, max_concurrency=16))
            assert gate.limit == 8 and gate.drains == {"thermal"}
            await host.run(gate.resume, "thermal")
            assert gate.state == "open"
            async with aiohttp.ClientSession() as client:

                async def up() -> bool:
                    try:
                        async with client.get(f"http://{listen}/v1/models") as r:
                            return r.status == 200
                    except aiohttp.ClientError:
                        return False

                await async_wait_until(up, 10, what="serving")
        finally:
            await host.close()
            backend.terminate()
            backend.wait()

    asyncio.run(scenario())


def test_mode_in_status_status_line_and_metrics(tmp_path: Path) -> None:
    sock = tmp_path / "notify.sock"
    listener = NotifyListener(sock)
    doc = base_config(tmp_path, [fake_service("a", free_port(), stop={"timeout_s": 5})])
    d = Daemon(tmp_path, doc, env={"NOTIFY_SOCKET": str(sock)}).start()
    try:
        d.wait_state("a", "ready")
        assert d.status()["supervisor"]["mode"] == "normal"
        with urllib.request.urlopen(f"http://{doc['metrics']['listen']}/metrics",
                                    timeout=5) as r:
            text = r.read().decode()
        for mode in ("normal", "throttled", "on_battery", "powering_down", "powered_down",
                     "shutting_down"):
            value = "1.0" if mode == "normal" else "0.0"
            assert f'llm_supervisor_mode{{mode="{mode}"}} {value}' in text
        assert "llm_supervisor_log_lines_dropped_total 0.0" in text
        assert "llm_supervisor_sd_notify_dropped_total 0.0" in text
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 0
        wait_until(lambda: any("shutting_down" in m for _t, m in listener.messages), 5,
                   what="STATUS= with the mode")
        assert "mode normal -> shutting_down" in d.logtext()
    finally:
        d.stop()
        listener.close()


def test_what_an_attack_on_the_host_found(tmp_path: Path) -> None:
    """A swap onto a port a stranger holds is refused and the old instance keeps serving; a
    start during a stop is not lost; a reload keeps the operator's hold (and says so); a
    reload that would put a service on a port a swapped instance holds, or that has no
    service at all, is refused; a SIGHUP during a swap is applied after it."""
    stranger_port = free_port()
    chat = gated("chat", swap_port=stranger_port)
    emb = fake_service("emb", free_port(), "--ignore-term", stop={"timeout_s": 1})
    doc = base_config(tmp_path, [chat, emb])
    stranger = subprocess.Popen([sys.executable, FAKE, "--port", str(stranger_port)])
    try:
        with running(tmp_path, doc) as d:
            d.wait_state("chat", "ready")
            d.wait_state("emb", "ready")
            wait_until(lambda: not _port_free(stranger_port), 10, what="the stranger listens")
            old = d.service("chat")
            r = d.llmctl("swap", "chat")
            assert r.returncode == 1 and f"port {stranger_port}" in r.stderr \
                and "in use by another process" in r.stderr, r.stderr
            assert d.service("chat")["pid"] == old["pid"] and processes_of("chat") == [
                old["pid"]]
            # a start while the stop is still running (SIGTERM ignored: SIGKILL after 1 s)
            assert d.llmctl("stop", "emb", "--no-wait").returncode == 0
            wait_until(lambda: d.service("emb")["state"] == "stopping", 5, what="stopping")
            assert d.llmctl("start", "emb").returncode == 0
            d.wait_state("emb", "ready", 15)
            # a reload keeps the operator's hold on a changed service
            assert d.llmctl("stop", "emb").returncode == 0
            doc["service"][1]["env"] = {"CHANGED": "1"}
            d.write(doc)
            r = d.llmctl("--json", "reload")
            assert r.returncode == 0, r.stderr
            res = json.loads(r.stdout)
            assert res["updated"] == ["emb"] and res["restarted"] == []
            s = d.service("emb")
            assert s["state"] == "stopped" and s["holds"] == ["operator"]
            # an empty file is not "stop everything"
            d.config.write_text("")
            r = d.llmctl("reload")
            assert r.returncode == 1 and "no [[service]]" in r.stderr
            assert d.service("chat")["state"] == "ready"
            # a reload onto the port a hot swap moved chat to
            doc["service"][0]["gate"].pop("swap_port")
            d.write(doc)
            stranger.terminate()
            stranger.wait()
            assert d.llmctl("reload").returncode == 0
            assert d.llmctl("swap", "chat").returncode == 0
            moved = d.service("chat")["port"]
            assert moved != chat["port"]
            doc["service"].append(fake_service("new", moved))
            d.write(doc)
            r = d.llmctl("reload")
            assert r.returncode == 1 and f"port {moved} is in use by chat" in r.stderr, r.stderr
            # a SIGHUP while a swap runs is applied once the swap is over
            doc["service"].pop()
            doc["service"][1]["env"] = {"CHANGED": "2"}
            d.write(doc)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                swap = pool.submit(d.llmctl, "swap", "chat")
                wait_until(lambda: d.service("chat").get("swap"), 10, what="swap running")
                d.signal(signal.SIGHUP)
                assert swap.result(60).returncode == 0
            wait_until(lambda: "updated (no restart) emb" in d.logtext(), 20,
                       what="the SIGHUP's reload, after the swap")
    finally:
        stranger.kill()
        stranger.wait()


def _port_free(port: int) -> bool:
    from supervisord_llm.ports import port_free

    return port_free(port)


async def test_stop_of_a_gated_service_lets_requests_finish(tmp_path: Path) -> None:
    svc = gated("chat")
    with running(tmp_path, base_config(tmp_path, [svc])) as d:
        d.wait_state("chat", "ready")
        url = f"http://{svc['gate']['listen']}/v1/chat/completions"
        body = {"stream": True, "max_tokens": 10, "fake_token_delay_s": 0.1}
        async with aiohttp.ClientSession() as client:
            async with client.post(url, json=body) as r:
                first = await r.content.readline()
                stop = asyncio.get_running_loop().run_in_executor(None, d.llmctl, "stop",
                                                                  "chat")
                rest = await r.read()
            assert first.startswith(b"data: ") and rest.rstrip().endswith(b"data: [DONE]")
        assert (await stop).returncode == 0
        s = d.service("chat")
        assert s["state"] == "stopped" and s["gate"] == "closed" and s["drain_reasons"] == []


def test_a_reload_that_cannot_move_a_gate_keeps_it(tmp_path: Path) -> None:
    svc = gated("chat")
    doc = base_config(tmp_path, [svc])
    taken = free_port()
    with running(tmp_path, doc) as d, socket_listening(taken):
        d.wait_state("chat", "ready")
        old = svc["gate"]["listen"]
        doc["service"][0]["gate"]["listen"] = f"127.0.0.1:{taken}"
        d.write(doc)
        r = d.llmctl("reload")
        assert r.returncode == 1 and f"127.0.0.1:{taken} is in use" in r.stderr, r.stderr
        with urllib.request.urlopen(f"http://{old}/v1/models", timeout=5) as resp:
            assert resp.status == 200  # still served where it was
        assert d.service("chat")["gate"] == "open"
        moved = f"127.0.0.1:{free_port()}"
        doc["service"][0]["gate"]["listen"] = moved
        d.write(doc)
        assert d.llmctl("reload").returncode == 0
        with urllib.request.urlopen(f"http://{moved}/v1/models", timeout=5) as resp:
            assert resp.status == 200


class socket_listening:
    """A stranger listening on `port` while the block runs."""

    def __init__(self, port: int) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(1)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
