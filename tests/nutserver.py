"""A real NUT server for tests: upsd and the dummy-ups driver (Debian's nut-server), on
loopback, with a UPS named `dummy` whose state a test sets by rewriting the driver's file.

    require_nut()                      # at module level: skip, or fail under REQUIRE_E2E=1
    with NutServer(tmp_path, users={"mon": "pw"}) as ups:
        ups.ups                        # "dummy@127.0.0.1:PORT"
        ups.set(status="OB LB", charge=12)
        ups.wait_status("OB LB")       # polls upsd itself, not just the file
        ups.kill_driver()              # upsd answers ERR DRIVER-NOT-CONNECTED
        ups.kill_upsd()                # connection refused

Both processes run in the foreground (-F) in their own process groups, with their output in
BASE/dummy-ups.log and BASE/upsd.log; stop() (and leaving the `with`) kills both groups and
reaps them, and so does an exit of the interpreter (atexit). Started from the main thread,
they also die with it (PR_SET_PDEATHSIG, set by util-linux's setpriv), should pytest itself
be killed.

What the real server does that a test may trip on:
  - dummy-ups (mode dummy-once) re-reads its file only when the file's mtime changes, compared
    in whole seconds: a second write within the same second would be ignored for good. set()
    therefore gives every write a strictly greater whole-second mtime (it may run a few
    seconds ahead of the clock after quick successive writes).
  - the driver applies what the file says but never removes a variable: one that a later
    set() no longer writes keeps its last value until the driver restarts.
  - start() takes ~3 s: dummy-ups serves one socket event per 1 s loop (pollinterval), so
    it listens after ~1 s and answers upsd's connection and DUMPALL a loop each later; until
    then ups.status reads WAIT. start_driver() takes as long, start_upsd() 1.5-3 s. (That is
    why the helper waits for the driver's socket to appear rather than connecting to it.)
  - a set() shows in upsd 0.1-1 s later (the driver polls its file every second).
  - a killed driver shows at once: upsd answers ERR DRIVER-NOT-CONNECTED.
  - upsd accepts any USERNAME and PASSWORD with OK; only LOGIN (and INSTCMD, SET) check them
    and answer ERR ACCESS-DENIED. Reads need no login at all, so a client that never sends
    LOGIN (aionut) reads happily with a wrong password. login() here does send it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import pytest

from helpers import free_port

UPSD = Path("/lib/nut/upsd")  # not /sbin/upsd: Debian's wrapper may just say "upsd disabled"
DUMMY_UPS = Path("/lib/nut/dummy-ups")
NAME = "dummy"
HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_GRACE = 2.0  # SIGTERM, then SIGKILL after this long

SETPRIV = shutil.which("setpriv")


def nut_missing() -> str | None:
    """Why the NUT server cannot run here, or None if it can."""
    for path in (UPSD, DUMMY_UPS):
        if not os.access(path, os.X_OK):
            return (f"{path} is missing: install the Debian packages nut-server and nut-client "
                    "(scripts/setup.sh does)")
    return None


def require_nut() -> None:
    """Skip the calling module or test when upsd is not installed, or fail instead when
    LLM_SUPERVISOR_REQUIRE_E2E=1 (as scripts/test.sh sets), like the llama-server tests."""
    reason = nut_missing()
    if reason is None:
        return
    if os.environ.get("LLM_SUPERVISOR_REQUIRE_E2E") == "1":
        raise RuntimeError(f"NUT is required (LLM_SUPERVISOR_REQUIRE_E2E=1) but {reason}")
    pytest.skip(reason, allow_module_level=True)


class NutServerError(AssertionError):
    """The NUT server did not start or did not reach the state a test waited for."""


def _fmt(value: float | str) -> str:
    if isinstance(value, str):
        return value
    if value == int(value):
        return str(int(value))
    return repr(float(value))


def _quote(value: str) -> str:
    """A value as one quoted word of NUT's config syntax (dummy-ups files, upsd.users)."""
    if any(c in value for c in "\n\r\0"):
        raise ValueError(f"a NUT value cannot hold a line break or NUL: {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unquote(text: str) -> str:
    out: list[str] = []
    chars = iter(text)
    for c in chars:
        out.append(next(chars, "") if c == "\\" else c)
    return "".join(out)


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"({e})"
    return text[-limit:] if text else "(empty)"


_live: weakref.WeakSet[NutServer] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for server in list(_live):
        server.stop()


def _pdeathsig() -> list[str]:
    """A prefix to the command that makes it die with this thread (util-linux's setpriv sets
    PR_SET_PDEATHSIG, then execs it); none off the main thread, since the signal follows the
    thread that forked, and a worker thread may exit long before the test ends."""
    if threading.current_thread() is not threading.main_thread() or SETPRIV is None:
        return []
    return [SETPRIV, "--pdeathsig", "KILL", "--"]


class NutServer:
    """upsd and dummy-ups, configured under `base` (etc/, state/, logs), serving the UPS
    `dummy` on 127.0.0.1 at a free port. `users` (name -> password) go to upsd.users as
    `upsmon secondary`, for tests of USERNAME/PASSWORD/LOGIN."""

    def __init__(self, base: Path, *, status: str = "OL", charge: float = 100.0,
                 runtime: float = 1200.0, users: dict[str, str] | None = None,
                 primaries: tuple[str, ...] = ()) -> None:
        self.base = base
        self.etc = base / "etc"
        self.state = base / "state"
        self.datafile = self.etc / "dummy.dev"
        self.driver_log = base / "dummy-ups.log"
        self.upsd_log = base / "upsd.log"
        self.host = HOST
        self.port = free_port()
        self.name = NAME
        self.users = dict(users or {})
        self.primaries = frozenset(primaries)  # of `users`: `upsmon primary` (may send FSD)
        for user in self.users:
            if not user or any(c.isspace() or c in '[]"\\#=' for c in user):
                raise ValueError(f"not a usable NUT user name: {user!r}")
        self.vars: dict[str, str] = {"ups.status": status, "battery.charge": _fmt(charge),
                                     "battery.runtime": _fmt(runtime)}
        self.startup_s: float | None = None  # how long start() took, for the curious
        self._driver: subprocess.Popen[bytes] | None = None
        self._upsd: subprocess.Popen[bytes] | None = None
        self._mtime = 0  # whole seconds of the last write of the data file

    # --- life cycle -----------------------------------------------------------------------

    def __enter__(self) -> NutServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        """Write the configuration, start the driver and upsd, and wait (10 s at most) until
        upsd serves the configured ups.status. Stops everything again if that fails."""
        require_nut()
        t0 = time.monotonic()
        deadline = t0 + START_TIMEOUT
        self._write_config()
        _live.add(self)
        try:
            self._start_driver(deadline)
            self._start_upsd(deadline)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0

    def stop(self) -> None:
        """Kill both process groups (SIGTERM, SIGKILL after 2 s) and reap them. Idempotent."""
        procs = [p for p in (self._upsd, self._driver) if p is not None]
        self._upsd = self._driver = None
        for proc in procs:
            self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait()
        _live.discard(self)

    def kill_driver(self) -> None:
        """SIGKILL the driver (a crash): upsd then answers ERR DRIVER-NOT-CONNECTED."""
        self._kill(self._driver)
        self._driver = None

    def kill_upsd(self) -> None:
        """SIGKILL upsd (a crash): connections to the port are refused."""
        self._kill(self._upsd)
        self._upsd = None

    def start_driver(self) -> None:
        """Start the driver again; wait until it listens and, with upsd up, until upsd serves
        the current ups.status through it."""
        if self._driver is not None:
            raise RuntimeError("the driver is already running")
        self._start_driver(time.monotonic() + START_TIMEOUT)

    def start_upsd(self) -> None:
        """Start upsd again on the same port; wait until it answers (with the driver up: until
        it serves the current ups.status)."""
        if self._upsd is not None:
            raise RuntimeError("upsd is already running")
        self._start_upsd(time.monotonic() + START_TIMEOUT)

    @property
    def driver_running(self) -> bool:
        return self._driver is not None and self._driver.poll() is None

    @property
    def upsd_running(self) -> bool:
        return self._upsd is not None and self._upsd.poll() is None

    # --- the UPS --------------------------------------------------------------------------

    @property
    def ups(self) -> str:
        """The UPS as NUT clients name it: dummy@127.0.0.1:PORT."""
        return f"{self.name}@{self.host}:{self.port}"

    def set(self, status: str | None = None, charge: float | str | None = None,
            runtime: float | str | None = None, **extra: str) -> None:
        """Rewrite the driver's data file (atomically) with these values and the current ones
        of everything not given; `extra` adds or changes other variables, e.g.
        set(**{"ups.load": "40"}) (charge and runtime take strings too, so that such a dict
        type-checks). upsd shows it within about a second: see wait_status()."""
        if status is not None:
            self.vars["ups.status"] = status
        if charge is not None:
            self.vars["battery.charge"] = _fmt(charge)
        if runtime is not None:
            self.vars["battery.runtime"] = _fmt(runtime)
        self.vars.update(extra)
        self._write_data()

    def query(self, var: str, timeout: float = 2.0) -> str:
        """upsd's answer to GET VAR dummy VAR: the value, or the ERR line as it came.
        Raises OSError when upsd does not answer (connection refused while it is down)."""
        prefix = f"VAR {self.name} {var} "
        line = self._ask([f"GET VAR {self.name} {var}"], timeout)[0]
        if line.startswith(prefix + '"') and line.endswith('"') and len(line) > len(prefix) + 1:
            return _unquote(line[len(prefix) + 1:-1])
        return line

    def login(self, username: str, password: str, timeout: float = 2.0) -> str:
        """USERNAME, PASSWORD and LOGIN dummy on one connection: LOGIN's answer ("OK" or
        "ERR ACCESS-DENIED"), or the first ERR before it. upsd checks the password only at
        LOGIN: USERNAME and PASSWORD answer OK to anything. Both go quoted, so a password
        may hold spaces and quotes (unquoted, upsd answers ERR INVALID-ARGUMENT to those)."""
        answers = self._ask([f"USERNAME {_quote(username)}", f"PASSWORD {_quote(password)}",
                             f"LOGIN {self.name}"], timeout)
        return next((a for a in answers if a.startswith("ERR")), answers[-1])

    def fsd(self, username: str, password: str, timeout: float = 2.0) -> str:
        """What a primary upsmon does when it powers the machines off: LOGIN, then FSD.
        upsd raises its FSD flag and keeps it (even after the power returns) until upsd
        itself restarts. The answer to FSD ("OK FSD-SET"), or the first ERR."""
        answers = self._ask([f"USERNAME {_quote(username)}", f"PASSWORD {_quote(password)}",
                             f"LOGIN {self.name}", f"FSD {self.name}"], timeout)
        return next((a for a in answers if a.startswith("ERR")), answers[-1])

    def wait_status(self, value: str, timeout: float = 5.0) -> float:
        """Poll upsd until ups.status reads `value`; returns the seconds it took."""
        return self._wait(lambda answer: answer == value, timeout, f"ups.status {value!r}")

    # --- internals ------------------------------------------------------------------------

    def _ask(self, lines: list[str], timeout: float) -> list[str]:
        with (socket.create_connection((self.host, self.port), timeout=timeout) as sock,
              sock.makefile("rwb") as f):
            answers = []
            for line in lines:
                f.write(line.encode() + b"\n")
                f.flush()
                answer = f.readline()
                if not answer:
                    raise ConnectionResetError(f"upsd closed the connection after {line!r}")
                answers.append(answer.decode(errors="replace").rstrip("\r\n"))
            return answers

    def _wait(self, ok: Callable[[str], bool], timeout: float, what: str) -> float:
        t0 = time.monotonic()
        deadline = t0 + timeout
        last = "(no answer yet)"
        while True:
            try:
                last = self.query("ups.status", timeout=1.0)
                if ok(last):
                    return time.monotonic() - t0
            except OSError as e:
                last = f"{type(e).__name__}: {e}"
            self._check_alive()
            if time.monotonic() > deadline:
                raise NutServerError(f"timed out after {timeout} s waiting for {what} from upsd "
                                     f"at {self.host}:{self.port}; last answer: {last}\n"
                                     + self._logs())
            time.sleep(0.05)

    def _check_alive(self) -> None:
        for proc, what in ((self._driver, "dummy-ups"), (self._upsd, "upsd")):
            if proc is not None and proc.poll() is not None:
                raise NutServerError(f"{what} exited with {proc.returncode}\n" + self._logs())

    def _logs(self) -> str:
        return (f"--- {self.driver_log}:\n{_tail(self.driver_log)}\n"
                f"--- {self.upsd_log}:\n{_tail(self.upsd_log)}")

    def _env(self) -> dict[str, str]:
        return {**os.environ, "NUT_CONFPATH": str(self.etc), "NUT_STATEPATH": str(self.state),
                "NUT_ALTPIDPATH": str(self.state)}

    def _spawn(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        user = pwd.getpwuid(os.geteuid()).pw_name
        with log.open("ab") as out:
            out.write(f"=== {time.strftime('%H:%M:%S')} {' '.join(argv)} -u {user}\n".encode())
            out.flush()
            return subprocess.Popen([*_pdeathsig(), *argv, "-u", user], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, env=self._env(),
                                    cwd=self.base, start_new_session=True)

    def _start_driver(self, deadline: float) -> None:
        # Wait for the socket to appear, not by connecting to it: the driver serves one
        # socket event per loop of `pollinterval`, and a probe would delay upsd's by 1 s.
        # A killed driver leaves its socket behind: remove it first, for no false start.
        sock = self.state / f"dummy-ups-{self.name}"
        sock.unlink(missing_ok=True)
        self._driver = self._spawn([str(DUMMY_UPS), "-a", self.name, "-F"], self.driver_log)
        while not sock.exists():  # it appears after the driver's first loop, ~1 s
            self._check_alive()
            if time.monotonic() > deadline:
                raise NutServerError(f"dummy-ups did not create {sock} in time\n"
                                     + self._logs())
            time.sleep(0.02)
        if self._upsd is not None:
            self._wait_current(deadline)

    def _start_upsd(self, deadline: float) -> None:
        self._upsd = self._spawn([str(UPSD), "-F"], self.upsd_log)
        if self._driver is not None:
            self._wait_current(deadline)
        else:  # it can only answer ERR DRIVER-NOT-CONNECTED: wait until it answers at all
            self._wait(lambda answer: True, max(0.0, deadline - time.monotonic()),
                       "any answer")

    def _wait_current(self, deadline: float) -> None:
        status = self.vars["ups.status"]  # with an FSD that upsd keeps (see fsd()) in front
        self._wait(lambda answer: answer.removeprefix("FSD ") == status,
                   max(0.0, deadline - time.monotonic()),
                   f"ups.status {status!r} (it reads WAIT for a second at first)")

    def _write_config(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.etc.mkdir(mode=0o700, exist_ok=True)
        self.state.mkdir(mode=0o700, exist_ok=True)  # upsd warns if others can read it
        (self.etc / "ups.conf").write_text(
            f"[{self.name}]\n"
            "  driver = dummy-ups\n"
            f"  port = {_quote(str(self.datafile))}\n"  # absolute: else relative to etc/
            "  mode = dummy-once\n"
            "  pollinterval = 1\n"
            '  desc = "llm-supervisor test UPS"\n')
        (self.etc / "upsd.conf").write_text(f"LISTEN {self.host} {self.port}\n")
        users = "".join(f"[{user}]\n  password = {_quote(password)}\n  upsmon "
                        f"{'primary' if user in self.primaries else 'secondary'}\n"
                        for user, password in self.users.items())
        (self.etc / "upsd.users").write_text(users)  # must exist, even empty
        for name in ("ups.conf", "upsd.conf", "upsd.users"):
            (self.etc / name).chmod(0o600)
        self._write_data()

    def _write_data(self) -> None:
        text = "".join(f"{var}: {_quote(value)}\n" for var, value in self.vars.items())
        tmp = self.datafile.with_name(self.datafile.name + ".tmp")
        tmp.write_text(text)
        # dummy-once re-reads when st_mtime changes in whole seconds: make sure it does
        try:  # another writer (scripts/ups_model.py) may have stamped it ahead of the clock
            current = int(self.datafile.stat().st_mtime)
        except OSError:
            current = 0
        self._mtime = max(int(time.time()), self._mtime + 1, current + 1)
        os.utime(tmp, (self._mtime, self._mtime))
        os.replace(tmp, self.datafile)

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def _kill(self, proc: subprocess.Popen[bytes] | None) -> None:
        if proc is None:
            raise RuntimeError("not running")
        self._signal(proc, signal.SIGKILL)
        proc.wait()
