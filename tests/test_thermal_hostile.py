"""GPU protection under the cases a hostile tester found: a service on two GPUs that heat or
drop off one after the other, a lost GPU that comes back with its limit lowered, a reload that
moves a paused service, a reset while still critical, a GPU that keeps dropping off, a limit
file that cannot be written, a record for a GPU that is away, a limit the operator changed
while the daemon was down, and a sensor that swings hot and cold. The daemon runs as a real
process on simulated GPUs heated through the sim state file."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

from test_thermal import GPU0, config, gpu, heat, limits_file

import helpers
from helpers import SIM_UUID, fake_service, free_port, running, stays, wait_until

GPU1 = SIM_UUID.format(1)


def gated(name: str, gpus: list[int], **gate: Any) -> dict[str, Any]:
    return helpers.gated(name, gpus=gpus, **gate)

def test_a_service_on_two_gpus_stays_paused_until_both_cool(tmp_path: Path) -> None:
    with running(tmp_path, config(tmp_path, [gated("chat", [0, 1])])) as d:
        d.wait_state("chat", "ready")
        heat(tmp_path, gpu1={"temperature_c": 90})
        wait_until(lambda: d.service("chat")["drain_reasons"] == ["thermal"], 5, what="paused")
        heat(tmp_path, gpu0={"temperature_c": 90}, gpu1={"temperature_c": 90})
        wait_until(lambda: gpu(d, 0)["thermal_state"] == "critical", 5, what="GPU0 critical")
        heat(tmp_path, gpu0={"temperature_c": 70}, gpu1={"temperature_c": 90})
        wait_until(lambda: gpu(d, 0)["thermal_state"] == "ok", 5, what="GPU0 cooled")
        stays(lambda: d.service("chat")["drain_reasons"] == ["thermal"], 1.5,
              "the gate stays closed while GPU1 is critical")
        heat(tmp_path, gpu0={"temperature_c": 70}, gpu1={"temperature_c": 70})
        wait_until(lambda: d.service("chat")["drain_reasons"] == [], 5, what="reopened")
        assert d.service("chat")["state"] == "ready"


def test_drain_restart_and_lost_wait_for_every_gpu_of_the_service(tmp_path: Path) -> None:
    doc = config(tmp_path, [fake_service("a", free_port(), gpus=[0, 1])],
                 on_critical="drain-restart")
    with running(tmp_path, doc) as d:
        d.wait_state("a", "ready")
        heat(tmp_path, gpu1={"temperature_c": 90})
        wait_until(lambda: d.service("a")["holds"] == ["cooling"], 5, what="held: cooling")
        heat(tmp_path, gpu0={"temperature_c": 90}, gpu1={"temperature_c": 90})
        wait_until(lambda: gpu(d, 0)["thermal_state"] == "critical", 5, what="GPU0 critical")
        heat(tmp_path, gpu0={"temperature_c": 70}, gpu1={"temperature_c": 90})
        wait_until(lambda: gpu(d, 0)["thermal_state"] == "ok", 5, what="GPU0 cooled")
        stays(lambda: d.service("a")["state"] == "stopped", 1.5, "not started on a hot GPU1")
        # the same with lost GPUs: GPU1 (critical) then GPU0 drop off; GPU0 comes back first;
        # the heat of a lost GPU is unknown: the cooling hold stays until it is read again
        heat(tmp_path, gpu0={"temperature_c": 70}, gpu1={"lost": True})
        wait_until(lambda: d.service("a")["holds"] == ["cooling", "gpu_lost"], 5,
                   what="held: gpu_lost, and still cooling")
        heat(tmp_path, gpu0={"lost": True}, gpu1={"lost": True})
        wait_until(lambda: gpu(d, 0)["thermal_state"] == "lost", 5, what="GPU0 lost")
        heat(tmp_path, gpu0={"temperature_c": 60}, gpu1={"lost": True})
        wait_until(lambda: gpu(d, 0)["thermal_state"] == "ok", 5, what="GPU0 back")
        stays(lambda: d.service("a")["state"] == "stopped", 1.5, "not started on a lost GPU1")
        r = d.llmctl("start", "a")  # taken, and the operator is told why nothing happens
        assert r.returncode == 0 and ("a: stopped (held: cooling, gpu_lost; starts when "
                                      "released)" in r.stdout), (r.stdout, r.stderr)
        heat(tmp_path, gpu0={"temperature_c": 60}, gpu1={"temperature_c": 60})
        d.wait_state("a", "ready", 15)
        assert d.service("a")["holds"] == []


def test_a_critical_gpu_lost_and_back_still_hot_starts_nothing(tmp_path: Path) -> None:
    """Held cooling on a critical GPU; the GPU drops off and comes back as hot: the service is
    not launched between (the guard waits for a reading of the GPU that came back)."""
    doc = config(tmp_path, [fake_service("a", free_port(), gpus=[0])],
                 on_critical="drain-restart")
    with running(tmp_path, doc) as d:
        d.wait_state("a", "ready")
        heat(tmp_path, gpu0={"temperature_c": 95})
        wait_until(lambda: d.service("a")["holds"] == ["cooling"], 5, what="held: cooling")
        heat(tmp_path, gpu0={"temperature_c": 95, "lost": True})
        wait_until(lambda: gpu(d, 0)["thermal_state"] == "lost", 5, what="GPU0 lost")
        assert d.status()["supervisor"]["mode"] == "throttled"  # lost hot: still throttled
        heat(tmp_path, gpu0={"temperature_c": 95})
        wait_until(lambda: gpu(d, 0)["thermal_state"] == "critical", 5, what="back, critical")
        # the guard lets go of gpu_lost once it has acted on that reading (the status may show
        # the reading first); stopped all the while, cooling holds it from then on
        wait_until(lambda: (s := d.service("a"))["state"] == "stopped"
                   and s["holds"] == ["cooling"], 5, what="only cooling holds it")
        stays(lambda: d.service("a")["holds"] == ["cooling"]
              and d.service("a")["state"] == "stopped", 1.5, "held, not started")
        assert "launched pid" not in d.logtext().split("GPU0 (")[-1]
        heat(tmp_path, gpu0={"temperature_c": 60})
        d.wait_state("a", "ready", 15)


def test_on_critical_stop_holds_what_is_not_running(tmp_path: Path) -> None:
    """`stop` fails a running service; one not running (held for a lost GPU) is held cooling
    instead of being started on the critical GPU and failed."""
    doc = config(tmp_path, [fake_service("a", free_port(), gpus=[0, 1])], on_critical="stop")
    with running(tmp_path, doc) as d:
        d.wait_state("a", "ready")
        heat(tmp_path, gpu0={"lost": True})
        wait_until(lambda: d.service("a")["holds"] == ["gpu_lost"], 5, what="held: gpu_lost")
        heat(tmp_path, gpu0={"lost": True}, gpu1={"temperature_c": 95})
        wait_until(lambda: d.service("a")["holds"] == ["cooling", "gpu_lost"], 5,
                   what="held cooling too")
        heat(tmp_path, gpu0={"temperature_c": 60}, gpu1={"temperature_c": 95})
        wait_until(lambda: d.service("a")["holds"] == ["cooling"], 5, what="back: cooling")
        stays(lambda: d.service("a")["state"] == "stopped", 1.5, "not started, not failed")
        heat(tmp_path, gpu0={"temperature_c": 60}, gpu1={"temperature_c": 60})
        d.wait_state("a", "ready", 15)


def test_a_lowered_limit_comes_back_after_the_gpu_was_lost(tmp_path: Path) -> None:
    doc = config(tmp_path, [fake_service("a", free_port(), gpus=[0])])
    with running(tmp_path, doc) as d:
        d.wait_state("a", "ready")
        heat(tmp_path, gpu0={"temperature_c": 86})
        wait_until(lambda: limits_file(tmp_path).get(GPU0) == 240, 10, what="240 W")
        heat(tmp_path, gpu0={"temperature_c": 86, "lost": True})
        wait_until(lambda: gpu(d)["thermal_state"] == "lost", 5, what="lost")
        heat(tmp_path, gpu0={"temperature_c": 70})
        wait_until(lambda: limits_file(tmp_path).get(GPU0) == 300, 5, what="restored, cool")
        wait_until(lambda: json.loads((tmp_path / "state" / "power_limits.json").read_text())
                   == {}, 5, what="record cleared")
        # lost again while throttled, and back hot: the steps start again from 300 W
        heat(tmp_path, gpu0={"temperature_c": 86})
        # (240 W, or further down: a step refused while the previous call still ran is taken
        # at the next evaluation, from where the heat is then)
        wait_until(lambda: limits_file(tmp_path).get(GPU0, 300) <= 240, 10,
                   what="240 W again, or lower")
        heat(tmp_path, gpu0={"lost": True})
        wait_until(lambda: gpu(d)["thermal_state"] == "lost", 5, what="lost")
        heat(tmp_path, gpu0={"temperature_c": 86})
        wait_until(lambda: gpu(d)["thermal_state"] == "throttled", 5, what="back, throttled")
        assert gpu(d)["power_limit_before_w"] == 300
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 0
    assert limits_file(tmp_path)[GPU0] == 300


def test_a_reload_that_moves_a_paused_service_reopens_it(tmp_path: Path) -> None:
    doc = config(tmp_path, [gated("chat", [0])])
    with running(tmp_path, doc) as d:
        d.wait_state("chat", "ready")
        heat(tmp_path, gpu0={"temperature_c": 90})
        wait_until(lambda: d.service("chat")["drain_reasons"] == ["thermal"], 5, what="paused")
        wait_until(lambda: d.service("chat")["max_concurrency"] < 10, 5, what="factor down")
        doc["service"][0]["gpus"] = [1]
        d.write(doc)
        assert d.llmctl("reload").returncode == 0
        wait_until(lambda: d.service("chat")["drain_reasons"] == [], 10, what="reopened")
        wait_until(lambda: d.service("chat")["max_concurrency"] == 10, 5, what="factor 1")
        d.wait_state("chat", "ready")


def test_reset_while_still_critical_stops_it_again(tmp_path: Path) -> None:
    doc = config(tmp_path, [fake_service("chat", free_port(), gpus=[0])], on_critical="stop")
    with running(tmp_path, doc) as d:
        d.wait_state("chat", "ready")
        heat(tmp_path, gpu0={"temperature_c": 90})
        d.wait_state("chat", "failed", 10)
        assert d.llmctl("reset", "chat").returncode == 0
        wait_until(lambda: d.service("chat")["state"] == "failed"
                   and d.service("chat")["pid"] is None, 10, what="failed again")
        heat(tmp_path, gpu0={"temperature_c": 70})
        wait_until(lambda: gpu(d)["thermal_state"] == "ok", 5, what="cooled")
        assert d.service("chat")["state"] == "failed"  # stop means: the operator decides
        assert d.llmctl("reset", "chat").returncode == 0
        d.wait_state("chat", "ready")


def test_a_gpu_that_keeps_dropping_off_spends_the_restart_budget(tmp_path: Path) -> None:
    svc = fake_service("a", free_port(), gpus=[0])
    svc["restart"] = {"max_restarts": 3, "window_s": 60, "backoff_initial_s": 0.2}
    with running(tmp_path, config(tmp_path, [svc])) as d:
        d.wait_state("a", "ready")
        end = time.monotonic() + 20
        while d.service("a")["state"] != "failed" and time.monotonic() < end:
            heat(tmp_path, gpu0={"lost": True})
            time.sleep(0.4)
            heat(tmp_path, gpu0={"temperature_c": 50})
            time.sleep(0.4)
        s = d.service("a")
        assert s["state"] == "failed", s
        assert "restarts within 60 s" in (s.get("failed_reason") or d.logtext())
        assert d.logtext().count("lost:") <= 12  # bounded


def test_a_limit_that_cannot_be_recorded_is_not_lowered(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "state" / "power_limits.json").mkdir()
    doc = config(tmp_path, [gated("chat", [0])])
    with running(tmp_path, doc) as d:
        d.wait_state("chat", "ready")
        heat(tmp_path, gpu0={"temperature_c": 86})
        wait_until(lambda: d.service("chat")["max_concurrency"] <= 8, 10, what="admission")
        assert limits_file(tmp_path).get(GPU0, 300) == 300
        assert gpu(d)["power_target_w"] is None
        assert "limit to restore could not be recorded" in d.logtext()


def test_records_for_absent_gpus_are_kept_and_operator_limits_left_alone(
        tmp_path: Path) -> None:
    absent = SIM_UUID.format(7)
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    (state / "power_limits.json").write_text(json.dumps({
        absent: {"before": 350, "set": [300]},
        GPU0: {"before": 300, "set": [240, 210]},  # the operator set 280 meanwhile
        GPU1: 300,  # the older format
    }))
    (tmp_path / "sim.json.limits.json").write_text(json.dumps({GPU0: 280, GPU1: 270}))
    doc = config(tmp_path, [fake_service("a", free_port(), gpus=[0])])
    with running(tmp_path, doc) as d:
        d.wait_state("a", "ready")
        wait_until(lambda: limits_file(tmp_path).get(GPU1) == 300, 5, what="GPU1 restored")
        assert limits_file(tmp_path)[GPU0] == 280
        left = json.loads((state / "power_limits.json").read_text())
        assert list(left) == [absent] and left[absent]["before"] == 350
        text = d.logtext()
        assert "not one the supervisor set" in text and "kept, to restore when it is" in text


def test_a_swinging_sensor_does_not_flap_the_gate(tmp_path: Path) -> None:
    doc = config(tmp_path, [gated("chat", [0])], step_interval_s=1.0)
    with running(tmp_path, doc) as d:
        d.wait_state("chat", "ready")
        for i in range(30):
            heat(tmp_path, gpu0={"temperature_c": 100 if i % 2 else 20})
            time.sleep(0.1)
        heat(tmp_path, gpu0={"temperature_c": 20})
        wait_until(lambda: d.service("chat")["drain_reasons"] == [], 10, what="reopened")
        text = d.logtext()
        assert text.count("paused (gate closed") == 1, text
        assert text.count("-> critical") == 1


def test_swinging_between_hot_and_cool_only_steps_down(tmp_path: Path) -> None:
    doc = config(tmp_path, [gated("chat", [0])])
    with running(tmp_path, doc) as d:
        d.wait_state("chat", "ready")
        seen: list[float] = []
        for i in range(40):
            heat(tmp_path, gpu0={"temperature_c": 86 if i % 2 else 78})
            time.sleep(0.1)
            w = gpu(d)["power_limit_w"]
            if w is not None and (not seen or seen[-1] != w):
                seen.append(w)
        assert seen == sorted(seen, reverse=True), seen
        heat(tmp_path, gpu0={"temperature_c": 60})
        wait_until(lambda: gpu(d)["power_limit_w"] == 300, 15, what="restored")
        port = d.doc["metrics"]["listen"].rsplit(":", 1)[1]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                      timeout=5).read().decode()
        counts = {a: 0.0 for a in ("admission_down", "admission_up", "power_down", "power_up")}
        for line in text.splitlines():
            for a in counts:
                if line.startswith("llm_supervisor_gpu_throttle_actions_total") \
                        and f'action="{a}"' in line and f'uuid="{GPU0}"' in line:
                    counts[a] = float(line.rsplit(" ", 1)[1])
        assert counts["admission_down"] == counts["admission_up"] > 0, counts
        assert counts["power_down"] == counts["power_up"] > 0, counts



def _slow(name: str, gpus: list[int]) -> dict[str, Any]:
    svc = gated(name, gpus, drain_timeout_s=1)
    svc["command"] += ["--load-s", "6"]
    svc["health"]["startup_timeout_s"] = 60
    return svc


def _ops(d: Any) -> list[str]:
    return list(d.status()["supervisor"].get("operations") or [])


def _critical_and_lost(tmp_path: Path, d: Any, when: str) -> float:
    """GPU0 critical, GPU1 lost: how long until a (GPU0) is held cooling, b (GPU1) gpu_lost."""
    heat(tmp_path, gpu0={"temperature_c": 90}, gpu1={"lost": True})
    t0 = time.monotonic()
    wait_until(lambda: "cooling" in d.service("a")["holds"]
               and "gpu_lost" in d.service("b")["holds"], 10, what=f"held {when}")
    return time.monotonic() - t0


def test_protective_holds_go_ahead_of_a_slow_swap_and_a_slow_reload(tmp_path: Path) -> None:
    """A GPU that goes critical and another that is lost while the operator's swap or reload
    runs: the holds land at once (a swap of a held service is pre-empted), never refused as
    busy and retried after the operation."""
    import subprocess
    import sys
    doc = config(tmp_path, [_slow("a", [0]), gated("b", [1])], on_critical="drain-restart")
    with running(tmp_path, doc) as d:
        d.wait_state("a", "ready", 30)
        d.wait_state("b", "ready")
        swap = subprocess.Popen([sys.executable, "-m", "supervisord_llm.ctl", "--socket",
                                 d.socket, "swap", "a", "--timeout", "60"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: any("swap of a" in op for op in _ops(d)), 10, what="swap running")
        took = _critical_and_lost(tmp_path, d, "during a swap")
        _out, err = swap.communicate(timeout=30)
        assert swap.returncode == 1 and "cancelled" in err, err
        assert took < 5.0, f"the holds waited {took:.1f} s (behind the swap?)"
        assert "pre-empted" in d.logtext()
        wait_until(lambda: d.service("a")["pid"] is None, 10, what="a stopped")
        heat(tmp_path, gpu0={"temperature_c": 50}, gpu1={"temperature_c": 50})
        d.wait_state("a", "ready", 30)
        d.wait_state("b", "ready", 15)
        # a slow reload: a changed gated service is hot-swapped, its new instance loading
        doc["service"][0]["env"] = {"CHANGED": "1"}
        d.write(doc)
        reload = subprocess.Popen([sys.executable, "-m", "supervisord_llm.ctl", "--socket",
                                   d.socket, "reload"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: any("reload" in op for op in _ops(d)), 10, what="reload running")
        took = _critical_and_lost(tmp_path, d, "during a reload")
        reload.communicate(timeout=90)
        assert took < 5.0, f"the holds waited {took:.1f} s (behind the reload?)"
        # whatever the reload did, nothing runs on the critical and the lost GPU
        wait_until(lambda: d.service("a")["pid"] is None and d.service("b")["pid"] is None,
                   15, what="nothing left running on them")
        stays(lambda: d.service("a")["pid"] is None, 1.0, "a stays down while critical")
        heat(tmp_path, gpu0={"temperature_c": 50}, gpu1={"temperature_c": 50})
        d.wait_state("a", "ready", 30)
        d.wait_state("b", "ready", 15)
