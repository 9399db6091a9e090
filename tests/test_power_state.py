"""Power safety across time and crashes: the grace on its own clock with `source = "none"`, the
power state kept in `state_dir` over a kill -9, a real upsd's FSD that stays after the power
returns (an aborted shutdown) and the operator's override, and a damaged record of the power
limits. The daemon runs as a real process; the UPS is a real upsd + dummy-ups."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from nutserver import NutServer, require_nut

from helpers import (
    SIM_UUID,
    Daemon,
    base_config,
    fake_service,
    free_port,
    gated,
    running,
    stays,
    wait_until,
)

GPU0, GPU1 = SIM_UUID.format(0), SIM_UUID.format(1)


def none_config(tmp: Path, **power: Any) -> dict[str, Any]:
    return base_config(tmp, [gated("chat", gpus=[0], drain_timeout_s=5)], gpus=2, power={
        "source": "none", "drain_timeout_s": 2, "stop_timeout_s": 5, **power})


def mode(d: Daemon) -> str:
    return str(d.status()["supervisor"]["mode"])


def limits(tmp: Path) -> list[float]:
    path = tmp / "sim.json.limits.json"
    got = json.loads(path.read_text()) if path.exists() else {}
    return [got.get(GPU0, 300.0), got.get(GPU1, 300.0)]

def kill9(d: Daemon) -> None:
    d.signal(signal.SIGKILL)
    d.wait(10)
    d.stop()  # closes the log, kills what the killed daemon left (its guardian does too)


# --- source = "none": the grace on its own clock, the state over a kill -9 -----------------


def test_the_grace_runs_out_without_another_event(tmp_path: Path) -> None:
    with running(tmp_path, none_config(tmp_path, on_battery_grace_s=1)) as d:
        d.wait_state("chat", "ready")
        assert d.llmctl("power-event", "ONBATT").returncode == 0
        assert mode(d) == "on_battery"
        wait_until(lambda: mode(d) == "powered_down", 10, what="powered down at the grace")
        st = d.service("chat")
        assert st["state"] == "stopped" and st["holds"] == ["powered_down"]
        assert "on battery for 1." in d.status()["power"]["power_down"]["reason"]


def test_a_daemon_killed_while_powered_down_comes_back_held(tmp_path: Path) -> None:
    doc = none_config(tmp_path, on_battery_grace_s=600)
    d = Daemon(tmp_path, doc).start()
    try:
        d.wait_state("chat", "ready")
        assert d.llmctl("power-event", "on-battery").returncode == 0
        assert d.llmctl("power-event", "low-battery").returncode == 0
        wait_until(lambda: mode(d) == "powered_down", 10, what="powered down")
        wait_until(lambda: power_state(tmp_path)
                   .get("phase") == "powered_down", 5, what="recorded")
        kill9(d)
        d = Daemon(tmp_path, doc).start()
        wait_until(lambda: mode(d) == "powered_down", 10, what="held at start")
        stays(lambda: d.service("chat")["holds"] == ["powered_down"], 1.0, "still held")
        assert d.service("chat")["state"] == "stopped"
        assert "only an on-line event says the power is back" in d.logtext()
        assert d.llmctl("power-event", "on-line").returncode == 0
        d.wait_state("chat", "ready", 15)
        assert mode(d) == "normal"
        wait_until(lambda: power_state(tmp_path)
                   .get("phase") == "online", 5, what="recorded online")
    finally:
        d.stop()


def test_a_daemon_killed_on_battery_with_its_models_goes_on_with_the_episode(
        tmp_path: Path) -> None:
    """Killed during the grace, its model left running: the next daemon adopts the model and
    goes on with the episode (on battery, the ceiling on, the grace again), not a hold at
    start that would stop the model without a drain; a low battery then powers down."""
    doc = none_config(tmp_path, on_battery_grace_s=600)
    d = Daemon(tmp_path, doc).start()
    try:
        pid = d.wait_state("chat", "ready")["pid"]
        assert d.llmctl("power-event", "on-battery").returncode == 0
        wait_until(lambda: power_state(tmp_path)
                   .get("phase") == "on_battery", 5, what="recorded")
        d.crash()
        d.pids_seen.clear()
    finally:
        d.stop()
    with running(tmp_path, doc) as d2:
        svc = d2.wait_state("chat", "ready")
        assert svc["pid"] == pid and svc["adopted"]
        assert mode(d2) == "on_battery"
        assert "its models were adopted" in d2.logtext()
        wait_until(lambda: limits(tmp_path)[0] < 300.0, 10, what="the battery ceiling")
        assert d2.llmctl("power-event", "low-battery").returncode == 0
        wait_until(lambda: mode(d2) == "powered_down", 15, what="powered down")
        assert d2.service("chat")["holds"] == ["powered_down"]


def test_a_reload_during_the_grace_applies_the_new_grace(tmp_path: Path) -> None:
    doc = none_config(tmp_path, on_battery_grace_s=600)
    with running(tmp_path, doc) as d:
        d.wait_state("chat", "ready")
        r = d.llmctl("power-event", "on-battery")
        assert r.returncode == 0 and r.stdout.startswith("on-battery: applied"), r.stdout
        doc["power"]["on_battery_grace_s"] = 2
        d.write(doc)
        assert d.llmctl("reload").returncode == 0
        wait_until(lambda: mode(d) == "powered_down", 10, what="the new grace ran out")


def test_a_daemon_killed_while_capped_caps_again_when_it_comes_back_held(
        tmp_path: Path) -> None:
    doc = none_config(tmp_path, on_battery_grace_s=600)
    d = Daemon(tmp_path, doc).start()
    try:
        d.wait_state("chat", "ready")
        assert d.llmctl("power-event", "on-battery").returncode == 0
        wait_until(lambda: limits(tmp_path) == [180.0, 180.0], 5, what="capped")
        kill9(d)
        d = Daemon(tmp_path, doc).start()
        wait_until(lambda: mode(d) == "powered_down", 10, what="held at start")
        # restored from the record, then capped again: still on battery as far as we know
        wait_until(lambda: limits(tmp_path) == [180.0, 180.0], 10, what="capped again")
        assert d.llmctl("power-event", "on-line").returncode == 0
        wait_until(lambda: limits(tmp_path) == [300.0, 300.0], 10, what="restored")
        d.wait_state("chat", "ready", 15)
    finally:
        d.stop()


def test_a_record_of_another_boot_or_a_damaged_one_holds_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    record = state / "power_state.json"
    record.write_text(json.dumps({"boot_id": "not-this-boot", "phase": "powered_down",
                                  "believed": "low_battery", "forced": False,
                                  "override": False}))
    doc = none_config(tmp_path)
    with running(tmp_path, doc) as d:
        d.wait_state("chat", "ready")
        assert "the machine has restarted since: taken as the power back" in d.logtext()
    record.write_text('{"phase": "powered_do')
    with running(tmp_path, doc) as d:
        d.wait_state("chat", "ready")
        assert "power_state.json is not valid JSON" in d.logtext()


def test_on_battery_a_swap_replaces_and_a_service_made_always_waits_for_the_power(
        tmp_path: Path) -> None:
    """Within the grace, a hot swap replaces what runs (its replacement is not held as if a
    reload had added it); an on-demand service that a reload makes `always` is loaded when the
    power is back, as an added one would be."""
    doc = none_config(tmp_path, on_battery_grace_s=600)
    doc["service"].append(gated("od", gpus=[1], service={"start": "on-demand"}))
    with running(tmp_path, doc) as d:
        d.wait_state("chat", "ready")
        assert d.llmctl("power-event", "on-battery").returncode == 0
        assert mode(d) == "on_battery"
        old = d.service("chat")["pid"]
        r = d.llmctl("swap", "chat")
        assert r.returncode == 0, (r.stdout, r.stderr)
        st = d.service("chat")
        assert st["state"] == "ready" and st["pid"] != old and st["holds"] == [], st
        doc["service"][1]["start"] = "always"
        d.write(doc)
        r = d.llmctl("reload")
        assert r.returncode == 0, (r.stdout, r.stderr)
        stays(lambda: d.service("od")["holds"] == ["idle"], 1.5, "not loaded on battery")
        assert d.llmctl("power-event", "on-line").returncode == 0
        d.wait_state("od", "ready", 15)
        assert d.service("od")["holds"] == []


# --- a real upsd's FSD, which stays after the power returns ---------------------------------


@pytest.fixture
def ups(tmp_path: Path) -> Iterator[NutServer]:
    require_nut()
    with NutServer(tmp_path / "nut", users={"upsmon": "pw"}, primaries=("upsmon",)) as server:
        yield server


def nut_config(tmp: Path, ups: NutServer, **power: Any) -> dict[str, Any]:
    return base_config(tmp, [gated("chat", gpus=[0], drain_timeout_s=5)], gpus=2, power={
        "source": "nut", "ups": ups.ups, "poll_interval_s": 0.2, "on_battery_grace_s": 60,
        "deadtime_s": 2, "low_runtime_s": 60, "drain_timeout_s": 2, "stop_timeout_s": 5,
        **power})


def test_fsd_ol_long_after_the_power_down_is_an_aborted_shutdown(
        tmp_path: Path, ups: NutServer) -> None:
    with running(tmp_path, nut_config(tmp_path, ups, fsd_stale_s=2)) as d:
        d.wait_state("chat", "ready")
        assert ups.fsd("upsmon", "pw") == "OK FSD-SET"  # a primary upsmon powers off ...
        ups.wait_status("FSD OL")
        wait_until(lambda: mode(d) == "powered_down", 10, what="powered down by FSD")
        # ... and the machine stays up: upsd keeps FSD OL; after fsd_stale_s they come back
        d.wait_state("chat", "ready", 15)
        p = d.status()["power"]
        assert p["override"]["by"] == "fsd_stale_s" and p["status"] == "FSD OL"
        assert "the shutdown did not happen" in d.logtext()
        stays(lambda: mode(d) == "normal", 1.0, "no new power-down from the same flag")
        # a new cut while the flag still stands powers down at once
        ups.set(status="OB DISCHRG")
        ups.wait_status("FSD OB DISCHRG")
        wait_until(lambda: mode(d) == "powered_down", 10, what="powered down at once")


def test_the_operator_override_always_brings_them_back(tmp_path: Path, ups: NutServer) -> None:
    assert ups.fsd("upsmon", "pw") == "OK FSD-SET"
    ups.wait_status("FSD OL")
    doc = nut_config(tmp_path, ups)  # fsd_stale_s 300: only the operator, in this test
    with running(tmp_path, doc) as d:
        wait_until(lambda: mode(d) == "powered_down", 10, what="held at start on FSD OL")
        assert d.service("chat")["holds"] == ["powered_down"]
        assert limits(tmp_path) == [300.0, 300.0]  # on line: no battery cap
        r = d.llmctl("--json", "power-event", "on-line")  # refused: upsd says FSD
        assert r.returncode == 0 and json.loads(r.stdout)["event"]["applied"] is False
        assert "--force" in json.loads(r.stdout)["event"]["why"]
        r = d.llmctl("power-event", "fsd", "--force")
        assert r.returncode == 2 and "on-line only" in r.stderr
        r = d.llmctl("--json", "power-event", "on-line", "--force")
        assert r.returncode == 0, r.stderr
        event = json.loads(r.stdout)["event"]
        assert event["applied"] is True and event["forced"] is True
        d.wait_state("chat", "ready", 15)
        assert d.status()["power"]["override"]["by"] == "operator"
        assert "override: FSD not believed, by the operator" in d.llmctl("status").stdout
        assert "operator override" in d.logtext()
        stays(lambda: mode(d) == "normal", 1.0, "upsd's standing FSD is not believed")
        # the driver gone while the flag stands: upsd says nothing about the line, which is no
        # reason to stop anything
        ups.kill_driver()
        wait_until(lambda: d.status()["power"]["state"] in ("unknown", "unreachable"), 10,
                   what="no data")
        stays(lambda: mode(d) == "normal", 1.5, "no power-down for a driver gone")
        ups.start_driver()
        ups.wait_status("FSD OL")
        # a restart of the daemon keeps the override while upsd keeps its flag
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 0
        d.stop()
    with running(tmp_path, doc) as d2:
        d2.wait_state("chat", "ready", 15)
        # upsd and its driver restarted (upsd passed its flag on to the new driver above):
        # the flag is gone, and so is the override
        ups.kill_upsd()
        ups.kill_driver()
        ups.start_driver()
        ups.start_upsd()
        ups.wait_status("OL")
        wait_until(lambda: d2.status()["power"]["override"] is None, 10, what="override ended")
        assert "the override has ended" in d2.logtext()


# --- a damaged record of the power limits -------------------------------------------------


DAMAGED = {
    "list": "[]", "empty": "", "truncated": '{"' + GPU0 + '": {"before": 30',
    "nan": "NaN", "string": '"300"',
    "directory": None, "fifo": None,
}


@pytest.mark.parametrize("kind", list(DAMAGED))
def test_a_damaged_limits_record_sends_the_gpus_back_to_their_default(
        tmp_path: Path, kind: str) -> None:
    import os
    state = tmp_path / "state"
    state.mkdir()
    record = state / "power_limits.json"
    if kind == "directory":
        record.mkdir()
    elif kind == "fifo":
        os.mkfifo(record)
    else:
        record.write_text(DAMAGED[kind] or "")
    # what an on-battery cap left on the boards when the daemon was killed
    (tmp_path / "sim.json.limits.json").write_text(json.dumps({GPU0: 180, GPU1: 180}))
    with running(tmp_path, none_config(tmp_path)) as d:
        d.wait_state("chat", "ready")
        wait_until(lambda: limits(tmp_path) == [300.0, 300.0], 10, what="defaults back")
        text = d.logtext()
        assert text.count("power_limits.json") >= 1 and "cannot be trusted" in text
        assert text.count("go back to their board's default power limit") == 1
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 0
    assert limits(tmp_path) == [300.0, 300.0]


def test_one_bad_entry_loses_none_of_the_good_ones(tmp_path: Path) -> None:
    absent = SIM_UUID.format(7)
    state = tmp_path / "state"
    state.mkdir()
    (state / "power_limits.json").write_text(json.dumps({
        absent: {"before": 350, "set": [300]},  # a GPU not here now: kept
        GPU0: {"before": "HUGE"},  # damaged: back to the default
        GPU1: {"before": 290, "set": [200]},  # good: restored to its own value
    }).replace('"HUGE"', "1" + "0" * 400))
    (tmp_path / "sim.json.limits.json").write_text(json.dumps({GPU0: 180, GPU1: 200}))
    with running(tmp_path, none_config(tmp_path)) as d:
        d.wait_state("chat", "ready")
        wait_until(lambda: limits(tmp_path) == [300.0, 290.0], 10, what="restored")
        assert "has a damaged entry for " + GPU0 in d.logtext()
        left = json.loads((state / "power_limits.json").read_text())
        assert list(left) == [absent] and left[absent] == {"before": 350.0, "set": [300.0]}


def test_a_power_down_cut_by_a_crash_goes_on_from_its_recorded_step(tmp_path: Path) -> None:
    """Killed in the middle of the power-down (its checkpoint done, the stop under way: the
    model ignores SIGTERM), the model left: the next daemon adopts it and goes on; the
    checkpoint is not run again; the model is stopped and held."""
    runs = tmp_path / "checkpoint.runs"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\necho run >> {runs}\n")
    hook.chmod(0o755)
    doc = base_config(tmp_path, [fake_service("chat", free_port(), "--ignore-term", gpus=[0],
                                              stop={"timeout_s": 30})],
                      gpus=2, power={"source": "none", "drain_timeout_s": 1,
                                     "stop_timeout_s": 30, "on_battery_grace_s": 600},
                      checkpoint=[{"name": "store", "kind": "command",
                                   "command": [str(hook)], "timeout_s": 10}])
    d = Daemon(tmp_path, doc).start()
    try:
        pid = d.wait_state("chat", "ready")["pid"]
        assert d.llmctl("power-event", "on-battery").returncode == 0
        assert d.llmctl("power-event", "low-battery").returncode == 0
        wait_until(lambda: power_state(tmp_path)
                   .get("steps_done") == ["drain", "checkpoint"], 15, what="checkpoint done")
        wait_until(lambda: d.service("chat")["state"] == "stopping", 10, what="stopping")
        d.crash()
        d.pids_seen.clear()
    finally:
        d.stop()
    assert runs.read_text().count("run") == 1
    doc["service"][0]["stop"] = {"timeout_s": 1}  # (the next daemon's: the kill comes sooner)
    with running(tmp_path, doc) as d2:
        wait_until(lambda: mode(d2) == "powered_down", 30, what="powered down")
        assert d2.service("chat")["holds"] == ["powered_down"]
        assert "not run again" in d2.logtext()
    assert runs.read_text().count("run") == 1
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def power_state(tmp: Path) -> dict[str, Any]:
    """The daemon's power state file; empty until it is first written (a wait reads it
    before the daemon has: a loaded run found none yet)."""
    path = tmp / "state" / "power_state.json"
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return doc
