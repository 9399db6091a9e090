"""End to end with a real inference server: llama.cpp's llama-server on a generated tiny
model, supervised by the daemon as a real process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    Daemon,
    alive,
    base_config,
    free_port,
    make_tiny_model,
    require_llama_server,
    running,
    wait_until,
)

pytestmark = pytest.mark.e2e

BIN = require_llama_server()


def llama(name: str, model: Path, extra: list[str] | None = None,
          **sections: Any) -> dict[str, Any]:
    assert BIN is not None
    svc: dict[str, Any] = {
        "name": name,
        "command": [BIN, "-m", str(model), "--host", "127.0.0.1", "--port", "{port}",
                    "-c", "512", "-t", "1", "--no-webui", *(extra or [])],
        "port": free_port(),
        "health": {"interval_s": 0.2, "timeout_s": 0.2, "failures": 2, "startup_timeout_s": 30},
        "restart": {"backoff_initial_s": 0.1, "backoff_max_s": 0.5, "max_restarts": 4,
                    "window_s": 60},
        "stop": {"timeout_s": 3},
    }
    svc.update(sections)
    return svc


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("llama")
    model = make_tiny_model(tmp / "tiny.gguf")
    doc = base_config(tmp, [
        llama("tiny-a", model, gpus=[0],
              gate={"listen": f"127.0.0.1:{free_port()}", "max_concurrency": 4},
              probe={"kind": "completion", "interval_s": 1.0, "timeout_s": 5, "failures": 2}),
        llama("tiny-b", model, gpus=[1], extra=["--metrics"],
              probe={"kind": "completion", "interval_s": 0.3, "timeout_s": 5, "failures": 2}),
        llama("broken", tmp / "missing.gguf"),
    ])
    with running(tmp, doc) as d:
        yield d


def chat(port: int, stream: bool = False, max_tokens: int = 8) -> Any:
    body = json.dumps({"messages": [{"role": "user", "content": "hello"}],
                       "max_tokens": max_tokens, "stream": stream}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 - loopback only
        raw = r.read().decode()
    if not stream:
        return json.loads(raw)
    return [line[6:] for line in raw.splitlines() if line.startswith("data: ")]


def assert_serves(port: int) -> None:
    reply = chat(port, max_tokens=8)
    assert reply["object"] == "chat.completion"
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("length", "stop")
    assert 0 < reply["usage"]["completion_tokens"] <= 8
    chunks = chat(port, stream=True, max_tokens=6)
    assert chunks[-1] == "[DONE]"
    parsed = [json.loads(c) for c in chunks[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in parsed)
    assert any(p["choices"] and p["choices"][0].get("finish_reason") for p in parsed)


def test_start_to_ready_and_serving(daemon: Daemon) -> None:
    a = daemon.wait_state("tiny-a", "ready", 30)
    b = daemon.wait_state("tiny-b", "ready", 30)
    assert a["health"]["ok"] is True
    assert_serves(a["port"])
    assert_serves(b["port"])
    env = Path(f"/proc/{a['pid']}/environ").read_bytes().split(b"\0")
    assert f"CUDA_VISIBLE_DEVICES={a['gpus'][0]}".encode() in env


def test_through_the_gate(daemon: Daemon) -> None:
    """Plain and streamed chat completions through the gate; accounting returns to zero."""
    daemon.wait_state("tiny-a", "ready", 30)
    wait_until(lambda: daemon.service("tiny-a")["gate"] == "open", 10, what="gate open")
    gate_port = int(daemon.doc["service"][0]["gate"]["listen"].rsplit(":", 1)[1])
    assert_serves(gate_port)
    wait_until(lambda: daemon.service("tiny-a")["inflight"] == 0, 5, what="accounted")
    metrics = urllib.request.urlopen(
        f"http://{daemon.doc['metrics']['listen']}/metrics", timeout=5).read().decode()
    assert 'llm_supervisor_gate_requests_total{code="200",service="tiny-a"} 2.0' in metrics


def test_the_generation_probe_passes_against_llama_server(daemon: Daemon) -> None:
    """A real 1-token completion every 0.3 s while idle: it passes, nothing is restarted."""
    daemon.wait_state("tiny-b", "ready")
    wait_until(lambda: (daemon.service("tiny-b").get("probe") or {}).get("probes", 0) >= 3,
               15, what="three probes")
    probe = daemon.service("tiny-b")["probe"]
    assert probe["failures"] == 0 and probe["hung"] == 0 and probe["last_error"] is None
    assert probe["last_ok_s_ago"] is not None and probe["last_ok_s_ago"] < 5


def test_no_probe_while_the_gate_carries_traffic(daemon: Daemon) -> None:
    """tiny-a probes every 1 s when idle; with a chat through its gate every 0.25 s, none."""
    daemon.wait_state("tiny-a", "ready")
    wait_until(lambda: (daemon.service("tiny-a").get("probe") or {}).get("probes", 0) >= 1,
               10, what="a probe while idle")
    gate = int(daemon.service("tiny-a")["gate_listen"].rsplit(":", 1)[1])
    chat(gate, max_tokens=4)
    before = daemon.service("tiny-a")["probe"]["probes"]
    end = time.monotonic() + 4.0
    while time.monotonic() < end:
        chat(gate, stream=True, max_tokens=16)
        time.sleep(0.25)
    probe = daemon.service("tiny-a")["probe"]
    assert probe["probes"] == before and probe["failures"] == 0, probe


def test_engine_metrics_service_discovery_and_labelled_proxy(daemon: Daemon) -> None:
    """/sd lists the engines with labels that join; /services/NAME/metrics is llama-server's
    own metrics (--metrics) with those labels added; an engine without metrics: a clean 502."""
    listen = daemon.doc["metrics"]["listen"]
    daemon.wait_state("tiny-b", "ready")
    chat(daemon.service("tiny-b")["port"], max_tokens=4)  # some tokens to count
    with urllib.request.urlopen(f"http://{listen}/sd", timeout=10) as r:
        sd = json.loads(r.read())
    by_service = {t["labels"]["service"]: t for t in sd}
    b = by_service["tiny-b"]
    port = daemon.service("tiny-b")["port"]
    assert b["targets"] == [f"127.0.0.1:{port}"]
    gpu1 = daemon.status()["gpus"][1]
    assert b["labels"]["gpu"] == "1" and b["labels"]["uuid"] == gpu1["uuid"]
    assert b["labels"]["__metrics_path__"] == "/metrics" and b["labels"]["instance"]
    with urllib.request.urlopen(f"http://{listen}/services/tiny-b/metrics",
                                timeout=10) as r:
        text = r.read().decode()
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert samples and all(f'service="tiny-b",gpu="1",uuid="{gpu1["uuid"]}"' in line
                           for line in samples), samples[:3]
    assert any(line.startswith("llamacpp:") for line in samples)
    promtool = shutil.which("promtool")
    if promtool is not None:
        r2 = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=30, check=False)
        assert r2.returncode in (0, 3), r2.stderr  # 3: lint warnings only (naming)
        assert "error" not in r2.stderr.lower(), r2.stderr
    with pytest.raises(urllib.error.HTTPError) as err:  # tiny-a runs without --metrics
        urllib.request.urlopen(f"http://{listen}/services/tiny-a/metrics",
                               timeout=10)
    assert err.value.code == 502
    err.value.close()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{listen}/services/nope/metrics",
                               timeout=10)
    assert err.value.code == 404
    err.value.close()


def test_kill_9_is_restarted_and_serving_again(daemon: Daemon) -> None:
    before = daemon.wait_state("tiny-a", "ready", 30)
    os.kill(before["pid"], signal.SIGKILL)
    # (between the exit and its reaping, status says `ready` with no pid: not back yet)
    after = wait_until(lambda: (s := daemon.service("tiny-a"))["state"] == "ready"
                       and s["pid"] not in (None, before["pid"]) and s, 30, what="tiny-a back")
    assert after["restarts"] == before["restarts"] + 1
    assert after["last_exit"] == "killed by SIGKILL"
    assert_serves(after["port"])


def test_sigstop_is_detected_and_replaced(daemon: Daemon) -> None:
    before = daemon.wait_state("tiny-b", "ready", 30)
    os.kill(before["pid"], signal.SIGSTOP)
    after = wait_until(lambda: (s := daemon.service("tiny-b"))["state"] == "ready"
                       and s["pid"] != before["pid"] and s, 30, what="tiny-b replaced")
    assert not alive(before["pid"])
    assert_serves(after["port"])
    metrics = urllib.request.urlopen(
        f"http://{daemon.doc['metrics']['listen']}/metrics", timeout=5).read().decode()
    assert 'llm_supervisor_service_restarts_total{reason="health",service="tiny-b"} 1.0' in \
        metrics


def test_crash_loop_ends_failed(daemon: Daemon) -> None:
    svc = daemon.wait_state("broken", "failed", 60)
    assert svc["restarts"] == 4 and svc["last_exit"] == "exit 1"
    r = daemon.llmctl("status")
    assert "broken failed:" in r.stdout and "llmctl reset broken" in r.stdout


def test_llmctl_stop_start_restart(daemon: Daemon) -> None:
    daemon.wait_state("tiny-a", "ready", 30)
    r = daemon.llmctl("stop", "tiny-a")
    assert r.returncode == 0, r.stderr
    assert daemon.service("tiny-a")["state"] == "stopped"
    r = daemon.llmctl("start", "tiny-a")
    assert r.returncode == 0
    svc = daemon.wait_state("tiny-a", "ready", 30)
    r = daemon.llmctl("restart", "tiny-a")
    assert r.returncode == 0 and "tiny-a: ready" in r.stdout
    after = daemon.service("tiny-a")
    assert after["pid"] != svc["pid"]
    assert_serves(after["port"])
