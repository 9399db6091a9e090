"""Models outlive the supervisor (issue: a restart, an upgrade or a crash of the daemon reloads
no model), with the real daemon and fake engines that count their own starts: kill -9 under
streaming load, a watchdog-like kill (SIGABRT), a daemon that never comes back, a hand-over,
a stop that leaves nothing, a changed config, lease hygiene, a keeper of another protocol."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from helpers import (
    Daemon,
    Streams,
    alive,
    base_config,
    fake_service,
    free_port,
    gated,
    running,
    stays,
    toml_dumps,
    wait_until,
)
from supervisord_llm import keep
from supervisord_llm.config import parse_config
from supervisord_llm.plan import resolve_plan
from supervisord_llm.service import launch_spec
from supervisord_llm.spawn import Spawner

ROOT = Path(__file__).resolve().parent.parent
KEEPER = ROOT / "supervisord_llm" / "_keeper.py"


def counted(tmp: Path, name: str, *knobs: str, **extra: Any) -> dict[str, Any]:
    return fake_service(name, free_port(), "--starts", str(tmp / f"{name}.starts"), *knobs,
                        **extra)


def starts(tmp: Path, name: str) -> list[int]:
    path = tmp / f"{name}.starts"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def keepers_of(state: Path) -> list[int]:
    out = []
    for f in (state / "keep").glob("*/state.json"):
        try:
            out.append(int(json.loads(f.read_text())["keeper_pid"]))
        except (OSError, ValueError, KeyError):
            continue
    return out


def crashed(tmp: Path, doc: dict[str, Any], service: str = "alpha") -> int:
    """A daemon that runs `service` and then dies as in a crash (its guardian too), its
    model left for the next one: the model's pid."""
    d = Daemon(tmp, doc).start()
    try:
        pid = int(d.wait_state(service, "ready")["pid"])
        d.crash()
        d.pids_seen.clear()  # d.stop() must not clean up what the next daemon is to find
    finally:
        d.stop()
    return pid


def test_kill_9_under_streaming_load_reloads_no_model(tmp_path: Path) -> None:
    """kill -9 of the daemon while 16 streams run on each model: no stream is cut, no model
    restarts (same pid, one start each), and the next daemon shows both adopted and ready."""
    doc = base_config(tmp_path, [counted(tmp_path, "alpha"), counted(tmp_path, "beta")])
    d = Daemon(tmp_path, doc).start()
    try:
        a, b = d.wait_state("alpha", "ready"), d.wait_state("beta", "ready")
        streams = [Streams(s["port"], 16, 40, 0.05, "fake") for s in (a, b)]  # to the engines
        time.sleep(0.5)
        d.crash()
        d.pids_seen.clear()
    finally:
        d.stop()
    with running(tmp_path, doc) as d2:
        for name, before in (("alpha", a), ("beta", b)):
            svc = d2.wait_state(name, "ready")
            assert svc["pid"] == before["pid"] and svc["adopted"] is True, svc
            assert starts(tmp_path, name) == [before["pid"]]
        for s in streams:
            s.join(30)
            assert (s.done, s.cut) == (16, 0)
        status = d2.call("status")
        assert [x["adopted"] for x in status["services"]] == [True, True]
        url = f"http://{doc['metrics']['listen']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            metrics = r.read().decode()
        assert "llm_supervisor_adoptions_total 2.0" in metrics
        reattach = [float(line.split()[1]) for line in metrics.splitlines()
                    if line.startswith("llm_supervisor_reattach_seconds ")]
        assert len(reattach) == 1 and 0 < reattach[0] < 30


def test_a_watchdog_kill_reloads_no_model(tmp_path: Path) -> None:
    """SIGABRT (what systemd's watchdog sends) is a crash like any other."""
    doc = base_config(tmp_path, [counted(tmp_path, "alpha")])
    d = Daemon(tmp_path, doc).start()
    try:
        pid = d.wait_state("alpha", "ready")["pid"]
        assert d.proc is not None
        d.proc.send_signal(signal.SIGABRT)
        d.proc.wait(10)
        d.pids_seen.clear()
    finally:
        d.stop()
    assert_adopted(tmp_path, doc, pid)


def assert_adopted(tmp: Path, doc: dict[str, Any], pid: int) -> None:
    with running(tmp, doc) as d2:
        svc = d2.wait_state("alpha", "ready")
        assert svc["pid"] == pid and svc["adopted"] and starts(tmp, "alpha") == [pid]


def test_handover_leaves_the_models_to_the_next_daemon(tmp_path: Path) -> None:
    doc = base_config(tmp_path, [counted(tmp_path, "alpha")])
    d = Daemon(tmp_path, doc).start()
    try:
        pid = d.wait_state("alpha", "ready")["pid"]
        r = d.llmctl("handover")
        assert r.returncode == 0 and "handed over" in r.stdout and "alpha" in r.stdout, r
        assert d.wait(15) == 0
        assert alive(pid)
        d.pids_seen.clear()
    finally:
        d.stop()
    with running(tmp_path, doc) as d2:
        svc = d2.wait_state("alpha", "ready")
        assert svc["pid"] == pid and svc["adopted"] and starts(tmp_path, "alpha") == [pid]
        # a hand-over is refused while something runs that it would cut in half
        r = d2.llmctl("power-event", "on-battery")
        assert r.returncode == 0
        r = d2.llmctl("handover")
        assert r.returncode == 1 and "power" in r.stderr, r


def test_sigterm_stops_every_model_and_leaves_nothing(tmp_path: Path) -> None:
    doc = base_config(tmp_path, [counted(tmp_path, "alpha", "--grandchild", "--ignore-term",
                                         stop={"timeout_s": 1}),
                                 counted(tmp_path, "beta")])
    with running(tmp_path, doc) as d:
        d.wait_state("alpha", "ready")
        d.wait_state("beta", "ready")
        assert d.proc is not None
        procs = [p.pid for p in psutil.Process(d.proc.pid).children(recursive=True)]
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 0
        # when the daemon has exited, nothing of it is left: keepers, models, grandchildren
        assert [p for p in procs if alive(p)] == []
        assert keepers_of(tmp_path / "state") == []


def test_a_changed_launch_is_not_adopted(tmp_path: Path) -> None:
    """The config changed between the two daemons: the old instance is stopped first (its
    GPU memory is needed), the new one launched."""
    doc = base_config(tmp_path, [counted(tmp_path, "alpha")])
    pid = crashed(tmp_path, doc)
    doc["service"][0]["env"] = {"NEW": "1"}
    with running(tmp_path, doc) as d2:
        svc = d2.wait_state("alpha", "ready")
        assert svc["pid"] != pid and not svc["adopted"]
        assert not alive(pid)
        assert "its launch changed" in d2.logtext()


def test_the_lease_is_held_by_the_daemon_alone(tmp_path: Path) -> None:
    """Each keeper's lease is a pipe whose write end only the daemon holds: no model, no
    keeper, no helper inherits it (else a model would outlive a daemon gone for good)."""
    doc = base_config(tmp_path, [counted(tmp_path, "alpha", "--grandchild"),
                                 counted(tmp_path, "beta")])
    with running(tmp_path, doc) as d:
        d.wait_state("alpha", "ready")
        d.wait_state("beta", "ready")
        assert d.proc is not None
        daemon = d.proc.pid
        leases = []
        for keeper in keepers_of(tmp_path / "state"):
            leases.append(os.readlink(f"/proc/{keeper}/fd/3"))
        assert len(leases) == 2 and all(x.startswith("pipe:") for x in leases)
        holders: dict[str, set[int]] = {x: set() for x in leases}
        for pid in psutil.pids():
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with_link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if with_link in holders:
                        holders[with_link].add(pid)
            except OSError:
                continue
        keepers = set(keepers_of(tmp_path / "state"))
        for lease, pids in holders.items():
            assert pids - keepers == {daemon}, (lease, pids)


def test_a_keeper_of_another_protocol_keeps_serving_and_can_be_stopped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A keeper a release apart (its protocol not ours), launched as that release's daemon
    would: its model is adopted as it runs, shown outdated, stopped on request (the one
    thing every protocol takes); the restart gets a keeper of ours."""
    old_pkg = tmp_path / "old"
    old_pkg.mkdir()
    text = KEEPER.read_text().replace("\nPROTO = 1\n", "\nPROTO = 7\n")
    assert "PROTO = 7" in text
    (old_pkg / "_keeper.py").write_text(text)
    doc = base_config(tmp_path, [counted(tmp_path, "alpha")])
    plan = resolve_plan(parse_config(toml_dumps(doc)), [])[0]
    monkeypatch.setattr(keep, "_PKG", old_pkg)

    async def older_release() -> int:
        sp = Spawner(tmp_path / "state", use_guardian=False)
        proc = await sp.launch(launch_spec(plan, 1, plan.config.port, dict(os.environ)))
        sp.handover = True
        await sp.close()
        return proc.pid

    pid = asyncio.run(older_release())
    monkeypatch.undo()
    try:
        with running(tmp_path, doc) as d:
            svc = d.wait_state("alpha", "ready")
            assert svc["pid"] == pid and svc["adopted"] and svc["outdated"], svc
            assert "speaks protocol 7" in d.logtext()
            r = d.llmctl("restart", "alpha")
            assert r.returncode == 0, r.stderr
            svc = d.wait_state("alpha", "ready")
            assert svc["pid"] != pid and not svc["outdated"] and not alive(pid)
    finally:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def test_a_daemon_gone_for_good_with_an_escaped_grandchild(tmp_path: Path) -> None:
    """A grandchild that left the group and the session (setsid) and ignores SIGTERM is
    still below its keeper: stopped with the model when no daemon comes back."""
    pidfile = tmp_path / "pids"
    doc = base_config(tmp_path, [counted(tmp_path, "alpha", "--escape", "--ignore-term",
                                         "--pidfile", str(pidfile), stop={"timeout_s": 1})])
    doc["supervisor"]["adopt_grace_s"] = 1
    d = Daemon(tmp_path, doc).start()
    try:
        d.wait_state("alpha", "ready")
        wait_until(pidfile.exists, 5, what="pidfile")
        main, _gc, escaped = map(int, pidfile.read_text().split())
        assert os.getsid(escaped) != os.getsid(main)
        keeper_pids = keepers_of(tmp_path / "state")
        assert len(keeper_pids) == 1
        d.crash()
        d.pids_seen.clear()
        stays(lambda: alive(escaped), 0.3, "the model outlives the daemon for the grace")
        wait_until(lambda: not alive(main) and not alive(escaped), 10,
                   what="the model and its escaped grandchild gone")
        wait_until(lambda: not any(alive(p) for p in keeper_pids), 10, what="its keeper gone")
    finally:
        d.stop()


def test_the_operators_stops_drains_and_pins_survive_a_crash(tmp_path: Path) -> None:
    """What the operator decided holds across a crash of the daemon: a stopped service stays
    down, a drained gate stays closed, a pinned on-demand model stays pinned (adopted, not
    reloaded)."""
    doc = base_config(tmp_path, [
        counted(tmp_path, "stopped"),
        gated("drained", "--starts", str(tmp_path / "drained.starts")),
        gated("pinned", "--starts", str(tmp_path / "pinned.starts"),
              service={"start": "on-demand"}),
    ])
    d = Daemon(tmp_path, doc).start()
    try:
        d.wait_state("stopped", "ready")
        d.wait_state("drained", "ready")
        assert d.llmctl("stop", "stopped").returncode == 0
        assert d.llmctl("drain", "drained").returncode == 0
        r = d.llmctl("start", "pinned")
        assert r.returncode == 0, r.stderr
        pinned = d.wait_state("pinned", "ready")
        assert pinned["on_demand"]["pinned"] is True
        wait_until(lambda: json.loads((tmp_path / "state" / "services.json").read_text())
                   ["services"].get("pinned", {}).get("pinned"), 10, what="the ledger")
        d.crash()
        d.pids_seen.clear()
    finally:
        d.stop()
    with running(tmp_path, doc) as d2:
        d2.wait_ready()
        s = d2.wait_state("pinned", "ready")
        assert s["adopted"] and s["on_demand"]["pinned"] is True
        assert starts(tmp_path, "pinned") == [pinned["pid"]]
        s = d2.wait_state("drained", "draining")
        assert s["adopted"] and s["gate"] != "open"
        stays(lambda: d2.service("stopped")["state"] == "stopped", 1.0, "it stays down")
        assert d2.service("stopped")["holds"] == ["operator"]
        assert len(starts(tmp_path, "stopped")) == 1
        assert d2.llmctl("start", "stopped").returncode == 0
        d2.wait_state("stopped", "ready")
        assert d2.llmctl("resume", "drained").returncode == 0
        d2.wait_state("drained", "ready")


def test_a_broken_config_at_the_restart_leaves_nothing_after_the_grace(tmp_path: Path) -> None:
    """An upgrade that broke the config: the new daemon exits 1 and adopts nothing; the
    models the old one left stop after adopt_grace_s (plus their stop timeout)."""
    doc = base_config(tmp_path, [counted(tmp_path, "alpha", "--ignore-term",
                                         stop={"timeout_s": 1})])
    doc["supervisor"]["adopt_grace_s"] = 2
    d = Daemon(tmp_path, doc).start()
    try:
        pid = d.wait_state("alpha", "ready")["pid"]
        keepers = keepers_of(tmp_path / "state")
        d.crash()
        d.pids_seen.clear()
    finally:
        d.stop()
    broken = Daemon(tmp_path, doc)
    broken.config.write_text("[supervisor\n")
    broken.start(wait=False)
    try:
        assert broken.wait(20) == 1
    finally:
        broken.stop()
    assert alive(pid)  # within the grace still
    t0 = time.monotonic()
    wait_until(lambda: not alive(pid) and not any(alive(k) for k in keepers), 10,
               what="the model and its keeper gone")
    assert time.monotonic() - t0 < 2 + 1 + 3


def test_a_frozen_daemon_leaves_its_models_unattended_no_longer_than_the_limit(
        tmp_path: Path) -> None:
    """The daemon stopped (SIGSTOP) but not dead: its leases stay, so only the silence
    counts. With no word from it for unattended_limit_s the keepers stop the models; a
    daemon that talks (its heartbeat) keeps them."""
    doc = base_config(tmp_path, [counted(tmp_path, "alpha")])
    doc["supervisor"].update({"adopt_grace_s": 1, "unattended_limit_s": 2})
    with running(tmp_path, doc) as d:
        pid = d.wait_state("alpha", "ready")["pid"]
        stays(lambda: alive(pid), 3.0, "a daemon that talks keeps its models")
        assert d.proc is not None
        d.proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            wait_until(lambda: not alive(pid), 10, what="the model stopped")
            assert time.monotonic() - t0 >= 1.0
        finally:
            d.proc.send_signal(signal.SIGCONT)
        assert "no word from a supervisor for 2s" in d.logtext()


def test_a_keeper_killed_under_a_running_daemon(tmp_path: Path) -> None:
    """kill -9 of a model's keeper while the daemon runs: the engine dies with it (the
    parent-death signal), what it left (a grandchild ignoring SIGTERM, an escapee with the
    marker) is stopped from the daemon, and the service is launched again under a new
    keeper."""
    pidfile = tmp_path / "pids"
    doc = base_config(tmp_path, [counted(tmp_path, "alpha", "--grandchild", "--escape",
                                         "--ignore-term", "--pidfile", str(pidfile),
                                         stop={"timeout_s": 1})])
    with running(tmp_path, doc) as d:
        first = d.wait_state("alpha", "ready")["pid"]
        wait_until(pidfile.exists, 5, what="pidfile")
        main, grandchild, escaped = map(int, pidfile.read_text().split())
        pidfile.unlink()
        (keeper,) = keepers_of(tmp_path / "state")
        os.kill(keeper, signal.SIGKILL)
        try:
            wait_until(lambda: (s := d.service("alpha"))["state"] == "ready"
                       and s["pid"] != first, 20, what="alpha back under a new keeper")
            wait_until(lambda: not alive(grandchild) and not alive(escaped), 10,
                       what="what the dead keeper's engine left, stopped")
            assert not alive(main) and len(starts(tmp_path, "alpha")) == 2
            assert "its keeper" in d.logtext() and "ended while the model ran" in d.logtext()
        finally:
            for pid in (grandchild, escaped):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def test_a_stray_connection_to_a_keeper_changes_nothing(tmp_path: Path) -> None:
    """A second client (a probe, `socat`) is refused: the daemon stays attached, its
    heartbeat goes on, and it still stops its model."""
    doc = base_config(tmp_path, [counted(tmp_path, "alpha")])
    doc["supervisor"].update({"adopt_grace_s": 1, "unattended_limit_s": 2})
    with running(tmp_path, doc) as d:
        pid = d.wait_state("alpha", "ready")["pid"]
        (sock_path,) = (tmp_path / "state" / "keep").glob("*/ctl.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(5)
            s.connect(str(sock_path))
            assert json.loads(s.recv(65536))["code"] == "busy"
        stays(lambda: alive(pid), 4.0, "the model kept (the daemon still talks to it)")
        r = d.llmctl("restart", "alpha")
        assert r.returncode == 0, r.stderr
        assert d.service("alpha")["pid"] != pid and not alive(pid)


def test_nothing_of_the_daemons_line_reaches_the_engine(tmp_path: Path) -> None:
    """The engine holds no socket of its keeper's (its line to the daemon) and no lease."""
    doc = base_config(tmp_path, [counted(tmp_path, "alpha")])
    with running(tmp_path, doc) as d:
        pid = d.wait_state("alpha", "ready")["pid"]
        (keeper,) = keepers_of(tmp_path / "state")

        def links(p: int) -> set[str]:
            out = set()
            for fd in os.listdir(f"/proc/{p}/fd"):
                with contextlib.suppress(OSError):
                    out.add(os.readlink(f"/proc/{p}/fd/{fd}"))
            return out

        shared = {x for x in links(keeper) & links(pid)
                  if x.startswith(("socket:", "pipe:"))}
        # (the engine's stdout and stderr are the keeper's output pipe: one shared pipe)
        out_pipe = {os.readlink(f"/proc/{pid}/fd/1")}
        assert shared <= out_pipe, shared


def test_hostile_files_in_the_keepers_directory_do_not_stop_the_start(
        tmp_path: Path) -> None:
    """A FIFO, a symlink to /dev/zero, garbage: not read (the start never waits on them,
    nor reads a device), buried; the services start."""
    keep_dir = tmp_path / "state" / "keep"
    for i, kind in enumerate(("fifo", "device", "deep")):
        kd = keep_dir / f"alpha-0000000{i}"
        kd.mkdir(parents=True)
        for f in (kd / "launch.json", kd / "state.json"):
            if kind == "fifo":
                os.mkfifo(f)
            elif kind == "device":
                f.symlink_to("/dev/zero")
            else:
                f.write_text("[" * 100_000)
    doc = base_config(tmp_path, [counted(tmp_path, "alpha")])
    with running(tmp_path, doc) as d:
        d.wait_state("alpha", "ready")
        # the three buried, the one keeper of the service there
        assert [p.name for p in keep_dir.iterdir()] == [
            p.name for p in keep_dir.iterdir() if (p / "ctl.sock").exists()]
        assert len(list(keep_dir.iterdir())) == 1


def test_a_copy_of_the_state_directory_never_touches_the_models_of_the_original(
        tmp_path: Path) -> None:
    prod, test = tmp_path / "prod", tmp_path / "test"
    prod.mkdir()
    test.mkdir()
    doc = base_config(prod, [counted(prod, "alpha")])
    with running(prod, doc) as d:
        pid = d.wait_state("alpha", "ready")["pid"]
        shutil.copytree(prod / "state", test / "state", symlinks=True,
                        ignore=shutil.ignore_patterns("ctl.sock*", "*.lock", "lock"))
        (test / "state" / "processes.json").unlink(missing_ok=True)
        other = base_config(test, [counted(test, "beta")])
        with running(test, other) as t:
            t.wait_state("beta", "ready")
            assert "runs for another state directory" in t.logtext()
        assert alive(pid) and d.service("alpha")["pid"] == pid
        assert d.service("alpha")["restarts"] == 0


def test_a_sigterm_during_the_start_up_is_a_stop(tmp_path: Path) -> None:
    """SIGTERM while the new daemon still imports or adopts: blocked until its handlers are
    in place, then a stop like any other (exit 0, the adopted model stopped), never the
    default's death that would leave the model to its grace."""
    doc = base_config(tmp_path, [counted(tmp_path, "alpha")])
    pid = crashed(tmp_path, doc)
    d = Daemon(tmp_path, doc)
    d.start(wait=False)
    try:
        time.sleep(0.15)  # (in its imports, on this machine)
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0, d.logtext()[-2000:]
    finally:
        d.stop()
    assert not alive(pid)
    assert keepers_of(tmp_path / "state") == []


def test_a_port_changed_between_daemons_is_a_changed_launch(tmp_path: Path) -> None:
    doc = base_config(tmp_path, [counted(tmp_path, "alpha")])
    pid = crashed(tmp_path, doc)
    doc["service"][0]["port"] = free_port()
    with running(tmp_path, doc) as d:
        svc = d.wait_state("alpha", "ready")
        assert svc["port"] == doc["service"][0]["port"] and not svc["adopted"]
        assert not alive(pid) and "its port changed" in d.logtext()


def test_the_operators_stop_under_way_at_a_crash_goes_on(tmp_path: Path) -> None:
    """`llmctl stop` of a model slow to stop, and the daemon killed before it stopped: the
    next daemon adopts it and stops it (the stop was recorded before llmctl returned)."""
    doc = base_config(tmp_path, [counted(tmp_path, "alpha", "--ignore-term",
                                         stop={"timeout_s": 5})])
    d = Daemon(tmp_path, doc).start()
    try:
        pid = d.wait_state("alpha", "ready")["pid"]
        assert d.llmctl("stop", "--no-wait", "alpha").returncode == 0
        d.crash()
        d.pids_seen.clear()
    finally:
        d.stop()
    assert alive(pid)
    with running(tmp_path, doc) as d2:
        d2.wait_ready()  # (before, alpha shows as stopped: not started yet)
        wait_until(lambda: d2.service("alpha")["state"] == "stopped", 20, what="stopped")
        assert d2.service("alpha")["holds"] == ["operator"] and not alive(pid)


def test_a_stop_with_a_frozen_keeper_ends(tmp_path: Path) -> None:
    """A keeper frozen (SIGSTOP) when its model is stopped: the kill at the stop deadline goes
    to the group from the daemon, and the keeper that does not answer it is killed, so the
    stop ends a few seconds after its deadline, not at the heartbeat's."""
    doc = base_config(tmp_path, [counted(tmp_path, "alpha", stop={"timeout_s": 1})])
    with running(tmp_path, doc) as d:
        pid = d.wait_state("alpha", "ready")["pid"]
        (keeper,) = keepers_of(tmp_path / "state")
        os.kill(keeper, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            r = d.llmctl("stop", "alpha", timeout=60)
            wait_until(lambda: d.service("alpha")["state"] == "stopped", 20, what="stopped")
            assert time.monotonic() - t0 < 1 + 5 + 5, r.stdout + r.stderr
            assert not alive(pid) and not alive(keeper)
        finally:
            with contextlib.suppress(OSError):
                os.kill(keeper, signal.SIGKILL)


def test_a_crash_in_the_middle_of_a_hot_swap_keeps_the_serving_instance(
        tmp_path: Path) -> None:
    """Two instances of a service at the crash (the serving one, a replacement still
    loading): the next daemon adopts the one that served (the older), not the newcomer."""
    doc = base_config(tmp_path, [gated("alpha", "--load-s", "4",
                                       service={"health": {"startup_timeout_s": 30}})])
    d = Daemon(tmp_path, doc).start()
    try:
        pid = d.wait_state("alpha", "ready", 30)["pid"]
        swap = subprocess.Popen([sys.executable, "-m", "supervisord_llm.ctl", "--socket",
                                 d.socket, "swap", "alpha"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_until(lambda: len(keepers_of(tmp_path / "state")) == 2, 10,
                   what="the replacement started")
        d.crash()
        d.pids_seen.clear()
        swap.wait(30)
    finally:
        d.stop()
    with running(tmp_path, doc) as d2:
        svc = d2.wait_state("alpha", "ready", 10)
        assert svc["pid"] == pid and svc["adopted"]
        assert "a second instance" in d2.logtext()


def test_a_request_that_comes_while_the_daemon_starts_is_served(tmp_path: Path) -> None:
    """The router and the gates listen before every service has been started: a request for
    an on-demand model that comes in that moment waits and is served (it was answered 503
    "stopped": its hold released before the service was wanted, the launch never came)."""
    rport = free_port()
    # three services launched first, in config order: the start takes a while before
    # `lazy` is reached
    doc = base_config(tmp_path, [*(counted(tmp_path, f"s{i}") for i in range(3)),
                                 gated("lazy", service={"start": "on-demand",
                                                        "models": ["lazy-model"]})],
                      router={"listen": f"127.0.0.1:{rport}"})
    d = Daemon(tmp_path, doc)
    d.start(wait=False)
    try:
        body = json.dumps({"model": "lazy-model", "messages": [], "max_tokens": 1}).encode()
        deadline = time.monotonic() + 30
        while True:  # the first moment the router takes a connection
            try:
                s = socket.create_connection(("127.0.0.1", rport), timeout=30)
                break
            except OSError:
                assert time.monotonic() < deadline, "the router never listened"
                time.sleep(0.002)
        with s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      b"application/json\r\nConnection: close\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\n\r\n" + body)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data[:300]
    finally:
        d.stop()
