"""One endpoint for every model, end to end: real llama-server processes on three generated
tiny models (different sizes), on demand behind the router, on one simulated GPU with a small
memory total, so that they swap."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_llama_e2e import llama
from test_router import GIB, Client, metrics_text, states

from helpers import Daemon, base_config, free_port, make_tiny_model, running, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("gguf")
    return {
        "coder": make_tiny_model(tmp / "coder.gguf"),
        "chat": make_tiny_model(tmp / "chat.gguf", "--embd", "96", "--layers", "3"),
        "mini": make_tiny_model(tmp / "mini.gguf", "--embd", "32", "--layers", "1"),
    }


def on_demand(name: str, model: Path, vram: float, **extra: Any) -> dict[str, Any]:
    # a victim as soon as another needs the room: the tests swap them one request apart
    return llama(name, model, gpus=[0], start="on-demand", vram_gb=vram,
                 models=[f"{name}-model"], min_residency_s=0, **extra)


@pytest.fixture
def box(tmp_path: Path, models: dict[str, Path]) -> Iterator[tuple[Daemon, Client]]:
    """coder and chat (5 GiB each) cannot share the 8 GiB GPU; mini (1 GiB) stops after 1 s
    idle; big is exclusive."""
    rport = free_port()
    doc = base_config(tmp_path, [
        on_demand("coder", models["coder"], 5),
        on_demand("chat", models["chat"], 5, gate={"queue_timeout_s": 20}),
        on_demand("mini", models["mini"], 1, idle_stop_s=1.0),
        on_demand("big", models["chat"], 1, exclusive=True),
    ], gpus=1, router={"listen": f"127.0.0.1:{rport}"})
    doc["gpu"]["sim"][0]["memory_total_bytes"] = 8 * GIB
    client = Client(rport)
    with running(tmp_path, doc) as d:
        wait_until(lambda: _answers(client), 10, what="the router")
        yield d, client


def _answers(client: Client) -> bool:
    try:
        return len(client.models()) == 4
    except OSError:
        return False


def completion(client: Client, model: str) -> str:
    status, _h, body = client.request("POST", "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
    assert status == 200, body
    data = json.loads(body)
    assert data["choices"][0]["message"]["role"] == "assistant"
    return str(data["choices"][0]["message"]["content"])


def test_each_model_in_turn_swaps_them(box: tuple[Daemon, Client]) -> None:
    d, client = box
    assert states(d)["coder"] == ("stopped", ["idle"])  # nothing loaded at start
    completion(client, "coder-model")
    assert states(d)["coder"][0] == "ready"
    completion(client, "chat-model")
    s = states(d)
    assert s["chat"][0] == "ready" and s["coder"] == ("stopped", ["idle"])
    completion(client, "coder-model")
    s = states(d)
    assert s["coder"][0] == "ready" and s["chat"] == ("stopped", ["idle"])
    listing = client.models()
    assert listing["coder-model"]["state"] == "loaded"
    assert listing["chat-model"]["state"] == "unloaded"
    text = metrics_text(d)
    assert 'llm_supervisor_model_swaps_total{service="coder"} 1.0' in text
    assert 'llm_supervisor_model_swaps_total{service="chat"} 1.0' in text
    assert 'llm_supervisor_model_cold_starts_total{model="coder-model",service="coder"} 2.0' \
        in text


def slow_stream(port: int, model: str, result: dict[str, Any]) -> None:
    """A streamed completion read slowly (small receive buffer, 8 KiB every 20 ms), so that it
    lasts: a client on a slow link. `n_probs` makes each event large (about 1 KiB), so that
    the response outgrows every buffer on the way and the model's server has to wait;
    `ignore_eos`, so that it has all 400 (a tiny random model may end after 20, a response
    that fits in the buffers and is over before anyone sees it in flight)."""
    body = json.dumps({"model": model, "stream": True, "max_tokens": 400, "n_probs": 20,
                       "ignore_eos": True,
                       "messages": [{"role": "user", "content": "tell me a story"}]}).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
              b"application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
              % (len(body), body))
    data = bytearray()
    s.settimeout(30)
    while True:
        chunk = s.recv(8192)
        if not chunk:
            break
        data += chunk
        result.setdefault("first", time.monotonic())  # the stream is under way
        time.sleep(0.02)
    s.close()
    result["raw"] = bytes(data)
    result["done"] = time.monotonic()


def test_a_stream_is_not_cut_when_another_model_needs_its_memory(
        box: tuple[Daemon, Client]) -> None:
    d, client = box
    completion(client, "coder-model")
    result: dict[str, Any] = {}
    t = threading.Thread(target=slow_stream, args=(client.port, "coder-model", result))
    t.start()
    # the stream under way (its first bytes with the slow reader; coder may be done with it
    # already, 400 tokens take it 80 ms: what matters is that its answer is still on its way
    # to the client when chat takes coder's memory); a loaded machine may take seconds
    wait_until(lambda: "first" in result, 60, what="the stream under way")
    time.sleep(0.3)
    t0 = time.monotonic()
    completion(client, "chat-model")  # waits for the stream, then coder goes
    waited = time.monotonic() - t0
    t.join(30)
    raw = result["raw"]
    # the whole stream came (what the gate still held for the slow reader after coder's
    # last byte is delivered from the gate's buffers, whatever happens to coder)
    assert raw.startswith(b"HTTP/1.1 200")
    assert b"data: [DONE]" in raw and b"upstream_cut" not in raw
    assert len(re.findall(rb'"finish_reason":"(length|stop)"', raw)) == 1  # it ended itself
    assert waited > 0.0
    assert states(d)["coder"] == ("stopped", ["idle"])
    assert "coder: stopping to make room for chat" in d.logtext()


def test_idle_stop(box: tuple[Daemon, Client]) -> None:
    d, client = box
    completion(client, "mini-model")
    assert states(d)["mini"][0] == "ready"
    d.wait_state("mini", "stopped", 10)
    assert "mini: stopping after 1 s without a request" in d.logtext()
    completion(client, "mini-model")  # and back on the next request


def test_unknown_model(box: tuple[Daemon, Client]) -> None:
    _d, client = box
    status, _h, body = client.chat("llama-3-70b")
    err = json.loads(body)["error"]
    assert status == 404 and err["code"] == "model_not_found"
    assert "chat-model" in err["message"] and "coder-model" in err["message"]


def test_a_burst_for_a_cold_model_starts_it_once(box: tuple[Daemon, Client]) -> None:
    d, client = box
    codes: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        status = client.chat("chat-model")[0]
        with lock:
            codes.append(status)

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert codes == [200] * 16
    assert d.logtext().count("chat: stopped -> starting") == 1


def test_exclusive(box: tuple[Daemon, Client]) -> None:
    d, client = box
    completion(client, "mini-model")
    completion(client, "big-model")  # 1 GiB, but the GPU is for it alone
    s = states(d)
    assert s["big"][0] == "ready" and s["mini"] == ("stopped", ["idle"])
    completion(client, "mini-model")  # and it leaves for the next
    s = states(d)
    assert s["big"] == ("stopped", ["idle"]) and s["mini"][0] == "ready"
