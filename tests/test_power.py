"""Power loss end to end: the daemon as a real process, a real upsd + dummy-ups (tests/nutserver),
simulated GPUs and fake model servers behind gates. The UPS state changes through the dummy
driver's file, as a real UPS's would through its driver."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nutserver import NutServer, require_nut

import helpers
from helpers import (
    Daemon,
    NotifyListener,
    alive,
    base_config,
    fake_service,
    free_port,
    running,
    stays,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("nut_available")


@pytest.fixture
def nut_available() -> None:
    require_nut()


@pytest.fixture
def ups(tmp_path: Path) -> Iterator[NutServer]:
    with NutServer(tmp_path / "nut") as server:
        yield server


def gated(name: str, *knobs: str, **extra: Any) -> dict[str, Any]:
    return helpers.gated(name, *knobs, gpus=[0], service=extra, drain_timeout_s=10)


def config(tmp: Path, ups: NutServer, services: list[dict[str, Any]],
           checkpoints: list[dict[str, Any]] | None = None, **power: Any) -> dict[str, Any]:
    doc = base_config(tmp, services, gpus=2, power={
        "source": "nut", "ups": ups.ups, "poll_interval_s": 0.2, "on_battery_grace_s": 2,
        "deadtime_s": 2, "low_runtime_s": 60, "low_charge_pct": 20, "drain_timeout_s": 10,
        "stop_timeout_s": 5, **power})
    if checkpoints:
        doc["checkpoint"] = checkpoints
    return doc


def metrics(doc: dict[str, Any]) -> str:
    with urllib.request.urlopen(f"http://{doc['metrics']['listen']}/metrics", timeout=5) as r:
        return str(r.read().decode())


def power(d: Daemon) -> dict[str, Any]:
    data: dict[str, Any] = d.status()["power"]
    return data


def mode(d: Daemon) -> str:
    return str(d.status()["supervisor"]["mode"])

def test_on_battery_past_the_grace_runs_the_whole_sequence_and_comes_back(
        tmp_path: Path, ups: NutServer) -> None:
    marker = tmp_path / "checkpointed"
    cp = [{"name": "touch", "kind": "command",
           "command": [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('ok')"]}]
    notify = NotifyListener(tmp_path / "notify.sock")
    doc = config(tmp_path, ups, [gated("chat")], cp)
    with running(tmp_path, doc, env={"NOTIFY_SOCKET": str(notify.path)}) as d:
        d.wait_state("chat", "ready")
        wait_until(lambda: power(d)["state"] == "online", 5, what="UPS online")
        wait_until(lambda: any("UPS OL" in m for _t, m in notify.messages), 5,
                   what="STATUS= with the UPS")
        pid = d.service("chat")["pid"]
        ups.set(status="OB DISCHRG", runtime=900)
        wait_until(lambda: mode(d) == "on_battery", 5, what="on battery")
        text = metrics(doc)
        assert "llm_supervisor_ups_on_battery 1.0" in text
        assert "llm_supervisor_ups_reachable 1.0" in text
        assert 'llm_supervisor_ups_status{flag="DISCHRG"} 1.0' in text
        assert "llm_supervisor_ups_battery_runtime_seconds 900.0" in text
        wait_until(lambda: mode(d) == "powered_down", 15, what="powered down")
        wait_until(lambda: any("UPS OB DISCHRG" in m and "powered_down" in m
                               for _t, m in notify.messages), 5, what="STATUS= powered down")
        text = metrics(doc)
        assert 'llm_supervisor_power_events_total{event="power_down"} 1.0' in text
        assert 'llm_supervisor_power_down_step_duration_seconds{step="checkpoint"}' in text
        assert 'llm_supervisor_checkpoint_runs_total{name="touch",result="ok"} 1.0' in text
        assert marker.read_text() == "ok"
        st = d.service("chat")
        assert st["state"] == "stopped" and "powered_down" in st["holds"]
        assert st["gate"] == "closed" and st["drain_reasons"] == [], st
        url = f"http://{doc['service'][0]['gate']['listen']}/v1/models"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=5)
        assert err.value.code == 503 and err.value.headers["Retry-After"]
        assert b"is held down" in err.value.read()
        err.value.close()
        assert not alive(pid)
        steps = [s["step"] for s in power(d)["power_down"]["steps"]]
        assert steps == ["drain", "checkpoint", "stop"]
        assert power(d)["checkpoints"][0]["result"] == "ok"
        ups.set(status="OL CHRG")
        d.wait_state("chat", "ready", 15)
        assert mode(d) == "normal" and d.service("chat")["gate"] == "open"


def test_power_back_within_the_grace_stops_nothing(tmp_path: Path, ups: NutServer) -> None:
    with running(tmp_path, config(tmp_path, ups, [gated("chat")],
                                  on_battery_grace_s=30)) as d:
        d.wait_state("chat", "ready")
        pid = d.service("chat")["pid"]
        ups.set(status="OB")
        wait_until(lambda: mode(d) == "on_battery", 5, what="on battery")
        ups.set(status="OL")
        wait_until(lambda: mode(d) == "normal", 5, what="normal again")
        st = d.service("chat")
        assert st["pid"] == pid and st["state"] == "ready" and st["gate"] == "open"


def test_low_battery_powers_down_at_once(tmp_path: Path, ups: NutServer) -> None:
    with running(tmp_path, config(tmp_path, ups, [gated("chat")],
                                  on_battery_grace_s=600)) as d:
        d.wait_state("chat", "ready")
        ups.set(status="OB LB", charge=10, runtime=100)
        wait_until(lambda: mode(d) == "powered_down", 10, what="powered down")


def test_upsd_killed_on_battery_is_the_deadtime_rule(tmp_path: Path, ups: NutServer) -> None:
    with running(tmp_path, config(tmp_path, ups, [gated("chat")],
                                  on_battery_grace_s=600, deadtime_s=2)) as d:
        d.wait_state("chat", "ready")
        ups.set(status="OB")
        wait_until(lambda: mode(d) == "on_battery", 5, what="on battery")
        ups.kill_upsd()
        wait_until(lambda: power(d)["state"] == "unreachable", 5, what="unreachable")
        wait_until(lambda: mode(d) == "powered_down", 10, what="powered down by deadtime")


def test_upsd_killed_or_driver_gone_on_line_never_powers_down(
        tmp_path: Path, ups: NutServer) -> None:
    with running(tmp_path, config(tmp_path, ups, [gated("chat")], deadtime_s=1)) as d:
        d.wait_state("chat", "ready")
        wait_until(lambda: power(d)["state"] == "online", 5, what="online")
        ups.kill_driver()
        wait_until(lambda: power(d)["state"] == "unknown", 5, what="unknown")
        stays(lambda: mode(d) == "normal", 2.5, "no power-down: unknown on line")
        ups.kill_upsd()
        wait_until(lambda: power(d)["state"] == "unreachable", 5, what="unreachable")
        stays(lambda: mode(d) == "normal", 2.5, "no power-down: unreachable on line")
        assert d.service("chat")["state"] == "ready"
        assert "it was on line: no power-down for this" in d.logtext()


def test_power_event_from_llmctl_is_a_second_source(tmp_path: Path) -> None:
    doc = base_config(tmp_path, [gated("chat")], gpus=1, power={
        "source": "none", "on_battery_grace_s": 600, "drain_timeout_s": 5, "stop_timeout_s": 5})
    with running(tmp_path, doc) as d:
        d.wait_state("chat", "ready")
        r = d.llmctl("power-event", "ONBATT")
        assert r.returncode == 0, r.stderr
        assert mode(d) == "on_battery"
        r = d.llmctl("power-event", "low-battery")
        assert r.returncode == 0, r.stderr
        wait_until(lambda: mode(d) == "powered_down", 10, what="powered down")
        r = d.llmctl("power-event", "on-line")
        assert r.returncode == 0, r.stderr
        d.wait_state("chat", "ready", 15)
        r = d.llmctl("power-event", "brownout")
        assert r.returncode == 2 and "invalid choice" in r.stderr


def test_checkpoint_now_reports_each_result(tmp_path: Path) -> None:
    ok = tmp_path / "ok"
    cps = [{"name": "good", "kind": "command",
            "command": [sys.executable, "-c", f"open({str(ok)!r}, 'w')"]},
           {"name": "bad", "kind": "command", "command": ["/bin/false"]},
           {"name": "slow", "kind": "command", "command": ["/bin/sleep", "30"],
            "timeout_s": 0.5}]
    doc = base_config(tmp_path, [gated("chat")], gpus=1, checkpoint=cps)
    with running(tmp_path, doc) as d:
        r = d.llmctl("checkpoint")
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "good (command): ok" in r.stdout
        assert "bad (command): failed" in r.stdout and "exit 1" in r.stdout
        assert "slow (command): timeout" in r.stdout
        r = d.llmctl("checkpoint", "good")
        assert r.returncode == 0 and "bad" not in r.stdout
        r = d.llmctl("checkpoint", "nope")
        assert r.returncode == 1 and "no checkpoint named nope" in r.stderr
        r = d.llmctl("--json", "status")
        names = [c["name"] for c in json.loads(r.stdout)["power"]["checkpoints"]]
        assert names == ["good", "bad", "slow"]
        with urllib.request.urlopen(f"http://{doc['metrics']['listen']}/metrics",
                                    timeout=5) as resp:
            text = resp.read().decode()
        assert 'llm_supervisor_checkpoint_runs_total{name="good",result="ok"} 2.0' in text
        assert 'llm_supervisor_checkpoint_runs_total{name="slow",result="timeout"} 1.0' in text


async def _stream(url: str, tokens: int, delay: float) -> tuple[int, bytes]:
    import aiohttp

    body = {"stream": True, "max_tokens": tokens, "fake_token_delay_s": delay}
    async with aiohttp.ClientSession() as client, client.post(url, json=body) as r:
        return r.status, await r.read()


async def test_power_back_mid_drain_cancels_and_reopens_only_the_power_drain(
        tmp_path: Path, ups: NutServer) -> None:
    import asyncio

    from helpers import async_wait_until

    svc = gated("chat")
    url = f"http://{svc['gate']['listen']}/v1/chat/completions"
    with running(tmp_path, config(tmp_path, ups, [svc, gated("other")],
                                  drain_timeout_s=30)) as d:
        d.wait_state("chat", "ready")
        d.wait_state("other", "ready")
        pid = d.service("chat")["pid"]
        assert d.llmctl("drain", "other").returncode == 0  # the operator's drain stays
        stream = asyncio.ensure_future(_stream(url, 60, 0.1))  # 6 s in flight
        await async_wait_until(lambda: d.service("chat")["inflight"] == 1, 5, what="in flight")
        ups.set(status="OB LB", charge=15, runtime=200)
        await async_wait_until(lambda: mode(d) == "powering_down", 5, what="powering down")
        await async_wait_until(lambda: d.service("chat")["gate"] == "draining", 5,
                               what="gate closed")
        ups.set(status="OL CHRG", charge=15, runtime=200)
        await async_wait_until(lambda: mode(d) == "normal", 5, what="cancelled")
        status, body = await stream
        assert status == 200 and body.rstrip().endswith(b"data: [DONE]")
        st = d.service("chat")
        assert st["pid"] == pid and st["gate"] == "open" and st["state"] == "ready"
        other = d.service("other")
        assert other["gate"] == "draining" and other["drain_reasons"] == ["operator"]
        assert "power-down cancelled" in d.logtext()
        assert [s["step"] for s in power(d)["power_down"]["steps"]] == ["drain"]


def test_flapping_faster_than_the_grace_stops_nothing(tmp_path: Path, ups: NutServer) -> None:
    with running(tmp_path, config(tmp_path, ups, [gated("chat")],
                                  on_battery_grace_s=3)) as d:
        d.wait_state("chat", "ready")
        pid = d.service("chat")["pid"]
        for _ in range(3):  # on battery ~1.5 s, on line ~1 s, three times: 4.5 s on battery
            ups.set(status="OB DISCHRG")
            wait_until(lambda: mode(d) == "on_battery", 5, what="on battery")
            time.sleep(1.0)
            ups.set(status="OL")
            wait_until(lambda: mode(d) == "normal", 5, what="on line")
        st = d.service("chat")
        assert st["pid"] == pid and st["state"] == "ready"
        assert "powering down" not in d.logtext()


def test_on_battery_caps_the_gpus_and_power_back_restores(tmp_path: Path,
                                                          ups: NutServer) -> None:
    with running(tmp_path, config(tmp_path, ups, [gated("chat")], on_battery_grace_s=60,
                                  on_battery_power_fraction=0.6)) as d:
        d.wait_state("chat", "ready")
        ups.set(status="OB DISCHRG")
        wait_until(lambda: [g["power_limit_w"] for g in d.status()["gpus"]] == [180.0, 180.0],
                   5, what="GPUs capped at 60 %")
        assert power(d)["power_ceiling"] == 0.6
        ups.set(status="OL")
        wait_until(lambda: [g["power_limit_w"] for g in d.status()["gpus"]] == [300.0, 300.0],
                   5, what="limits restored")
        assert power(d)["power_ceiling"] is None


@pytest.mark.parametrize("status", ["OB LB", "OB DISCHRG"])
def test_on_battery_at_start_keeps_the_services_down_until_power_returns(
        tmp_path: Path, ups: NutServer, status: str) -> None:
    ups.set(status=status, charge=5 if "LB" in status else 90, runtime=60)
    ups.wait_status(status)
    with running(tmp_path, config(tmp_path, ups, [gated("chat")])) as d:
        wait_until(lambda: mode(d) == "powered_down", 10, what="held at start")
        state = "low_battery" if "LB" in status else "on_battery"
        wait_until(lambda: d.status()["power"]["state"] == state, 5, what="read")
        st = d.service("chat")
        assert st["state"] == "stopped" and st["holds"] == ["powered_down"]
        ups.set(status="OL CHRG", charge=50, runtime=1200)
        d.wait_state("chat", "ready", 15)
        assert mode(d) == "normal"


def test_signal_and_http_checkpoints(tmp_path: Path, ups: NutServer) -> None:
    """A `signal` hook: the service writes its done file when it gets SIGUSR1; an `http` hook
    against a server that answers 500 fails, is shown and does not stop the sequence."""
    done = tmp_path / "index.snapshot"
    script = tmp_path / "svc.py"
    script.write_text(
        "import signal, sys, time, http.server, threading\n"
        f"def snap(*_):\n    open({str(done)!r}, 'w').write('snap')\n"
        "signal.signal(signal.SIGUSR1, snap)\n"
        f"open({str(tmp_path / 'armed')!r}, 'w')\n"
        "srv = http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])),"
        " http.server.BaseHTTPRequestHandler)\n"
        "srv.serve_forever()\n")
    port = free_port()
    svc = {"name": "rag-api", "command": [sys.executable, str(script), str(port)],
           "stop": {"timeout_s": 2}}  # no port, no health URL: ready once launched
    bad_port = free_port()
    cps = [{"name": "faiss", "kind": "signal", "service": "rag-api", "signal": "SIGUSR1",
            "done_file": str(done), "timeout_s": 5},
           {"name": "web", "kind": "http", "url": f"http://127.0.0.1:{bad_port}/checkpoint",
            "timeout_s": 2}]
    with running(tmp_path, config(tmp_path, ups, [svc], cps)) as d:
        d.wait_state("rag-api", "ready")
        wait_until((tmp_path / "armed").exists, 5, what="the handler installed")
        r = d.llmctl("checkpoint", "faiss")
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert done.read_text() == "snap"
        ups.set(status="OB LB")
        wait_until(lambda: mode(d) == "powered_down", 15, what="powered down")
        results = {c["name"]: c for c in power(d)["checkpoints"]}
        assert results["faiss"]["result"] == "ok"
        assert results["web"]["result"] == "failed"
        assert "cannot connect" in results["web"]["error"]
        r = d.llmctl("checkpoint", "faiss")  # the service is stopped now
        assert r.returncode == 1 and "not running" in r.stdout


def test_a_service_killed_at_the_stop_deadline_comes_back_with_the_power(
        tmp_path: Path, ups: NutServer) -> None:
    """Its own stop timeout (8 s) is longer than the power-down's (1 s): SIGKILLed at the
    power-down's deadline, and still started again when the power returns."""
    slow = fake_service("slow", free_port(), "--ignore-term", stop={"timeout_s": 8})
    with running(tmp_path, config(tmp_path, ups, [slow], stop_timeout_s=1)) as d:
        d.wait_state("slow", "ready")
        pid = d.service("slow")["pid"]
        ups.set(status="OB LB")
        wait_until(lambda: mode(d) == "powered_down", 10, what="powered down")
        assert not alive(pid)
        steps = power(d)["power_down"]["steps"]
        assert "killed after 1 s: slow" in steps[-1]["detail"], steps
        ups.set(status="OL")
        d.wait_state("slow", "ready", 15)


def test_a_stale_on_line_event_does_not_undo_what_upsd_says(tmp_path: Path,
                                                              ups: NutServer) -> None:
    """upssched's ONLINE of another UPS, once a second, while upsd says OB: the grace runs
    out all the same; a reload while powered down adds its service held down."""
    doc = config(tmp_path, ups, [gated("chat")], on_battery_grace_s=3)
    with running(tmp_path, doc) as d:
        d.wait_state("chat", "ready")
        ups.set(status="OB DISCHRG")
        wait_until(lambda: mode(d) == "on_battery", 5, what="on battery")
        deadline = time.monotonic() + 10
        while mode(d) != "powered_down":
            assert time.monotonic() < deadline, "the grace never ran out"
            r = d.llmctl("power-event", "on-line")
            assert r.returncode == 0, r.stderr
            time.sleep(0.5)
        assert "on-line not applied: upsd says OB DISCHRG" in d.logtext()
        doc["service"].append(gated("added"))
        d.write(doc)
        r = d.llmctl("reload")
        assert r.returncode == 0, (r.stdout, r.stderr)
        st = d.service("added")
        assert st["state"] == "stopped" and st["holds"] == ["powered_down"], st
        ups.set(status="OL")
        d.wait_state("added", "ready", 15)
        d.wait_state("chat", "ready", 15)


def test_hooks_die_with_a_killed_daemon_and_leftovers_do_not_hold_the_step(
        tmp_path: Path) -> None:
    """kill -9 of the daemon mid-checkpoint takes the hook with it (the orphan guardian); a
    hook that exits 0 leaving a child that holds its output is done, not timed out."""
    import signal as sig

    pidfile = tmp_path / "hook.pid"
    cps = [{"name": "bg", "kind": "command", "timeout_s": 20,
            "command": ["sh", "-c", "sleep 60 & echo started"]},
           {"name": "slow", "kind": "command", "timeout_s": 60,
            "command": ["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"]}]
    doc = base_config(tmp_path, [gated("chat")], gpus=1, checkpoint=cps)
    with running(tmp_path, doc) as d:
        t0 = time.monotonic()
        r = d.llmctl("checkpoint", "bg")
        assert r.returncode == 0 and "bg (command): ok" in r.stdout, (r.stdout, r.stderr)
        assert time.monotonic() - t0 < 10
        import subprocess

        proc = subprocess.Popen([sys.executable, "-m", "supervisord_llm.ctl", "--socket",
                                 doc["supervisor"]["control_socket"], "checkpoint", "slow"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10,
                       what="the hook runs")
            hook = int(pidfile.read_text())
            assert alive(hook)
            assert d.proc is not None
            d.proc.send_signal(sig.SIGKILL)
            wait_until(lambda: not alive(hook), 10, what="the hook killed with the daemon")
        finally:
            proc.wait(10)


def test_events_that_upsd_contradicts_and_the_fsd_latch(tmp_path: Path, ups: NutServer) -> None:
    """A low-battery event while upsd says OL is not applied; an FSD event is, and an on-line
    event that comes before upsd says OL still releases its latch: upsd's OL restarts."""
    with running(tmp_path, config(tmp_path, ups, [gated("chat")])) as d:
        d.wait_state("chat", "ready")
        wait_until(lambda: power(d)["state"] == "online", 5, what="online")
        r = d.llmctl("--json", "power-event", "low-battery")
        assert r.returncode == 0 and json.loads(r.stdout)["event"]["applied"] is False
        assert mode(d) == "normal" and d.service("chat")["state"] == "ready"
        ups.set(status="OB DISCHRG")
        wait_until(lambda: power(d)["state"] == "on_battery", 5, what="on battery")
        assert d.llmctl("power-event", "fsd").returncode == 0
        wait_until(lambda: mode(d) == "powered_down", 10, what="powered down by FSD")
        r = d.llmctl("--json", "power-event", "on-line")  # before upsd says OL
        reply = json.loads(r.stdout)["event"]
        assert reply["applied"] is False and "start when upsd says OL" in reply["why"]
        ups.set(status="OL")
        d.wait_state("chat", "ready", 15)


def test_a_failed_service_stays_failed_through_a_power_cycle(tmp_path: Path) -> None:
    doc = base_config(tmp_path, [gated("ok"), fake_service(
        "bad", free_port(), "--exit-after", "0.2", restart={"max_restarts": 1,
                                                            "backoff_initial_s": 0.05})],
        gpus=1, power={"source": "none", "stop_timeout_s": 5})
    with running(tmp_path, doc) as d:
        d.wait_state("bad", "failed", 20)
        d.wait_state("ok", "ready")
        assert d.llmctl("power-event", "low-battery").returncode == 0
        wait_until(lambda: mode(d) == "powered_down", 10, what="powered down")
        assert d.service("bad")["state"] == "failed"
        assert d.llmctl("power-event", "on-line").returncode == 0
        d.wait_state("ok", "ready", 15)
        st = d.service("bad")
        assert st["state"] == "failed" and st["holds"] == [], st


def test_one_server_ignoring_sigterm_does_not_cost_the_others_their_clean_stop(
        tmp_path: Path) -> None:
    """Stopped in reverse order, each waited for at most its share of stop_timeout_s: `last`
    ignores SIGTERM, `first` still gets its SIGTERM and exits on its own."""
    doc = base_config(tmp_path, [
        fake_service("first", free_port()),
        fake_service("last", free_port(), "--ignore-term", stop={"timeout_s": 30})],
        # (8 s: `first` has half of it for its clean exit, also on a loaded machine)
        gpus=1, power={"source": "none", "stop_timeout_s": 8})
    with running(tmp_path, doc) as d:
        d.wait_state("first", "ready")
        d.wait_state("last", "ready")
        assert d.llmctl("power-event", "low-battery").returncode == 0
        wait_until(lambda: mode(d) == "powered_down", 25, what="powered down")
        steps = power(d)["power_down"]["steps"]
        assert "killed after 8 s: last" in steps[-1]["detail"], steps
        assert "first: stopping -> stopped (process exit 0)" in d.logtext()
