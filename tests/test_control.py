"""The control socket and llmctl under hostile or unlucky conditions: bad arguments change
nothing, a client that never reads is dropped, too many clients get `busy`, running out of
file descriptors costs a log line now and then and llmctl gets through once some close."""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import Daemon, base_config, fake_service, free_port, running, wait_until
from supervisord_llm import protocol as P
from supervisord_llm.control import server as control


def llmctl(sock: str | Path, *args: str, timeout: float = 30
           ) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "supervisord_llm.ctl", "--socket", str(sock),
                        *args], capture_output=True, text=True, timeout=timeout, check=False)
    return r, time.monotonic() - t0


def raw_call(path: str, cmd: str, args_json: str) -> dict[str, Any]:
    """One request with `args` written as raw JSON (NaN and Infinity included)."""
    line = f'{{"v":1,"id":1,"cmd":{json.dumps(cmd)},"args":{args_json}}}\n'.encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(line)
        reply: dict[str, Any] = json.loads(s.makefile("rb").readline())
    return reply


def small_config(tmp: Path, services: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """No GPUs, no metrics listener, sleepers: nothing in the daemon polls or opens files."""
    doc = base_config(tmp, services or [{"name": "sleeper", "command": ["/bin/sleep", "600"]}],
                      metrics=False)
    doc["gpu"] = {"backend": "none"}
    return doc


# --- protocol.parse_args (pure) -----------------------------------------------------------


@pytest.mark.parametrize(("cmd", "args", "expected"), [
    ("stop", {"services": ["a"], "timeout_s": -1}, "args.timeout_s must be a number"),
    ("stop", {"services": ["a"], "timeout_s": math.nan}, "not NaN"),
    ("restart", {"services": ["a"], "timeout_s": math.inf}, "not Infinity"),
    ("restart", {"services": ["a"], "timeout_s": True}, "args.timeout_s must be"),
    ("restart", {"services": ["a"], "timeout_s": 0}, "args.timeout_s must be"),
    ("drain", {"services": ["a"], "timeout_s": "5"}, "args.timeout_s must be"),
    ("stop", {"services": ["a"], "wait": 0}, "args.wait must be true or false"),
    ("start", {"all": "yes"}, "args.all must be true or false"),
    ("start", {"services": ["a"], "timeout_s": 1}, "unknown args for start: timeout_s"),
    ("reload", {"x": 1, "y": 2}, "unknown args for reload: x, y (reload takes no arguments)"),
    ("stop", {"services": [7]}, "args.services[] must be a service name, not 7"),
    ("stop", {"services": {"a": 1}}, "args.services must be a list"),
    ("stop", {"services": [""]}, "args.services[] must be a service name"),
    ("stop", {"services": ["a"], "all": True}, "give service names or all, not both"),
    ("stop", {}, "name at least one service"),
    ("swap", {}, "args.service is required"),
    ("swap", {"service": None}, "args.service must be a service name"),
    ("swap", {"service": "a", "services": ["a"]}, "unknown args for swap: services"),
    ("status", {"service": 3}, "args.service must be a service name"),
    ("power-event", {"event": "flood"}, "args.event must be one of"),
    ("checkpoint", {"name": 7}, "args.name must be a checkpoint name"),
    ("checkpoint", {"name": "x" * 300}, "args.name must be a checkpoint name"),
])
def test_parse_args_refuses(cmd: str, args: dict[str, Any], expected: str) -> None:
    with pytest.raises(P.ProtocolError) as info:
        P.parse_args(cmd, args)
    assert expected in info.value.message, info.value.message


def test_parse_args_accepts() -> None:
    assert P.parse_args("stop", {"services": ["a"], "wait": False, "timeout_s": 3}) == P.Args(
        services=("a",), wait=False, timeout_s=3.0)
    assert P.parse_args("restart", {"all": True, "timeout_s": None}).all
    assert P.parse_args("status", {"service": None}) == P.Args()
    assert P.parse_args("swap", {"service": "g", "timeout_s": 86400}).timeout_s == 86400.0
    assert P.parse_args("start", {"services": ["a", "b", "a"]}).services == ("a", "b")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3), max_leaves=8)


@settings(max_examples=500, deadline=None)
@given(cmd=st.sampled_from(sorted(P.COMMANDS)),
       args=st.dictionaries(st.sampled_from(["services", "all", "wait", "timeout_s", "service",
                                             "event", "x"]), json_values, max_size=4))
def test_parse_args_fuzz(cmd: str, args: dict[str, Any]) -> None:
    try:
        a = P.parse_args(cmd, args)
    except P.ProtocolError as exc:
        assert exc.message
        return
    assert set(args) <= P.ARGS[cmd]
    if a.timeout_s is not None:
        assert math.isfinite(a.timeout_s) and 0 < a.timeout_s <= P.MAX_TIMEOUT_S
    assert all(isinstance(n, str) and n for n in a.services)


# --- a live daemon: bad arguments change nothing --------------------------------------------

BAD_ARGS = [
    ("stop", '{"services":["s1"],"timeout_s":-1}'),
    ("stop", '{"services":["s1"],"timeout_s":NaN}'),
    ("stop", '{"services":["s1"],"timeout_s":Infinity}'),
    ("stop", '{"services":["s1"],"timeout_s":true}'),
    ("stop", '{"services":["s1"],"timeout_s":"5"}'),
    ("stop", '{"services":["s1"],"wait":0}'),
    ("stop", '{"services":["s1"],"bogus":1}'),
    ("stop", '{"services":["s1",7]}'),
    ("stop", '{"services":["s1"],"all":true}'),
    ("stop", '{"all":true,"wait":null}'),
    ("restart", '{"services":["s1"],"timeout_s":NaN}'),
    ("restart", '{"services":["s1"],"timeout_s":-Infinity}'),
    ("restart", '{"services":["s1"],"timeout_s":0}'),
    ("restart", '{"services":["s1"],"timeout_s":1e9}'),
    ("restart", '{"all":true,"wait":"no"}'),
    ("restart", '{"all":1}'),
    ("start", '{"services":["s2"],"timeout_s":5}'),
    ("start", '{"services":["s2"],"wait":false}'),
    ("start", '{"services":"s2","all":false,"x":null}'),
    ("reset", '{"services":["s1"],"timeout_s":5}'),
    ("drain", '{"services":["g"],"timeout_s":NaN}'),
    ("drain", '{"services":["g"],"wait":false}'),
    ("resume", '{"services":["g"],"timeout_s":1}'),
    ("resume", '{"all":true,"x":1}'),
    ("swap", '{"service":"g","timeout_s":-1}'),
    ("swap", '{"service":"g","timeout_s":NaN}'),
    ("swap", '{"service":"g","services":["g"]}'),
    ("swap", '{"service":["g"]}'),
    ("reload", '{"x":1}'),
    ("reload", '{"services":["s1"]}'),
    ("power-event", '{"event":"meteor"}'),
    ("checkpoint", '{"now":true}'),
]
NOT_FOUND = [  # good arguments, but one name is wrong or has no gate: refused before acting
    ("stop", '{"services":["s1","nope"]}', "unknown_service"),
    ("restart", '{"services":["s1","nope"],"wait":false}', "unknown_service"),
    ("resume", '{"services":["g","s1"]}', "failed"),
    ("swap", '{"service":"nope"}', "unknown_service"),
]


def snapshot(d: Daemon) -> dict[str, tuple[Any, ...]]:
    return {s["name"]: (s["state"], s["pid"], s["gate"], s["restarts"])
            for s in d.status()["services"]}


def test_bad_arguments_change_nothing(tmp_path: Path) -> None:
    sleeper = ["/bin/sleep", "600"]
    doc = small_config(tmp_path, [
        {"name": "s1", "command": sleeper}, {"name": "s2", "command": sleeper},
        fake_service("g", free_port(), gate={"listen": f"127.0.0.1:{free_port()}"}),
    ])
    with running(tmp_path, doc) as d:
        for name in ("s1", "s2", "g"):
            d.wait_state(name, "ready")
        assert d.call("stop", {"services": ["s2"]})  # so that a bad `start` would show
        assert d.call("drain", {"services": ["g"], "timeout_s": 5})  # ... and a bad `resume`
        # a changed config on disk: a `reload` that acted would add this service
        d.write({**doc, "service": [*doc["service"], {"name": "new", "command": sleeper}]})
        before = snapshot(d)
        assert before["s2"][0] == "stopped" and before["g"][2] == "draining"
        # the drain's own transition is logged by the actor, maybe after the reply
        wait_until(lambda: "g: ready -> draining" in d.logtext(), 10, what="drain logged")
        log_before = d.logtext()
        for cmd, args in BAD_ARGS:
            reply = raw_call(d.socket, cmd, args)
            assert reply["ok"] is False and reply["error"]["code"] == "bad_request", (
                cmd, args, reply)
            assert snapshot(d) == before, (cmd, args)
        for cmd, args, code in NOT_FOUND:
            reply = raw_call(d.socket, cmd, args)
            assert reply["ok"] is False and reply["error"]["code"] == code, (cmd, args, reply)
            assert snapshot(d) == before, (cmd, args)
        # and none of them acted late: no transition, no reload was logged
        new_lines = d.logtext()[len(log_before):]
        assert " -> " not in new_lines and "reloaded" not in new_lines, new_lines
        # llmctl's own checks: a NaN timeout is a usage error, never sent
        r = d.llmctl("restart", "s1", "--timeout", "nan")
        assert r.returncode == 2 and "--timeout must be in" in r.stderr
        assert snapshot(d) == before
        # the good forms still work
        assert d.call("resume", {"services": ["g"]})
        d.wait_state("g", "ready")


# --- llmctl: retry a refused or full socket for about 2 s -----------------------------------


def test_llmctl_retries_until_the_daemon_listens(tmp_path: Path) -> None:
    path = str(tmp_path / "late.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)  # bound, not listening: connect() is refused
    srv.settimeout(10)

    def listen_late() -> None:
        srv.listen(8)
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            return  # llmctl gave up (the test fails on its exit code)
        with conn:
            req = json.loads(conn.makefile("rb").readline())
            conn.sendall(P.ok_reply(req["id"], {"services": [{"name": "x", "state": "ok"}]}))

    timer = threading.Timer(0.5, listen_late)
    timer.daemon = True
    timer.start()
    try:
        r, took = llmctl(path, "start", "x")
    finally:
        timer.join(10)
        srv.close()
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "x: ok" and took >= 0.45


def test_llmctl_gives_up_after_about_two_seconds(tmp_path: Path) -> None:
    path = str(tmp_path / "dead.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(path)  # a stale socket: nothing will ever listen
        r, took = llmctl(path, "status")
        assert r.returncode == 3 and "nothing listens on" in r.stderr, r.stderr
        assert 1.5 < took < 10 and len(r.stderr.splitlines()) == 1
    full = str(tmp_path / "full.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(full)
        srv.listen(0)  # never accepts: the backlog fills, then connect() says EAGAIN
        waiting: list[socket.socket] = []
        try:
            while len(waiting) < 100:
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.setblocking(False)
                waiting.append(c)
                c.connect(full)
        except BlockingIOError:
            pass
        try:
            assert len(waiting) < 100
            r, took = llmctl(full, "status")
        finally:
            for c in waiting:
                c.close()
    assert r.returncode == 3 and "does not accept connections" in r.stderr, r.stderr
    assert 1.5 < took < 10


# --- bounded cost of a client: long lines, unread replies, too many connections --------------


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with running(tmp_path, small_config(tmp_path)) as d:
        yield d


def test_endless_line_is_refused(daemon: Daemon) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(daemon.socket)
        sent = 0
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            while sent < 50 * P.MAX_MESSAGE:  # the daemon closes long before this
                sent += s.send(b"x" * 65536)
        reply = json.loads(s.makefile("rb").readline())
        assert reply["error"]["code"] == "bad_request" and "longer than" in reply["error"][
            "message"]
        assert sent < 20 * P.MAX_MESSAGE
    # the daemon goes on (its service comes up: it may still be starting on a loaded box)
    daemon.wait_state(daemon.status()["services"][0]["name"], "ready")


def test_clients_that_never_read_are_dropped(daemon: Daemon) -> None:
    assert daemon.proc is not None
    proc = psutil.Process(daemon.proc.pid)
    rss_before = proc.memory_info().rss
    request = b'{"v":1,"id":1,"cmd":"status","args":{}}\n' * 200
    clients = []
    t0 = time.monotonic()
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(daemon.socket)
        s.setblocking(False)
        clients.append(s)

    def push(s: socket.socket) -> bool:
        """Send requests until the daemon stops taking them (it waits on unread replies)."""
        try:
            s.send(request)
        except BlockingIOError:
            return True
        except (BrokenPipeError, ConnectionResetError):
            return True
        return False

    try:
        for s in clients:
            wait_until(functools.partial(push, s), 10, interval=0.001, what="a full connection")
        # the daemon keeps serving others, and has not buffered the replies without bound
        assert daemon.status()["services"][0]["state"] == "ready"
        assert proc.memory_info().rss - rss_before < 40 * 2**20

        def dropped(s: socket.socket) -> bool:
            try:
                s.send(b"\n")
            except BlockingIOError:
                return False
            except (BrokenPipeError, ConnectionResetError):
                return True
            return False

        wait_until(lambda: all(dropped(s) for s in clients), control.REPLY_TIMEOUT_S + 15,
                   interval=0.1, what="clients dropped")
        assert time.monotonic() - t0 >= control.REPLY_TIMEOUT_S - 0.5
        assert proc.memory_info().rss - rss_before < 40 * 2**20
    finally:
        for s in clients:
            s.close()
    log = daemon.logtext()
    assert "did not read its reply within 10 s" in log and "Traceback" not in log
    assert log.count("dropped a client") <= 3  # one line per few seconds, not one per client
    assert daemon.status()["services"][0]["state"] == "ready"


def test_too_many_clients_are_told_busy(daemon: Daemon) -> None:
    clients = []
    try:
        for _ in range(control.MAX_CLIENTS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(s)
            s.settimeout(10)
            s.connect(daemon.socket)
            s.sendall(P.request("status"))
            assert json.loads(s.makefile("rb").readline())["ok"] is True  # being served
        r, _took = llmctl(daemon.socket, "status")
        assert r.returncode == 3 and "too many control connections" in r.stderr, r.stderr
    finally:
        for s in clients:
            s.close()
    wait_until(lambda: llmctl(daemon.socket, "status")[0].returncode == 0, 10,
               what="served again")


# --- out of file descriptors -----------------------------------------------------------------


def test_out_of_file_descriptors(tmp_path: Path) -> None:
    d = Daemon(tmp_path, small_config(tmp_path), nofile=32).start()
    flood: list[socket.socket] = []
    try:
        assert d.proc is not None
        assert psutil.Process(d.proc.pid).rlimit(psutil.RLIMIT_NOFILE) == (32, 32)
        while len(flood) < 300:  # idle connections: far more than the daemon may open
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            try:
                c.connect(d.socket)
            except BlockingIOError:
                c.close()
                break
            flood.append(c)
        assert len(flood) > 100  # the listen backlog holds what cannot be accepted
        wait_until(lambda: "Too many open files" in d.logtext(), 10, what="EMFILE logged")
        # accepting is retried every second; the log says so once per few seconds
        wait_until(lambda: d.logtext().count("cannot accept connections") >= 2,
                   control.LOG_INTERVAL_S + 5, what="a second EMFILE line")
        assert d.proc.poll() is None
        for c in flood[:-5]:  # most of them close (5 stay): the daemon catches up
            c.close()
        del flood[:-5]
        r, _took = llmctl(d.socket, "status", timeout=60)
        assert r.returncode == 0 and "sleeper" in r.stdout, r.stderr
        r, _took = llmctl(d.socket, "status")
        assert r.returncode == 0, r.stderr
        log = d.logtext()
        assert "Traceback" not in log, log[-3000:]
        assert log.count("cannot accept connections") <= 4, log[-3000:]
        assert len(log.splitlines()) < 30, log[-3000:]
    finally:
        for c in flood:
            c.close()
        d.stop()


def test_throttle() -> None:
    t = control._Throttle(60)
    assert t.allow() == 0
    assert t.allow() is None and t.allow() is None
    t.last -= 61
    assert t.allow() == 2


def test_status_hook_still_needs_valid_args(tmp_path: Path) -> None:
    with running(tmp_path, small_config(tmp_path)) as d:
        reply = raw_call(d.socket, "status", '{"debug_block_loop_s": 1}')  # hooks are off
        assert reply["error"]["code"] == "bad_request"
        assert "unknown args for status: debug_block_loop_s" in reply["error"]["message"]
        os.kill(d.proc.pid, 0)  # type: ignore[union-attr]


def test_a_list_is_a_list_and_a_key_is_given_once() -> None:
    """`services` must be a list (a string is not guessed at), and an object with a key given
    twice (which `cmd` would win?) is refused."""
    req = P.parse_request(b'{"v":1,"id":1,"cmd":"restart","args":{"services":"be"}}')
    with pytest.raises(P.ProtocolError) as info:
        P.parse_args(req.cmd, req.args)
    assert "must be a list" in info.value.message
    with pytest.raises(P.ProtocolError) as info:
        P.parse_request(b'{"v":1,"id":1,"cmd":"status","cmd":"stop"}')
    assert 'key "cmd" given twice' in info.value.message


def test_json_goes_before_or_after_status() -> None:
    from supervisord_llm.ctl import _parser

    parser = _parser()
    assert parser.parse_args(["status", "--json"]).json is True
    assert parser.parse_args(["--json", "status"]).json is True
    assert parser.parse_args(["status"]).json is False
