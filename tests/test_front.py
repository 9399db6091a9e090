"""The front process (issue: streams outlive the supervisor): the gates and the router in a
process of their own, with the real daemon and fake engines. kill -9 of the daemon under 64
streams cuts none and new requests are served in the gap; a hand-over keeps it; kill -9 of
the front cuts only its own streams and refuses no connection; a daemon gone for good takes
the front with it after the grace; a stop leaves nothing."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    Daemon,
    Streams,
    alive,
    async_wait_until,
    base_config,
    free_port,
    gated,
    post,
    running,
    wait_until,
)


def with_router(tmp: Path, services: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    doc = base_config(tmp, services, **extra)
    doc["router"] = {"listen": f"127.0.0.1:{free_port()}"}
    return doc


def gate_port(doc: dict[str, Any], name: str) -> int:
    for svc in doc["service"]:
        if svc["name"] == name:
            return int(svc["gate"]["listen"].rsplit(":", 1)[1])
    raise KeyError(name)


def router_port(doc: dict[str, Any]) -> int:
    return int(doc["router"]["listen"].rsplit(":", 1)[1])


def gone(pid: int) -> bool:
    return not alive(pid)


def front_pid(d: Daemon) -> int:
    front = d.status()["front"]
    assert front is not None and front["pid"], front
    return int(front["pid"])


def inflight(d: Daemon, name: str) -> int:
    return int(d.service(name)["inflight"])


def test_kill_9_of_the_daemon_under_64_streams_cuts_none(tmp_path: Path) -> None:
    """64 streams through two gates and the router; kill -9 of the daemon: every stream ends
    with [DONE]; requests sent while no daemon runs are answered by the models up; the next
    daemon re-attaches to the same front and drains as before."""
    doc = with_router(tmp_path, [gated("alpha", service={"models": ["m-alpha"]},
                                       max_concurrency=64),
                                 gated("beta", service={"models": ["m-beta"]},
                                       max_concurrency=64)])
    d = Daemon(tmp_path, doc).start()
    try:
        a = d.wait_state("alpha", "ready")
        b = d.wait_state("beta", "ready")
        fpid = front_pid(d)
        streams = [Streams(gate_port(doc, "alpha"), 16, 60, 0.05),
                   Streams(gate_port(doc, "beta"), 16, 60, 0.05),
                   Streams(router_port(doc), 16, 60, 0.05, "m-alpha"),
                   Streams(router_port(doc), 16, 60, 0.05, "m-beta")]
        wait_until(lambda: inflight(d, "alpha") + inflight(d, "beta") == 64, 10,
                   what="64 streams in flight")
        d.crash()
        d.pids_seen.clear()
    finally:
        d.stop()
    # no daemon: the front serves the models that are up
    for port, model in ((gate_port(doc, "alpha"), None), (router_port(doc), "m-beta")):
        for _ in range(5):
            body: dict[str, Any] = {"max_tokens": 2}
            if model:
                body["model"] = model
            assert post(port, body, 10).startswith(b"HTTP/1.1 200"), "served in the gap"
    with running(tmp_path, doc) as d2:
        assert d2.wait_state("alpha", "ready")["pid"] == a["pid"]
        assert d2.wait_state("beta", "ready")["pid"] == b["pid"]
        front = d2.status()["front"]
        assert front["pid"] == fpid and front["adopted"] is True, front
        for s in streams:
            s.join(30)
        assert [(s.done, s.cut) for s in streams] == [(16, 0)] * 4
        # once the daemon is back, a drain works as before
        r = d2.llmctl("drain", "alpha", "--timeout", "10")
        assert r.returncode == 0 and "0 in flight" in r.stdout, r
        answer = post(gate_port(doc, "alpha"), {"max_tokens": 2}, 10)
        assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
        assert d2.llmctl("resume", "alpha").returncode == 0
        wait_until(lambda: post(gate_port(doc, "alpha"), {"max_tokens": 2}, 10)
                   .startswith(b"HTTP/1.1 200"), 5, what="open again")


def test_a_handover_keeps_the_front_and_its_streams(tmp_path: Path) -> None:
    doc = base_config(tmp_path, [gated("alpha")])
    d = Daemon(tmp_path, doc).start()
    try:
        d.wait_state("alpha", "ready")
        fpid = front_pid(d)
        streams = Streams(gate_port(doc, "alpha"), 8, 40, 0.05)
        wait_until(lambda: inflight(d, "alpha") == 8, 10, what="8 in flight")
        r = d.llmctl("handover")
        assert r.returncode == 0, r
        assert d.wait(15) == 0
        assert alive(fpid)
        d.pids_seen.clear()
    finally:
        d.stop()
    with running(tmp_path, doc) as d2:
        d2.wait_state("alpha", "ready")
        assert d2.status()["front"]["pid"] == fpid
        streams.join(30)
        assert (streams.done, streams.cut) == (8, 0)


def test_kill_9_of_the_front_cuts_only_its_streams_and_refuses_nothing(tmp_path: Path) -> None:
    doc = base_config(tmp_path, [gated("alpha", "--starts", str(tmp_path / "alpha.starts"))])
    with running(tmp_path, doc) as d:
        pid = d.wait_state("alpha", "ready")["pid"]
        fpid = front_pid(d)
        port = gate_port(doc, "alpha")
        streams = Streams(port, 4, 200, 0.05)
        wait_until(lambda: inflight(d, "alpha") == 4, 10, what="4 in flight")
        refused: list[str] = []
        answered: list[float] = []
        stop = threading.Event()

        def knock() -> None:  # new connections all along: none may be refused
            while not stop.is_set():
                try:
                    if post(port, {"max_tokens": 1}, 10).startswith(b"HTTP/1.1 200"):
                        answered.append(time.monotonic())
                except ConnectionRefusedError as exc:
                    refused.append(str(exc))
                except OSError:
                    pass  # a connection the dying front had accepted: cut, not refused
                time.sleep(0.01)

        knocker = threading.Thread(target=knock, daemon=True)
        knocker.start()
        time.sleep(0.3)
        os.kill(fpid, signal.SIGKILL)
        killed = time.monotonic()
        streams.join(20)
        wait_until(lambda: answered and answered[-1] > killed, 10, what="answered again")
        stop.set()
        knocker.join(15)
        assert refused == []
        assert (streams.done, streams.cut) == (0, 4)
        front = d.status()["front"]
        assert front["pid"] != fpid and front["restarts"] == 1, front
        assert front["cut_requests"] >= 4, front
        svc = d.service("alpha")
        assert svc["pid"] == pid and svc["state"] == "ready"  # no model touched
        assert (tmp_path / "alpha.starts").read_text().split() == [str(pid)]
        assert "front process" in d.logtext() and "were cut" in d.logtext()
        url = f"http://{doc['metrics']['listen']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            metrics = r.read().decode()
        assert "llm_supervisor_front_restarts_total 1.0" in metrics


def test_a_front_stopped_by_sigterm_finishes_its_streams_and_counts_none_cut(
        tmp_path: Path) -> None:
    """SIGTERM to the front (by hand, or its unit stopped alone): its streams finish, and it
    tells the daemon so before it exits; the daemon counted the streams of its last report
    as cut (seen: 1 cut, logged at ERROR, for a stream that ended with [DONE])."""
    doc = base_config(tmp_path, [gated("alpha")])
    with running(tmp_path, doc) as d:
        d.wait_state("alpha", "ready")
        fpid = front_pid(d)
        streams = Streams(gate_port(doc, "alpha"), 2, 20, 0.05)
        wait_until(lambda: inflight(d, "alpha") == 2, 10, what="2 in flight")
        os.kill(fpid, signal.SIGTERM)
        streams.join(20)
        assert (streams.done, streams.cut) == (2, 0)
        wait_until(lambda: d.status()["front"]["pid"] not in (None, fpid), 15,
                   what="a new front")
        front = d.status()["front"]
        assert front["restarts"] == 1 and front["cut_requests"] == 0, front
        assert "0 request(s) in it were cut" in d.logtext()


def test_a_daemon_gone_for_good_takes_the_front_after_the_grace(tmp_path: Path) -> None:
    doc = base_config(tmp_path, [gated("alpha")])
    doc["supervisor"]["adopt_grace_s"] = 1
    d = Daemon(tmp_path, doc).start()
    try:
        d.wait_state("alpha", "ready")
        fpid = front_pid(d)
        d.crash()
        d.pids_seen.clear()
    finally:
        d.stop()
    assert alive(fpid)
    wait_until(lambda: not alive(fpid), 15, what="the front gone after the grace")
    try:
        post(gate_port(doc, "alpha"), {"max_tokens": 1}, 2)
        raise AssertionError("the gate still answers")
    except ConnectionRefusedError:
        pass
    assert not (tmp_path / "state" / "front" / "ctl.sock").exists()


def test_a_stop_stops_the_front(tmp_path: Path) -> None:
    doc = base_config(tmp_path, [gated("alpha")])
    d = Daemon(tmp_path, doc).start()
    try:
        d.wait_state("alpha", "ready")
        fpid = front_pid(d)
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0
        assert not alive(fpid)
    finally:
        d.stop()
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{gate_port(doc, 'alpha')}/health", timeout=2)
        raise AssertionError("the gate still answers")
    except (urllib.error.URLError, ConnectionError):
        pass


OLD_BUILD = {"LLM_SUPERVISOR_TEST_HOOKS": "1", "LLM_SUPERVISOR_TEST_FRONT_BUILD": "old"}


def old_front_handed_over(tmp: Path, doc: dict[str, Any],
                          streams: Callable[[], list[Streams]],
                          service: str) -> tuple[int, list[Streams]]:
    """A daemon whose front says it is of an older build, `streams()` started through it and
    in flight, then `llmctl handover`: the front's pid and the streams."""
    d = Daemon(tmp, doc, env=OLD_BUILD).start()
    try:
        d.wait_state(service, "ready")
        fpid = front_pid(d)
        running_streams = streams()
        n = sum(s.n for s in running_streams)
        wait_until(lambda: inflight(d, service) == n, 10, what=f"{n} in flight")
        r = d.llmctl("handover")
        assert r.returncode == 0, r
        assert d.wait(15) == 0
        d.pids_seen.clear()
    finally:
        d.stop()
    return fpid, running_streams


def test_an_upgraded_front_takes_the_sockets_over_and_the_old_one_drains(
        tmp_path: Path) -> None:
    """A daemon of a new build finds the front of the old build: a new front takes the
    listening sockets and the gates' state over, the old one finishes its streams and exits;
    no connection refused, no stream cut."""
    doc = with_router(tmp_path, [gated("alpha", service={"models": ["m-alpha"]})])
    fpid, streams = old_front_handed_over(
        tmp_path, doc, lambda: [Streams(gate_port(doc, "alpha"), 4, 60, 0.05),
                                Streams(router_port(doc), 4, 60, 0.05, "m-alpha")], "alpha")
    refused: list[str] = []
    failed: list[str] = []
    answered = [0]
    stop = threading.Event()

    def knock() -> None:
        while not stop.is_set():
            for port, model in ((gate_port(doc, "alpha"), None), (router_port(doc), "m-alpha")):
                body: dict[str, Any] = {"max_tokens": 1}
                if model:
                    body["model"] = model
                try:
                    answer = post(port, body, 10)
                except ConnectionRefusedError as exc:
                    refused.append(str(exc))
                    continue
                except OSError as exc:
                    failed.append(f"{port}: {exc}")
                    continue
                if answer.startswith(b"HTTP/1.1 200"):
                    answered[0] += 1
                else:
                    failed.append(f"{port}: {answer[:400]!r}")
            time.sleep(0.01)

    knocker = threading.Thread(target=knock, daemon=True)
    knocker.start()
    try:
        with running(tmp_path, doc) as d2:
            assert d2.wait_state("alpha", "ready")["adopted"] is True  # the model stayed
            wait_until(lambda: d2.status()["front"]["pid"] != fpid, 10, what="a new front")
            for s in streams:
                s.join(30)
            assert [(s.done, s.cut) for s in streams] == [(4, 0), (4, 0)]
            wait_until(lambda: not alive(fpid), 10, what="the old front gone once drained")
            assert "upgrading it by a hand-over" in d2.logtext()
            seen = answered[0]
            wait_until(lambda: answered[0] > seen + 4, 10, what="served by the new front")
            stop.set()
            knocker.join(15)
    finally:
        stop.set()
    assert refused == [] and failed == []


def test_gates_that_trade_ports_across_a_restart(tmp_path: Path) -> None:
    """The next daemon's config swaps the two gates' ports: each takes the other's socket
    over (no bind conflict with the front that holds both), and both serve."""
    doc = base_config(tmp_path, [gated("a"), gated("b")])
    d = Daemon(tmp_path, doc).start()
    try:
        d.wait_state("a", "ready")
        d.wait_state("b", "ready")
        assert d.llmctl("handover").returncode == 0
        assert d.wait(15) == 0
        d.pids_seen.clear()
    finally:
        d.stop()
    a, b = doc["service"][0]["gate"]["listen"], doc["service"][1]["gate"]["listen"]
    doc["service"][0]["gate"]["listen"], doc["service"][1]["gate"]["listen"] = b, a
    with running(tmp_path, doc) as d2:
        pa, pb = (d2.wait_state(n, "ready")["port"] for n in ("a", "b"))

        def served_by(gate: str, port: int) -> bool:
            with urllib.request.urlopen(f"http://{gate}/echo", timeout=5) as r:
                return bool(r.headers["X-Backend-Port"] == str(port))

        wait_until(lambda: served_by(b, pa) and served_by(a, pb), 10,
                   what="each gate on the other's port")


def test_kill_9_during_a_swap_keeps_what_the_gate_serves(tmp_path: Path) -> None:
    """kill -9 of the daemon after a hot swap switched the gate: the next daemon keeps the
    instance the gate serves (the replacement), lets the old one finish its streams, then
    stops it; no stream is cut."""
    doc = base_config(tmp_path, [gated("a", max_concurrency=32)])
    d = Daemon(tmp_path, doc).start()
    try:
        first = d.wait_state("a", "ready")["pid"]
        old = Streams(gate_port(doc, "a"), 3, 80, 0.05)
        wait_until(lambda: inflight(d, "a") == 3, 10, what="3 in flight")
        swap = threading.Thread(target=lambda: d.llmctl("swap", "a"), daemon=True)
        swap.start()
        wait_until(lambda: (d.service("a").get("swap") or {}).get("role") == "retiring", 20,
                   what="switched")
        second = d.service("a")["pid"]
        new = Streams(gate_port(doc, "a"), 3, 80, 0.05)
        wait_until(lambda: inflight(d, "a") == 6, 10, what="6 in flight")
        d.crash()
        d.pids_seen.clear()
    finally:
        d.stop()
    with running(tmp_path, doc) as d2:
        assert d2.wait_state("a", "ready")["pid"] == second
        for s in (old, new):
            s.join(30)
        assert [(s.done, s.cut) for s in (old, new)] == [(3, 0), (3, 0)]
        wait_until(lambda: not alive(first), 15, what="the old instance stopped")


def test_a_hung_front_or_a_stray_hello_does_not_stop_the_next_daemon(
        tmp_path: Path) -> None:
    doc = base_config(tmp_path, [gated("a")])
    for how in ("hung", "stray hello"):
        d = Daemon(tmp_path, doc).start()
        try:
            d.wait_state("a", "ready")
            fpid = front_pid(d)
            stray = None
            if how == "hung":
                os.kill(fpid, signal.SIGSTOP)
            d.crash()
            d.pids_seen.clear()
            if how == "stray hello":
                stray = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                stray.connect(str(tmp_path / "state" / "front" / "ctl.sock"))
                stray.send(json.dumps({"op": "hello", "id": 1}).encode())
                assert json.loads(stray.recv(1 << 20))["op"] == "snapshot"
        finally:
            d.stop()
        try:
            with running(tmp_path, doc) as d2:
                d2.wait_state("a", "ready")
                front = d2.status()["front"]
                assert (front["pid"] != fpid) == (how == "hung"), (how, front)
                assert post(gate_port(doc, "a"), {"max_tokens": 1}, 10).startswith(
                    b"HTTP/1.1 200")
        finally:
            if stray is not None:
                stray.close()
        wait_until(functools.partial(gone, fpid), 10, what="the earlier front gone")


def test_a_cold_start_waiter_cut_by_a_front_crash_waits_no_more(tmp_path: Path) -> None:
    svc = gated("y", "--load-s", "3", queue_timeout_s=60,
                service={"models": ["my"], "start": "on-demand", "idle_stop_s": 2})
    doc = with_router(tmp_path, [svc])
    with running(tmp_path, doc) as d:
        wait_until(lambda: d.status()["front"]["attached"], 10, what="the front")
        socket.create_connection(("127.0.0.1", router_port(doc)), timeout=5).close()
        waiter = Streams(router_port(doc), 1, 2, 0.0, "my")
        wait_until(lambda: d.service("y")["on_demand"]["waiting"] == 1, 10, what="waiting")
        os.kill(front_pid(d), signal.SIGKILL)
        waiter.join(10)
        assert waiter.cut == 1
        wait_until(lambda: d.service("y")["on_demand"]["waiting"] == 0, 10,
                   what="the waiter forgotten")
        assert d.status()["front"]["cut_requests"] >= 1


def test_a_deep_state_directory(tmp_path: Path) -> None:
    """A state directory deeper than a Unix socket address may be (108 bytes)."""
    deep = tmp_path / ("x" * 90) / "state"
    doc = base_config(tmp_path, [gated("a")])
    doc["supervisor"]["state_dir"] = str(deep)
    with running(tmp_path, doc) as d:
        d.wait_state("a", "ready")
        assert post(gate_port(doc, "a"), {"max_tokens": 1}, 10).startswith(b"HTTP/1.1 200")


def test_an_upgrade_whose_new_front_cannot_start_leaves_the_old_one_serving(
        tmp_path: Path) -> None:
    doc = base_config(tmp_path, [gated("a")])
    fpid, (streams,) = old_front_handed_over(
        tmp_path, doc, lambda: [Streams(gate_port(doc, "a"), 4, 60, 0.05)], "a")
    # the new build's front dies at its start
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "sitecustomize.py").write_text(
        "import os\n"
        "if b'supervisord_llm.front' in open('/proc/self/cmdline', 'rb').read():\n"
        "    os._exit(1)\n")
    path = os.pathsep.join(p for p in (str(broken), os.environ.get("PYTHONPATH")) if p)
    with running(tmp_path, doc, env={"PYTHONPATH": path}) as d2:
        d2.wait_state("a", "ready")
        wait_until(lambda: "did not start" in d2.logtext(), 15, what="the failed upgrade")
        assert d2.status()["front"]["pid"] == fpid
        streams.join(30)
        assert (streams.done, streams.cut) == (4, 0)
        assert post(gate_port(doc, "a"), {"max_tokens": 1}, 10).startswith(b"HTTP/1.1 200")


def test_a_stop_during_an_upgrade_waits_for_the_old_fronts_streams(tmp_path: Path) -> None:
    doc = base_config(tmp_path, [gated("a")])
    fpid, (streams,) = old_front_handed_over(
        tmp_path, doc, lambda: [Streams(gate_port(doc, "a"), 2, 80, 0.05)], "a")
    d2 = Daemon(tmp_path, doc).start()
    try:
        d2.wait_state("a", "ready")
        wait_until(lambda: d2.status()["front"]["pid"] != fpid, 10, what="upgraded")
        d2.signal(signal.SIGTERM)
        assert d2.wait(30) == 0
    finally:
        d2.stop()
    streams.join(10)
    assert (streams.done, streams.cut) == (2, 0)
    assert gone(fpid)


def test_a_memory_runaway_costs_a_front_restart_not_the_daemon(tmp_path: Path) -> None:
    """Clients that never read a close-delimited body push the front past
    front_memory_max_mb: it exits, the daemon starts it again with the same listening socket;
    the daemon and the model are untouched. (Under systemd the unit's MemoryMax= is the
    kernel's backstop; this lab's cgroups do not enforce it.)"""
    flood = str(Path(__file__).resolve().parent / "floodbackend.py")
    port = free_port()
    # (a health check that a backend busy flooding answers late is no reason to restart it
    # here: the test is about the front)
    svc = gated("a", max_concurrency=1024, max_connections=4096, send_timeout_s=600,
                service={"health": {"interval_s": 1, "timeout_s": 1, "failures": 20}})
    svc["command"] = [sys.executable, flood, "--port", "{port}"]
    svc["gate"]["listen"] = f"127.0.0.1:{port}"
    doc = base_config(tmp_path, [svc])
    doc["supervisor"]["front_memory_max_mb"] = 80
    with running(tmp_path, doc) as d:
        before = d.wait_state("a", "ready")
        fpid = front_pid(d)
        daemon_pid = d.status()["supervisor"]["pid"]
        hogs: list[socket.socket] = []
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and alive(fpid):
                for _ in range(25):  # each asks for an endless body and reads none of it
                    try:
                        s = socket.create_connection(("127.0.0.1", port), timeout=5)
                    except OSError:
                        break
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    s.sendall(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")
                    hogs.append(s)
                time.sleep(0.2)
        finally:
            for s in hogs:
                s.close()
        assert not alive(fpid), f"the front held {len(hogs)} non-reading clients"
        after = wait_until(lambda: (st := d.status())["front"]["attached"]
                           and st["front"]["pid"] != fpid and st, 15, what="a new front")
        assert after["front"]["restarts"] == 1
        assert after["supervisor"]["pid"] == daemon_pid  # the daemon stays
        assert d.service("a")["pid"] == before["pid"]  # the model stays
        assert "over front_memory_max_mb" in d.logtext()
        wait_until(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/ok", timeout=5)
                   .status == 200, 10, what="served again")


def test_the_status_text_shows_the_front() -> None:
    from supervisord_llm import ctl

    text = ctl.render_status({"supervisor": {}, "front": {
        "pid": 42, "attached": True, "adopted": True, "restarts": 2, "cut_requests": 5}})
    assert "front (gates and router) pid 42" in text
    assert "taken over" in text and "started again 2 time(s), 5 request(s) cut" in text
    text = ctl.render_status({"supervisor": {}, "front": {"pid": None, "attached": False}})
    assert "NOT ATTACHED" in text


async def test_a_gate_going_idle_again_and_again_tells_the_daemon_at_most_every_100_ms(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One client, one request after the other, to an on-demand model: each answer leaves
    the gate idle. The daemon hears of it at most every IDLE_TELL_S (the last time always,
    after the gates' state); requests waiting for a load are told at once."""
    import asyncio

    from supervisord_llm.config import GateSection
    from supervisord_llm.front import main as front_main
    from supervisord_llm.gate.proxy import Gate

    sent: list[dict[str, Any]] = []

    class Wire:
        def send(self, doc: dict[str, Any]) -> None:
            sent.append(doc)

    # (1 s here, not 100 ms: a loaded machine that pauses this test between two calls for
    # less than that changes nothing)
    monkeypatch.setattr(front_main, "IDLE_TELL_S", 1.0)
    f = front_main.Front(tmp_path, 10.0, 10.0)
    f.client = Wire()  # type: ignore[assignment]
    f.greeted = True
    f.gates["g"] = Gate("g", GateSection(None), f.pool)
    for _ in range(50):  # 50 idle transitions within a few ms
        f._waiting("g", 0)
    waits = [d for d in sent if d["op"] == "waiting"]
    assert len(waits) == 1  # the first at once, the rest later
    f._waiting("g", 2)  # requests waiting for a load: at once
    f._waiting("g", 0)  # and the end of the wait too (the last told was not 0)
    waits = [d for d in sent if d["op"] == "waiting"]
    assert [d["count"] for d in waits] == [0, 2, 0]
    f._waiting("g", 0)  # idle again at once: later, with what is true then
    f._waiting("g", 0)
    await async_wait_until(lambda: len([d for d in sent if d["op"] == "waiting"]) == 4, 5,
                           what="the last idle told")
    await asyncio.sleep(0.2)
    ops = [d["op"] for d in sent]
    assert ops.count("waiting") == 4  # once, not twice
    assert ops[0] == "state"  # the gates' state first (then only when it changed)


async def test_a_daemon_that_takes_a_front_over_gets_its_routers_catalogue(
        tmp_path: Path) -> None:
    """The next daemon (a restart, an upgrade) reads the router's catalogue back from the front
    it finds, so that a new front it hands the sockets to knows every model from its first
    request: the catalogue came only later, with the daemon's own start of the gates, and a
    request in between got 404 "known models: none" (seen in the upgrade test)."""
    from supervisord_llm.config import RouterSection, parse_listen
    from supervisord_llm.front.client import FrontClient

    routes = {"m-alpha": "alpha"}
    entries: list[dict[str, object]] = [{"id": "m-alpha", "object": "model",
                                         "service": "alpha"}]
    first = FrontClient(tmp_path / "front")
    second = FrontClient(tmp_path / "front")
    try:
        await first.set_router(RouterSection(parse_listen(f"127.0.0.1:{free_port()}")),
                               (routes, entries))
        await first.close(handover=True)  # the daemon goes; the front serves on
        await second.start()
        assert second.router is not None
        assert second.router.catalog == (routes, entries)
    finally:
        await second.close()
        await first.close()
