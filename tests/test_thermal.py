"""GPU protection end to end: the daemon as a real process on simulated GPUs heated through
the sim state file: power steps to the floor and back, the admission factor, restoring the
limits (at stop, and after a kill at the next start), critical pause under streaming load
(no admitted request lost), drain-restart, a lost GPU and its return, a hung sensor."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp

from helpers import (
    SIM_UUID,
    Daemon,
    NotifyListener,
    async_wait_until,
    base_config,
    fake_service,
    free_port,
    running,
    stays,
    wait_until,
)

GPU0 = SIM_UUID.format(0)
THERMAL = {"warn_c": 83, "throttle_c": 85, "critical_c": 88, "resume_c": 79,
           "power_step": 0.1, "min_power_fraction": 0.5, "step_interval_s": 0.3,
           "pause_timeout_s": 60}


def heat(tmp: Path, **gpus: dict[str, Any]) -> None:
    """Write the sim state file (atomically): {uuid: {temperature_c: ...}}."""
    state = tmp / "sim.json"
    new = tmp / "sim.json.new"
    new.write_text(json.dumps({SIM_UUID.format(int(k[3:])): v for k, v in gpus.items()}))
    os.replace(new, state)


def gpu(d: Daemon, index: int = 0) -> dict[str, Any]:
    data: dict[str, Any] = d.status()["gpus"][index]
    return data


def config(tmp: Path, services: list[dict[str, Any]], **thermal: Any) -> dict[str, Any]:
    doc = base_config(tmp, services, gpus=2, thermal={**THERMAL, **thermal})
    doc["gpu"]["poll_interval_s"] = 0.1
    return doc


def limits_file(tmp: Path) -> dict[str, float]:
    path = tmp / "sim.json.limits.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_throttle_steps_floor_factor_and_back(tmp_path: Path) -> None:
    svc = fake_service("chat", free_port(), gpus=[0],
                       gate={"listen": f"127.0.0.1:{free_port()}", "max_concurrency": 10})
    notify = NotifyListener(tmp_path / "notify.sock")
    with running(tmp_path, config(tmp_path, [svc]),
                 env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}) as d:
        d.wait_state("chat", "ready")
        heat(tmp_path, gpu0={"temperature_c": 86})
        seen: list[float] = []

        def floor() -> bool:
            g = gpu(d)
            if g["power_limit_w"] is not None and (not seen or seen[-1] != g["power_limit_w"]):
                seen.append(g["power_limit_w"])
            return bool(g["power_limit_w"] == 150)

        wait_until(floor, 15, interval=0.02, what="the floor (150 W)")
        assert seen[0] == 300 and seen[-1] == 150 and seen == sorted(seen, reverse=True)
        assert all(a - b == 30 for a, b in itertools.pairwise(seen))  # 10% steps
        g = gpu(d)
        assert g["thermal_state"] == "throttled" and g["power_target_w"] == 150
        assert g["admission_factor"] == 0.5 and d.service("chat")["max_concurrency"] == 5
        assert d.service("chat")["throttled"] is True
        assert d.status()["supervisor"]["mode"] == "throttled"
        wait_until(lambda: any("GPU0 86C throttled 150W" in m for _t, m in notify.messages),
                   5, what="STATUS= with the throttled GPU")
        notify.close()
        table = d.llmctl("status").stdout
        assert any(line.startswith("0 ") and line.rstrip().endswith("throttled")
                   for line in table.splitlines()), table
        assert limits_file(tmp_path)[GPU0] == 150  # the board keeps what it was given
        # between resume and throttle: nothing moves
        heat(tmp_path, gpu0={"temperature_c": 82})
        wait_until(lambda: gpu(d)["temperature_c"] == 82, 5, what="82 C seen")
        assert gpu(d)["power_limit_w"] == 150
        # cooled: back up, step by step, to the original
        heat(tmp_path, gpu0={"temperature_c": 70})
        wait_until(lambda: gpu(d)["power_limit_w"] == 300, 15, what="restored to 300 W")
        g = gpu(d)
        assert g["thermal_state"] == "ok" and g["power_target_w"] is None
        assert d.service("chat")["max_concurrency"] == 10
        assert d.service("chat")["throttled"] is False
        wait_until(lambda: d.status()["supervisor"]["mode"] == "normal", 5, what="normal")
        text = d.logtext()
        assert "GPU0 thermal ok -> throttled" in text and "power limit restored to 300 W" in text


def test_limits_restored_at_stop_and_after_a_kill(tmp_path: Path) -> None:
    doc = config(tmp_path, [fake_service("a", free_port(), gpus=[0])])
    with running(tmp_path, doc) as d:
        d.wait_state("a", "ready")
        heat(tmp_path, gpu0={"temperature_c": 86})
        wait_until(lambda: limits_file(tmp_path).get(GPU0, 300) <= 240, 10, what="lowered")
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 0
    assert limits_file(tmp_path)[GPU0] == 300  # restored at stop
    assert not (tmp_path / "state" / "power_limits.json").exists() or \
        json.loads((tmp_path / "state" / "power_limits.json").read_text()) == {}
    # killed with the limit lowered: restored by the next start
    d = Daemon(tmp_path, doc).start()
    try:
        d.wait_state("a", "ready")
        wait_until(lambda: limits_file(tmp_path).get(GPU0, 300) <= 240, 10, what="lowered")
        d.crash()
    finally:
        d.stop()
    lowered = limits_file(tmp_path)[GPU0]
    assert lowered < 300
    heat(tmp_path, gpu0={"temperature_c": 40})
    with running(tmp_path, doc) as d2:
        wait_until(lambda: limits_file(tmp_path)[GPU0] == 300, 10, what="restored at start")
        wait_until(lambda: "left lowered by an earlier run" in d2.logtext(), 5, what="logged")


def test_a_limit_is_taken_over_with_the_models_not_restored_and_lowered_again(
        tmp_path: Path) -> None:
    """The daemon killed while the heat holds a GPU's limit down, its model left running:
    the next daemon adopts the model and takes the limit over as it stands (the GPU is
    still hot: restoring it would put the full power back on a hot board for a while); the
    admission stays lowered; once cool, the limit comes back up step by step."""
    svc = fake_service("a", free_port(), gpus=[0],
                       gate={"listen": f"127.0.0.1:{free_port()}", "max_concurrency": 10})
    doc = config(tmp_path, [svc])
    d = Daemon(tmp_path, doc).start()
    try:
        pid = d.wait_state("a", "ready")["pid"]
        heat(tmp_path, gpu0={"temperature_c": 86})
        wait_until(lambda: limits_file(tmp_path).get(GPU0, 300) <= 240, 10, what="lowered")
        d.crash()
        d.pids_seen.clear()  # the model stays for the next daemon
    finally:
        d.stop()
    lowered = limits_file(tmp_path)[GPU0]
    with running(tmp_path, doc) as d2:
        svc2 = d2.wait_state("a", "ready")
        assert svc2["pid"] == pid and svc2["adopted"]
        stays(lambda: limits_file(tmp_path)[GPU0] <= lowered, 1.0,
              "never back to the board's limit while hot")
        assert "taken over" in d2.logtext()
        assert "left lowered by an earlier run" not in d2.logtext()
        assert d2.service("a")["max_concurrency"] < 10  # the admission as it was
        heat(tmp_path, gpu0={"temperature_c": 40})
        wait_until(lambda: limits_file(tmp_path)[GPU0] == 300, 20, what="back up when cool")
        # the admission follows at the guard's next step (the file is written first)
        wait_until(lambda: d2.service("a")["max_concurrency"] == 10, 10,
                   what="the admission back up")


async def test_critical_pause_loses_no_admitted_request(tmp_path: Path) -> None:
    svc = fake_service("chat", free_port(), gpus=[0],
                       gate={"listen": f"127.0.0.1:{free_port()}", "max_concurrency": 16})
    with running(tmp_path, config(tmp_path, [svc])) as d:
        d.wait_state("chat", "ready")
        url = f"http://{svc['gate']['listen']}/v1/chat/completions"
        pid = d.service("chat")["pid"]
        body = {"stream": True, "max_tokens": 20, "fake_token_delay_s": 0.05}

        async def stream(client: aiohttp.ClientSession) -> tuple[int, bytes]:
            async with client.post(url, json=body) as r:
                return r.status, await r.read()

        async with aiohttp.ClientSession() as client:
            streams = [asyncio.create_task(stream(client)) for _ in range(8)]
            await async_wait_until(lambda: d.service("chat")["inflight"] == 8, 5,
                                   what="8 in flight")
            heat(tmp_path, gpu0={"temperature_c": 89})
            await async_wait_until(lambda: d.service("chat")["gate"] == "draining", 5,
                                   what="paused (thermal drain)")
            s = d.service("chat")
            assert s["drain_reasons"] == ["thermal"] and s["pid"] == pid  # still loaded
            async with client.post(url, json=body) as r:
                assert r.status == 503  # new ones wait for the GPU
            results = await asyncio.gather(*streams)
            assert all(code == 200 and body.rstrip().endswith(b"[DONE]")
                       for code, body in results)
            heat(tmp_path, gpu0={"temperature_c": 70})
            await async_wait_until(lambda: d.service("chat")["gate"] == "open", 10,
                                   what="resumed below resume_c")
            code, _ = await stream(client)
            assert code == 200 and d.service("chat")["pid"] == pid  # never restarted


def test_drain_restart_and_escalation(tmp_path: Path) -> None:
    plain = fake_service("embed", free_port(), gpus=[0])
    gated = fake_service("chat", free_port(), gpus=[0],
                         gate={"listen": f"127.0.0.1:{free_port()}"})
    doc = config(tmp_path, [plain, gated], pause_timeout_s=1)
    with running(tmp_path, doc) as d:
        d.wait_state("embed", "ready")
        d.wait_state("chat", "ready")
        chat_pid = d.service("chat")["pid"]
        heat(tmp_path, gpu0={"temperature_c": 89})
        # the plain one: drained (no gate), stopped and held until the GPU cools
        s = wait_until(lambda: (x := d.service("embed"))["holds"] == ["cooling"] and x, 10,
                       what="embed held for cooling")
        wait_until(lambda: d.service("embed")["state"] == "stopped", 10, what="stopped")
        assert s["desired"] == "down"
        # the gated one: paused, then (nothing in flight for pause_timeout_s) restarted too
        wait_until(lambda: d.service("chat")["holds"] == ["cooling"], 10, what="escalated")
        assert "something else heats it" in d.logtext()
        heat(tmp_path, gpu0={"temperature_c": 70})
        d.wait_state("embed", "ready", 15)
        d.wait_state("chat", "ready", 15)
        assert d.service("chat")["pid"] != chat_pid
        wait_until(lambda: d.service("chat")["gate"] == "open", 10, what="gate open again")
        metrics = d.status()
        assert metrics["services"][0]["restarts"] == 1


def test_lost_gpu_holds_its_services_and_they_come_back(tmp_path: Path) -> None:
    doc = config(tmp_path, [fake_service("a", free_port(), gpus=[0]),
                            fake_service("b", free_port(), gpus=[1])])
    with running(tmp_path, doc) as d:
        d.wait_state("a", "ready")
        d.wait_state("b", "ready")
        heat(tmp_path, gpu0={"lost": True})
        wait_until(lambda: gpu(d)["thermal_state"] == "lost", 5, what="GPU0 lost")
        s = wait_until(lambda: (x := d.service("a"))["state"] == "stopped" and x, 10,
                       what="a stopped")
        assert s["holds"] == ["gpu_lost"]
        assert d.service("b")["state"] == "ready"  # the other GPU's service is untouched
        heat(tmp_path, gpu0={"lost": False})
        d.wait_state("a", "ready", 15)
        assert d.service("a")["holds"] == []
        assert "GPU0" in d.logtext() and "is back" in d.logtext()


def test_hung_sensor_takes_no_action(tmp_path: Path) -> None:
    doc = config(tmp_path, [fake_service("a", free_port(), gpus=[0])])
    doc["gpu"]["call_timeout_s"] = 0.3
    with running(tmp_path, doc) as d:
        d.wait_state("a", "ready")
        heat(tmp_path, gpu0={"temperature_c": 86})
        wait_until(lambda: gpu(d)["thermal_state"] == "throttled", 5, what="throttled")
        heat(tmp_path, gpu0={"temperature_c": 95, "hang": True})
        wait_until(lambda: gpu(d)["thermal_state"] == "unresponsive", 5, what="unresponsive")
        before = limits_file(tmp_path)[GPU0]
        wait_until(lambda: "telemetry lost while throttled" in d.logtext(), 5, what="said")
        assert d.service("a")["state"] == "ready" and d.service("a")["holds"] == []
        assert limits_file(tmp_path)[GPU0] == before  # nothing moved on a stale reading
        heat(tmp_path, gpu0={"temperature_c": 70})
        wait_until(lambda: gpu(d)["power_limit_w"] == 300, 15, what="restored once it answers")


def test_health_beyond_heat_is_visible(tmp_path: Path) -> None:
    doc = config(tmp_path, [fake_service("a", free_port(), gpus=[0])])
    doc["gpu"]["health_interval_s"] = 0.2
    with running(tmp_path, doc) as d:
        d.wait_state("a", "ready")
        heat(tmp_path, gpu0={"clock_events": ["sw_power_cap", "hw_thermal"], "pcie_width": 8,
                             "ecc_uncorrected": 2, "retirement_pending": True})
        h = wait_until(lambda: (x := gpu(d)["health"]) and x["ecc_uncorrected"] == 2 and x,
                       5, what="health read")
        assert h["link_degraded"] and h["memory_trouble"] and h["retirement_pending"]
        assert h["clock_trouble"] == ["hw_thermal"]  # the power cap is ordinary
        table = d.llmctl("status").stdout
        assert "GPU0: memory errors (uncorrected ECC 2, retirement pending)" in table
        assert "GPU0: PCIe link gen4 x8 below gen4 x16" in table
        assert "GPU0: clocks slowed: hw_thermal" in table
        import urllib.request

        url = f"http://{doc['metrics']['listen']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        width = [x for x in text.splitlines()
                 if x.startswith('llm_supervisor_gpu_pcie_link_width{gpu="0"')]
        assert any('kind="current"' in x and x.endswith(" 8.0") for x in width), width
        for line in ('llm_supervisor_gpu_pcie_link_width{gpu="0"',
                     'llm_supervisor_gpu_ecc_errors_total{gpu="0"',
                     'llm_supervisor_gpu_memory_retirement_pending{gpu="0"',
                     'reason="hw_thermal",uuid="' + GPU0 + '"} 1.0'):
            assert line in text, line


async def test_drain_restart_under_streaming_load_loses_no_admitted_request(
        tmp_path: Path) -> None:
    svc = fake_service("chat", free_port(), gpus=[0],
                       gate={"listen": f"127.0.0.1:{free_port()}", "max_concurrency": 16,
                             "drain_timeout_s": 30})
    doc = config(tmp_path, [svc], on_critical="drain-restart")
    with running(tmp_path, doc) as d:
        d.wait_state("chat", "ready")
        url = f"http://{svc['gate']['listen']}/v1/chat/completions"
        pid = d.service("chat")["pid"]
        body = {"stream": True, "max_tokens": 30, "fake_token_delay_s": 0.05}

        async def stream(client: aiohttp.ClientSession) -> tuple[int, bytes]:
            async with client.post(url, json=body) as r:
                return r.status, await r.read()

        async with aiohttp.ClientSession() as client:
            streams = [asyncio.create_task(stream(client)) for _ in range(8)]
            await async_wait_until(lambda: d.service("chat")["inflight"] == 8, 5,
                                   what="8 in flight")
            heat(tmp_path, gpu0={"temperature_c": 89})
            results = await asyncio.gather(*streams)  # drained, then stopped: all complete
            assert all(code == 200 and b.rstrip().endswith(b"[DONE]") for code, b in results)
            await async_wait_until(lambda: d.service("chat")["holds"] == ["cooling"], 10,
                                   what="held for cooling after the drain")
            heat(tmp_path, gpu0={"temperature_c": 70})
            await async_wait_until(lambda: d.service("chat")["state"] == "ready", 15,
                                   what="started again")
            await async_wait_until(lambda: d.service("chat")["gate"] == "open", 5,
                                   what="gate open")
            assert d.service("chat")["pid"] != pid
            code, _b = await stream(client)
            assert code == 200
