"""The model keeper (`supervisord_llm/_keeper.py`) as a real process: its control socket, the
engine's exit kept and sent, the lease and its grace, the unattended limit, SIGTERM, an escaped
grandchild, hostile messages and an older client, the lease not inherited by the engine, and
an output that nobody reads."""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import stays, wait_until

KEEPER = str(Path(__file__).resolve().parent.parent / "supervisord_llm" / "_keeper.py")
SLEEPER = [sys.executable, "-c",
           "import sys, time; print('hello from the engine', flush=True); time.sleep(600)"]


class Keeper:
    def __init__(self, tmp: Path, cmd: list[str], *, grace: float = 30, unattended: float = 300,
                 stop_timeout: float = 5, lease: bool = True, stderr: Any = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.dir = tmp / "keep"
        self.err = tmp / "keeper.err"
        args = [sys.executable, "-I", "-S", KEEPER, "--id", "k1", "--dir", str(self.dir),
                "--service", "svc", "--gen", "3", "--grace", str(grace),
                "--unattended", str(unattended), "--stop-timeout", str(stop_timeout),
                *extra]
        fds: list[int] = []
        self.lease_w: int | None = None
        self.clients: list[Client] = []
        if lease:
            r, self.lease_w = os.pipe()
            fds = [r]
            args += ["--lease-fd", str(r)]
        out = stderr if stderr is not None else open(self.err, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([*args, "--", *cmd], pass_fds=fds, stdout=out,
                                     stderr=out, start_new_session=True)
        if stderr is None:
            out.close()
        for fd in fds:
            os.close(fd)
        wait_until((self.dir / "ctl.sock").exists, 10, what="the keeper's socket")

    def connect(self) -> Client:
        c = Client(self.dir / "ctl.sock")
        self.clients.append(c)
        return c

    def close_lease(self) -> None:
        if self.lease_w is not None:
            os.close(self.lease_w)
            self.lease_w = None

    def log(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def cleanup(self) -> None:
        for c in self.clients:
            c.close()
        self.close_lease()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Client:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.events: list[dict[str, Any]] = []

    def send(self, doc: Any, fds: list[int] | None = None) -> None:
        data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] \
            if fds else []
        self.sock.sendmsg([data], anc)

    def ask(self, doc: Any, fds: list[int] | None = None) -> dict[str, Any]:
        """The reply (an `exited` the keeper sent meanwhile, unasked, is kept for recv)."""
        self.send(doc, fds)
        while True:
            got = self._read()
            if got.get("op") != "exited" or (isinstance(doc, dict) and doc.get("op") == "stop"):
                return got
            self.events.append(got)

    def recv(self) -> dict[str, Any]:
        if self.events:
            return self.events.pop(0)
        return self._read()

    def _read(self) -> dict[str, Any]:
        data = self.sock.recv(65536)
        assert data, "the keeper closed the connection"
        doc: dict[str, Any] = json.loads(data)
        return doc

    def close(self) -> None:
        self.sock.close()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


@pytest.fixture
def keepers(tmp_path: Path) -> Iterator[list[Keeper]]:
    made: list[Keeper] = []
    yield made
    for k in made:
        k.cleanup()


def test_hello_output_and_stop(tmp_path: Path, keepers: list[Keeper]) -> None:
    k = Keeper(tmp_path, SLEEPER)
    keepers.append(k)
    c = k.connect()
    snap = c.ask({"op": "hello", "proto": [1, 1]})
    assert snap["op"] == "snapshot" and snap["state"] == "running" and snap["gen"] == 3
    assert snap["service"] == "svc" and snap["lease"] is True and snap["exit"] is None
    pid = snap["pid"]
    assert alive(pid) and os.getpgid(pid) == pid  # a process group of its own
    state = json.loads((k.dir / "state.json").read_text())
    assert state["pid"] == pid and state["ticks"] == snap["ticks"]
    assert state["keeper_pid"] == k.proc.pid
    wait_until(lambda: "[svc] hello from the engine" in k.log(), 5, what="the engine's line")
    reply = c.ask({"op": "stop", "timeout_s": 5})
    assert reply == {"op": "stopped", "exit": {"code": None, "signal": signal.SIGTERM}}
    assert k.proc.wait(10) == 0 and not alive(pid)
    assert json.loads((k.dir / "exit.json").read_text())["exit"]["signal"] == signal.SIGTERM
    assert not (k.dir / "ctl.sock").exists()


def test_an_engine_exit_is_kept_and_sent(tmp_path: Path, keepers: list[Keeper]) -> None:
    k = Keeper(tmp_path, ["sh", "-c", "sleep 600; exit 3"])
    keepers.append(k)
    c = k.connect()
    pid = c.ask({"op": "hello", "proto": [1, 2]})["pid"]
    assert c.ask({"op": "signal", "sig": signal.SIGTERM}) == {"op": "ok", "signalled": 1}  # sh ends
    assert c.recv() == {"op": "exited", "exit": {"code": None, "signal": signal.SIGTERM},
                        "pid": pid, "tail": []}
    assert not alive(pid)
    stays(lambda: k.proc.poll() is None, 1.0, "the keeper stays after its engine ended")
    c.close()
    c = k.connect()  # a new supervisor sees it too
    snap = c.ask({"op": "hello", "proto": [1, 1]})
    assert snap["state"] == "exited" and snap["exit"]["signal"] == signal.SIGTERM
    assert c.ask({"op": "stop"})["op"] == "stopped"
    assert k.proc.wait(10) == 0


def test_the_end_of_the_lease_stops_the_model_after_the_grace(
        tmp_path: Path, keepers: list[Keeper]) -> None:
    k = Keeper(tmp_path, SLEEPER, grace=1.0)
    keepers.append(k)
    c = k.connect()
    pid = c.ask({"op": "hello", "proto": [1, 1]})["pid"]
    t0 = time.monotonic()
    k.close_lease()
    assert k.proc.wait(15) == 0
    assert time.monotonic() - t0 >= 0.9 and not alive(pid)
    assert "lease ended" in k.log() and "no lease for 1s" in k.log()


def test_a_new_lease_within_the_grace_keeps_the_model(tmp_path: Path,
                                                      keepers: list[Keeper]) -> None:
    k = Keeper(tmp_path, SLEEPER, grace=1.0)
    keepers.append(k)
    k.close_lease()  # the old supervisor is gone
    c = k.connect()  # the new one comes within the grace with a new lease
    pid = c.ask({"op": "hello", "proto": [1, 1]})["pid"]
    r, w = os.pipe()
    assert c.ask({"op": "lease"}, [r]) == {"op": "ok"}
    os.close(r)
    stays(lambda: alive(pid) and k.proc.poll() is None, 2.0, "kept past the grace")
    os.close(w)  # and this supervisor goes for good
    assert k.proc.wait(15) == 0 and not alive(pid)


def test_a_lease_is_never_inherited_by_the_engine(tmp_path: Path,
                                                  keepers: list[Keeper]) -> None:
    k = Keeper(tmp_path, SLEEPER)
    keepers.append(k)
    pid = k.connect().ask({"op": "hello", "proto": [1, 1]})["pid"]

    def pipes(p: int) -> set[str]:
        out = set()
        for fd in os.listdir(f"/proc/{p}/fd"):
            try:
                target = os.readlink(f"/proc/{p}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("pipe:"):
                out.add(target)
        return out

    assert k.lease_w is not None
    lease = os.readlink(f"/proc/self/fd/{k.lease_w}")
    assert lease in pipes(k.proc.pid)
    assert lease not in pipes(pid)


def test_no_supervisor_for_the_unattended_limit_stops_it(tmp_path: Path,
                                                         keepers: list[Keeper]) -> None:
    """No word from a supervisor for the limit: attached and pinging, kept; attached but
    silent (a frozen daemon), or gone, the model is stopped."""
    k = Keeper(tmp_path, SLEEPER, unattended=1.5)
    keepers.append(k)
    c = k.connect()
    pid = c.ask({"op": "hello", "proto": [1, 1]})["pid"]
    end = time.monotonic() + 3.0
    while time.monotonic() < end:  # a supervisor that talks
        assert c.ask({"op": "ping"}) == {"op": "pong"}
        assert alive(pid)
        time.sleep(0.3)
    t0 = time.monotonic()  # attached, but silent from now on
    assert k.proc.wait(15) == 0 and not alive(pid)
    assert time.monotonic() - t0 >= 1.0
    assert "no word from a supervisor for 1.5s" in k.log()


def test_sigterm_stops_the_model(tmp_path: Path, keepers: list[Keeper]) -> None:
    k = Keeper(tmp_path, SLEEPER)
    keepers.append(k)
    pid = k.connect().ask({"op": "hello", "proto": [1, 1]})["pid"]
    k.proc.send_signal(signal.SIGTERM)
    assert k.proc.wait(10) == 0 and not alive(pid)


def test_an_escaped_grandchild_is_stopped_too(tmp_path: Path, keepers: list[Keeper]) -> None:
    pidfile = tmp_path / "grandchild.pid"
    script = (f"setsid sh -c 'trap \"\" TERM; echo $$ > {pidfile}; while :; do sleep 1; done' "
              "& exec sleep 600")
    k = Keeper(tmp_path, ["sh", "-c", script], stop_timeout=0.5)
    keepers.append(k)
    c = k.connect()
    c.ask({"op": "hello", "proto": [1, 1]})
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 5, what="grandchild")
    grandchild = int(pidfile.read_text())
    assert os.getsid(grandchild) == grandchild  # out of the engine's group and session
    assert c.ask({"op": "stop"})["op"] == "stopped"
    assert k.proc.wait(10) == 0
    assert not alive(grandchild)


def test_hostile_messages_and_an_older_client(tmp_path: Path, keepers: list[Keeper]) -> None:
    k = Keeper(tmp_path, SLEEPER)
    keepers.append(k)
    c = k.connect()
    assert c.ask(b"\xff not json")["code"] == "bad_request"
    assert c.ask([1, 2, 3])["code"] == "bad_request"
    assert c.ask({"op": "launch-missiles"})["code"] == "unsupported"
    assert c.ask({"op": "signal", "sig": 999})["code"] == "bad_request"
    r, w = os.pipe()
    assert c.ask({"op": "lease"}, [r, w])["code"] == "bad_request"  # two fds: refused
    os.close(r)
    os.close(w)
    assert c.ask(b"x" * 200_000)["code"] == "bad_request"  # truncated: refused
    assert c.ask(b'{"op": "ping", "x": ' + b"[" * 50_000)["code"] == "bad_request"  # deep
    assert c.ask({"op": "hello", "proto": [1, 1]})["state"] == "running"
    intruder = k.connect()  # one supervisor at a time: a second connection is refused
    assert intruder.recv()["code"] == "busy"
    assert intruder.sock.recv(100) == b""  # and closed
    assert c.ask({"op": "ping"}) == {"op": "pong"}  # the first one is still attached
    c.close()
    stray = k.connect()  # a connection that never says hello keeps no supervisor out
    old = k.connect()  # a newer client once the first has gone; it speaks protocols 5-6 only
    err = old.ask({"op": "hello", "proto": [5, 6]})
    assert err["code"] == "proto" and err["proto"] == 1
    assert stray.sock.recv(100) == b""  # replaced
    assert old.ask({"op": "signal", "sig": 15})["code"] == "proto"  # only stop and lease
    r, w = os.pipe()
    assert old.ask({"op": "lease"}, [r]) == {"op": "ok"}  # every protocol keeps its model
    os.close(r)
    os.close(w)
    assert old.ask({"op": "stop", "timeout_s": "soon"})["op"] == "stopped"  # a bad timeout
    assert k.proc.wait(10) == 0


def test_an_output_nobody_reads_never_blocks_the_engine(tmp_path: Path,
                                                        keepers: list[Keeper]) -> None:
    r, w = os.pipe()  # the keeper's stderr: a pipe that is never read
    try:
        k = Keeper(tmp_path, [sys.executable, "-c",
                              "import sys\nfor i in range(50000): print('x' * 100, i)\n"
                              "sys.stdout.flush()\nimport time; time.sleep(600)"],
                   stderr=w)
        keepers.append(k)
        c = k.connect()
        snap = c.ask({"op": "hello", "proto": [1, 1]})
        wait_until(lambda: c.ask({"op": "hello", "proto": [1, 1]})["dropped_lines"] > 40000,
                   30, interval=0.2, what="lines dropped, the engine not held up")
        assert alive(snap["pid"])
        assert c.ask({"op": "stop"})["op"] == "stopped"
        assert k.proc.wait(10) == 0
    finally:
        os.close(r)
        os.close(w)


def test_bad_arguments(tmp_path: Path) -> None:
    for args in ([], ["--id", "x", "--", "true"], ["--id", "x", "--dir", "d", "--service",
                                                   "s", "--gen", "1"]):
        p = subprocess.run([sys.executable, "-I", "-S", KEEPER, *args], capture_output=True,
                           text=True, timeout=10, check=False)
        assert p.returncode == 2 and p.stderr.startswith("llm-supervisor keeper: "), p.stderr
    # an engine that cannot be executed is an engine that exited 127 (said on its output);
    # with no lease and no supervisor the keeper then ends after its grace
    p = subprocess.run([sys.executable, "-I", "-S", KEEPER, "--id", "x", "--dir",
                        str(tmp_path / "k"), "--service", "s", "--gen", "1", "--grace", "0.2",
                        "--", "/nonexistent/engine"], capture_output=True, text=True,
                       timeout=10, check=False)
    assert p.returncode == 0, p.stderr
    assert "[s] llm-supervisor keeper: cannot execute '/nonexistent/engine'" in p.stderr
    assert json.loads((tmp_path / "k" / "exit.json").read_text())["exit"]["code"] == 127
    p = subprocess.run([sys.executable, "-I", "-S", KEEPER, "--id", "x", "--dir",
                        str(tmp_path / "k"), "--service", "s", "--gen", "1", "--log-format",
                        "xml", "--", "true"], capture_output=True, text=True, timeout=10,
                       check=False)
    assert p.returncode == 2 and "--log-format 'xml'" in p.stderr


def test_a_relaunch_is_a_fork_of_the_keeper(tmp_path: Path, keepers: list[Keeper]) -> None:
    """`run` starts the engine again (after it ended, and everything it started with it),
    with the CPUs and output format it was given; its SIGPIPE is the default again."""
    script = ('printf "run "; grep -E "^(SigIgn|Cpus_allowed_list)" /proc/self/status'
              ' | tr "\\n\\t" "  "; echo; exit 5')
    k = Keeper(tmp_path, ["sh", "-c", script], extra=("--cpus", "0", "--log-format", "json"))
    keepers.append(k)
    c = k.connect()
    snap = c.ask({"op": "hello", "proto": [1, 1]})
    if snap["state"] == "running":
        assert c.recv()["op"] == "exited"
    c.events.clear()  # (the first run's exit, if it came before the snapshot)
    first = snap["pid"]
    assert c.ask({"op": "run"})["code"] == "bad_request"  # no generation
    started = c.ask({"op": "run", "gen": 4})
    assert started["op"] == "started" and started["gen"] == 4 and started["pid"] != first
    said = c.recv()
    tail = said.pop("tail")  # the run's last lines: what status shows of a runtime's refusal
    assert said == {"op": "exited", "exit": {"code": 5, "signal": None},
                    "pid": started["pid"]}
    assert len(tail) == 1 and tail[0].startswith("run SigIgn:"), tail
    wait_until(lambda: k.log().count('"msg": "[svc] run') == 2, 10, what="two runs")
    for line in k.log().splitlines():
        doc = json.loads(line)  # every line the keeper writes is one JSON object
        if doc["msg"].startswith("[svc] run"):
            assert doc["level"] == "info", doc
            assert "SigIgn: 0000000000000000 Cpus_allowed_list: 0 " in doc["msg"], doc
    state = json.loads((k.dir / "state.json").read_text())
    assert state["pid"] == started["pid"] and state["gen"] == 4
    assert c.ask({"op": "stop"})["op"] == "stopped"


def test_a_busy_keeper_refuses_run(tmp_path: Path, keepers: list[Keeper]) -> None:
    k = Keeper(tmp_path, SLEEPER)
    keepers.append(k)
    c = k.connect()
    pid = c.ask({"op": "hello", "proto": [1, 1]})["pid"]
    assert c.ask({"op": "run", "gen": 4})["code"] == "busy"
    assert alive(pid)


def test_the_supervisor_that_starts_it_is_attached_from_the_start(tmp_path: Path) -> None:
    """--client-fd: one end of a socket pair is the first client; `started` comes unasked."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.settimeout(10)
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", KEEPER, "--id", "k", "--dir", str(tmp_path / "k"),
         "--service", "svc", "--gen", "1", "--client-fd", str(theirs.fileno()), "--",
         *SLEEPER], pass_fds=[theirs.fileno()], stderr=subprocess.DEVNULL)
    theirs.close()
    try:
        started = json.loads(ours.recv(65536))
        assert started["op"] == "started" and alive(started["pid"])
        assert started["keeper_pid"] == proc.pid and not started["lease"]
        ours.send(json.dumps({"op": "stop", "timeout_s": 5}).encode())
        assert json.loads(ours.recv(65536))["op"] == "stopped"
        assert proc.wait(10) == 0 and not alive(started["pid"])
    finally:
        ours.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_the_group_is_signalled_after_its_leader_ended(tmp_path: Path,
                                                       keepers: list[Keeper]) -> None:
    """What the engine left in its group is still reached by `signal` (the lifecycle stops
    it before anything else); a line longer than the limit is written cut, the rest skipped."""
    k = Keeper(tmp_path, ["sh", "-c", "printf '%010000d\\n' 0; echo next; sleep 600 & exit 0"])
    keepers.append(k)
    c = k.connect()
    snap = c.ask({"op": "hello", "proto": [1, 1]})
    if snap["state"] == "running":
        assert c.recv()["op"] == "exited"
    wait_until(lambda: "[svc] next" in k.log(), 10, what="the lines")
    assert c.ask({"op": "signal", "sig": signal.SIGTERM}) == {"op": "ok", "signalled": 1}
    wait_until(lambda: c.ask({"op": "signal", "sig": signal.SIGCONT})["signalled"] == 0, 10,
               what="the group gone")
    cut = [line for line in k.log().splitlines() if line.startswith("[svc] 000")]
    assert len(cut) == 1 and cut[0] == "[svc] " + "0" * 3800 + " [line cut]"


def test_a_lease_given_later_is_not_inherited_by_a_relaunch(tmp_path: Path,
                                                          keepers: list[Keeper]) -> None:
    """A lease that comes over the socket (a new supervisor's, SCM_RIGHTS: inheritable as
    received) is the keeper's alone: the engine it relaunches does not get it."""
    k = Keeper(tmp_path, ["sh", "-c", "exec sleep 600"], lease=False)
    keepers.append(k)
    c = k.connect()
    c.ask({"op": "hello", "proto": [1, 1]})
    r, w = os.pipe()
    try:
        assert c.ask({"op": "lease"}, [r]) == {"op": "ok"}
        lease = f"pipe:[{os.fstat(r).st_ino}]"
        first = c.ask({"op": "signal", "sig": signal.SIGKILL})
        assert first["op"] == "ok"
        assert c.recv()["op"] == "exited"
        started = c.ask({"op": "run", "gen": 2})
        # (before its exec the fork still holds the keeper's fds, close-on-exec ones too)
        wait_until(lambda: Path(f"/proc/{started['pid']}/cmdline").read_bytes()
                   .startswith(b"sleep"), 5, what="the relaunch exec'd")
        fds = [os.readlink(f"/proc/{started['pid']}/fd/{fd}")
               for fd in os.listdir(f"/proc/{started['pid']}/fd")]
        assert lease not in fds, fds
    finally:
        os.close(r)
        os.close(w)


def test_signals_ignored_where_the_keeper_started_are_not_the_engines(tmp_path: Path) -> None:
    """A supervisor started by hand from a script (`cmd &` ignores SIGINT and SIGQUIT, nohup
    SIGHUP): its engines start with every signal at its default, as under systemd."""
    keeper = [sys.executable, "-I", "-S", KEEPER, "--id", "x", "--dir", str(tmp_path / "k"),
              "--service", "s", "--gen", "1", "--grace", "0.2", "--",
              "grep", "^SigIgn", "/proc/self/status"]
    # the shell's ignored signals survive its exec of the keeper
    p = subprocess.run(["sh", "-c", 'trap "" INT QUIT HUP USR2; exec "$@"', "sh", *keeper],
                       capture_output=True, text=True, timeout=10, check=False)
    assert p.returncode == 0, p.stderr
    assert "[s] SigIgn:\t0000000000000000" in p.stderr, p.stderr
