"""Keepers, the daemon's side: launching a model through its keeper (`_keeper.py`), talking
to it, relaunching it, and adopting the keepers a previous daemon left (docs/design.md,
"Models that outlive the supervisor").

- One keeper per model instance, in `state_dir/keep/ID/` (`ID` is `service-XXXXXXXX`): its
  control socket, its own `state.json` and `exit.json`, and our `launch.json` (what was
  launched: the service, the port, the instance's marker and a digest of the launch, so that
  a later daemon adopts only what its configuration would launch the same way).
- The daemon holds the write end of each keeper's lease (a pipe); nothing else does (made
  close-on-exec, never passed on). When the daemon ends without stopping its models, every
  lease ends: each keeper waits `adopt_grace_s` for a new daemon, then stops its model.
- A relaunch (a crash, a health restart) goes to the same keeper (`run`: a fork there, no
  Python start-up) when what is launched is the same; otherwise a new keeper.
- Each engine carries the launch marker with the keeper's id as its instance, never the
  daemon's: the daemon's orphan guardian and the start-up sweep (which stop what carries
  the daemon's own marker) leave kept models alone.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import containers as C
from . import procs as P
from .errors import SpawnError
from .logs import LogLimiter
from .statefile import Damaged, read_json

log = logging.getLogger("supervisord_llm.spawn")

_PKG = Path(__file__).resolve().parent
_LIMITER = LogLimiter(__name__)
PROTO = (1, 1)  # the keeper protocols this daemon speaks
_MAX_MESSAGE = 65536
_ASK_TIMEOUT_S = 5.0
_START_TIMEOUT_S = 10.0
_CONNECT_TIMEOUT_S = 0.5
_HELLO_TIMEOUT_S = 3.0  # a keeper slow on a loaded box is not taken for dead at once
_KILL_ANSWER_S = 5.0  # a keeper that has not answered a kill within this is killed
# the keeper runs from its compiled module (the package's __pycache__), not as a script: a
# script is compiled at every start, which costs two megabytes of the keeper's memory
_START = ("import sys; sys.path[:0] = [{pkg!r}]; import _keeper; "
          "sys.exit(_keeper.main(sys.argv[1:]))")
LAUNCH = "launch.json"


class KeeperGone(Exception):
    pass


class Spec(Protocol):
    """What is launched (spawn.LaunchSpec)."""

    @property
    def service(self) -> str: ...
    @property
    def argv(self) -> tuple[str, ...]: ...
    @property
    def cpus(self) -> tuple[int, ...] | None: ...
    @property
    def mem_node(self) -> int | None: ...
    @property
    def gen(self) -> int: ...
    @property
    def port(self) -> int | None: ...
    @property
    def stop_timeout_s(self) -> float: ...
    @property
    def digest(self) -> str: ...
    @property
    def container(self) -> C.ContainerRun | None: ...


@dataclass(frozen=True)
class KeptLaunch:
    """What a keeper was started with (its `launch.json`)."""

    keeper_id: str
    service: str
    port: int | None
    digest: str
    launch_id: str
    # its container's runtime (with its global flags), for removing what a dead keeper left
    runtime: tuple[str, ...] = ()

    def doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"keeper_id": self.keeper_id, "service": self.service,
                               "port": self.port, "digest": self.digest,
                               "launch": self.launch_id}
        if self.runtime:
            doc["runtime"] = list(self.runtime)
        return doc

    @property
    def container(self) -> str | None:
        return C.name_of(self.keeper_id) if self.runtime else None

    @classmethod
    def from_doc(cls, doc: object) -> KeptLaunch | None:
        if not isinstance(doc, dict):
            return None
        try:
            port = doc["port"]
            if port is not None and (not isinstance(port, int) or isinstance(port, bool)):
                return None
            runtime = doc.get("runtime", [])
            if not isinstance(runtime, list) or not all(isinstance(a, str) for a in runtime):
                return None
            return cls(str(doc["keeper_id"]), str(doc["service"]), port, str(doc["digest"]),
                       str(doc["launch"]), tuple(runtime))
        except KeyError:
            return None


def digest(argv: tuple[str, ...], env: dict[str, str], cpus: tuple[int, ...] | None,
           mem_node: int | None, user: str | None) -> str:
    """What makes two launches the same (the service's own settings, not the daemon's
    environment, which changes from one start to the next)."""
    doc = json.dumps([list(argv), sorted(env.items()), list(cpus or ()), mem_node, user])
    return hashlib.sha256(doc.encode()).hexdigest()[:32]


class Link:
    """The daemon's end of one keeper's control socket (SOCK_SEQPACKET, one JSON object per
    message), read on the loop. Replies come in the order of the requests; `exited` comes
    unasked and goes to `on_event`."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.name = name
        self._handler: Callable[[dict[str, Any]], None] | None = None
        self._events: list[dict[str, Any]] = []  # until there is a handler
        self._replies: deque[asyncio.Future[dict[str, Any]]] = deque()
        self.loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(64):
            try:
                data = self.sock.recv(_MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.close()
                return
            try:
                doc = json.loads(data)
            except (ValueError, RecursionError):
                doc = None
            if not isinstance(doc, dict):
                _LIMITER.warning(f"unreadable-{self.name}", "keeper %s: unreadable message "
                                 "ignored", self.name)
                continue
            if doc.get("op") == "exited":
                self._event(doc)
                continue
            while self._replies:
                fut = self._replies.popleft()
                if not fut.done():
                    fut.set_result(doc)
                    break
            else:
                self._event(doc)

    def _event(self, doc: dict[str, Any]) -> None:
        if self._handler is None:
            if len(self._events) < 64:
                self._events.append(doc)
            return
        self._handler(doc)

    def on_event(self, handler: Callable[[dict[str, Any]], None]) -> None:
        """Where unasked messages go (those that came before are handed on now)."""
        self._handler = handler
        events, self._events = self._events, []
        for doc in events:
            handler(doc)

    def expect(self) -> asyncio.Future[dict[str, Any]]:
        """A slot for the next message that is not an event (a reply, `started`)."""
        fut: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        if self.closed.done():
            fut.set_exception(KeeperGone(f"keeper {self.name} is gone"))
        else:
            self._replies.append(fut)
        return fut

    def send(self, doc: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
        if self.closed.done():
            raise KeeperGone(f"keeper {self.name} is gone")
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] \
            if fds else []
        try:
            self.sock.sendmsg([json.dumps(doc).encode()], anc)
        except OSError as exc:  # full (a keeper that does not read) or gone
            raise KeeperGone(f"keeper {self.name}: {exc.strerror or exc}") from None

    async def ask(self, doc: dict[str, Any], fds: tuple[int, ...] = (),
                  timeout_s: float = _ASK_TIMEOUT_S) -> dict[str, Any]:
        fut = self.expect()
        try:
            self.send(doc, fds)
        except KeeperGone:
            fut.cancel()
            raise
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(fut)
        except TimeoutError:
            raise KeeperGone(f"keeper {self.name} did not answer {doc.get('op')} within "
                             f"{timeout_s:g} s") from None

    def close(self) -> None:
        if self.closed.done():
            return
        self.closed.set_result(None)
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        while self._replies:
            fut = self._replies.popleft()
            if not fut.done():
                fut.set_exception(KeeperGone(f"keeper {self.name} is gone"))
                fut.exception()  # retrieved: nobody may wait for it any more


def _code(exit_doc: object) -> int:
    """A keeper's exit record as a returncode (negative: the signal)."""
    if isinstance(exit_doc, dict):
        sig, code = exit_doc.get("signal"), exit_doc.get("code")
        if isinstance(sig, int) and not isinstance(sig, bool):
            return -sig
        if isinstance(code, int) and not isinstance(code, bool):
            return code
    return 255


class KeptProcess:
    """A model instance that runs under its keeper: what the service actor sees of a launch
    (its pid and group, its exit when it happens, the processes that escaped its group)."""

    def __init__(self, keepers: Keepers, spec: Spec, record: KeptLaunch, link: Link,
                 snap: dict[str, Any], *, keeper_pid: int, adopted: bool,
                 outdated: bool = False) -> None:
        self.spec = spec
        self.record = record
        self.keeper_id = record.keeper_id
        self.launch_id = record.launch_id
        self.port = record.port
        self.adopted = adopted
        self.link = link
        self.keeper_pid = keeper_pid
        self.escapees: dict[int, P.Escapee] = {}
        self.log_task: asyncio.Task[None] | None = None
        self._keepers = keepers
        self._released = False
        self._early: dict[int, int] = {}
        # a keeper of another protocol: only `stop` (its `exited` is not ours to read; the
        # engine's end is seen through a pidfd, its status from the stop's reply if any)
        self.outdated = outdated
        self._stop_sent = False
        self.tail: list[str] = []  # the last lines of output of the run that ended
        self._new_run(snap)
        link.on_event(self._event)
        link.closed.add_done_callback(lambda _f: self._keeper_gone())
        if outdated:
            self._watch_engine()

    def _new_run(self, snap: dict[str, Any]) -> None:
        self.pid = int(snap.get("pid") or 0)
        self.pgid = self.pid
        ticks = snap.get("ticks")
        self.start_ticks = ticks if isinstance(ticks, int) else 0
        self.create_time = _create_time(self.pid)
        self.launched_at = time.monotonic()
        self.gen = snap.get("gen")
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        early = self._early.pop(self.pid, None)  # its exit came with the reply that started it
        if snap.get("state") == "exited":
            self._exited.set_result(_code(snap.get("exit")))
        elif early is not None:
            self._exited.set_result(early)
        self._early.clear()

    def _watch_engine(self) -> None:
        fd = P.pidfd(self.pid)
        if fd is None:
            if not self._exited.done():
                self._exited.set_result(255)
            return
        loop = asyncio.get_running_loop()

        def ended() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            if not self._exited.done():
                self._exited.set_result(255)  # its status is the outdated keeper's

        loop.add_reader(fd, ended)

    def _event(self, doc: dict[str, Any]) -> None:
        if self.outdated:
            return
        if doc.get("op") != "exited":
            return
        tail = doc.get("tail")
        if isinstance(tail, list):  # the last lines it wrote (a runtime's refusal)
            self.tail = [str(x)[:1000] for x in tail[-8:]]
        pid = doc.get("pid")
        if isinstance(pid, int) and pid != self.pid:
            self._early[pid] = _code(doc.get("exit"))  # a run not known here yet
        elif not self._exited.done():
            self._exited.set_result(_code(doc.get("exit")))

    def _keeper_gone(self) -> None:
        """The keeper ended (killed): its engine got the parent-death signal."""
        if not self._exited.done():
            if not self._released and not self._keepers.closing \
                    and not self._keepers.ending(self.keeper_id):
                log.error("%s: its keeper (pid %d) ended while the model ran",
                          self.spec.service, self.keeper_pid)
            self._exited.set_result(-int(signal.SIGKILL))

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def signal_group(self, sig: int) -> bool:
        """Signal the whole group (through the keeper, its parent: it knows the group even
        after its leader ended); False if nothing of it is left."""
        if self._released or not self.group_alive():
            return False
        if self.outdated:
            return self._signal_outdated(sig)
        if sig == signal.SIGKILL:
            self.kill_group()  # not only through the keeper: it may be frozen
        try:
            self.link.send({"op": "signal", "sig": int(sig)})
        except KeeperGone:
            # the keeper is gone (killed): what it left in the group is signalled from here
            if sig != signal.SIGKILL:
                with contextlib.suppress(OSError):
                    os.killpg(self.pgid, sig)
            return True
        reply = self.link.expect()  # its `ok`, read and dropped
        if sig == signal.SIGKILL:
            # a keeper that does not answer a kill is frozen: the engine it cannot reap
            # would stay a zombie in the group (the stop would wait for the heartbeat)
            asyncio.get_running_loop().call_later(
                _KILL_ANSWER_S, lambda: None if reply.done() else
                self._keepers.kill_keeper(self.keeper_id, "does not answer a kill"))
        return True

    def kill_group(self) -> None:
        """SIGKILL to the engine's group from the daemon itself: while its leader lives, only
        when the pid is still the one launched (its start time)."""
        if self.returncode is None:
            st = P.stat(self.pid)
            if st is None or st.start_ticks != self.start_ticks:
                return
        with contextlib.suppress(OSError):
            os.killpg(self.pgid, signal.SIGKILL)

    def _signal_outdated(self, sig: int) -> bool:
        """An outdated keeper takes only `stop` (TERM, then KILL after the timeout, itself);
        a SIGKILL goes to the group directly, the engine proven by its start time."""
        if sig == signal.SIGKILL:
            self.kill_group()
            return True
        if sig in (signal.SIGCONT, 0) or self._stop_sent:
            return True
        self._stop_sent = True
        try:
            self.link.send({"op": "stop", "timeout_s": self.spec.stop_timeout_s})
        except KeeperGone:
            return False
        reply = self.link.expect()

        def stopped(fut: asyncio.Future[dict[str, Any]]) -> None:
            if not fut.cancelled() and fut.exception() is None and not self._exited.done():
                self._exited.set_result(_code(fut.result().get("exit")))

        reply.add_done_callback(stopped)
        return True

    def group_alive(self) -> bool:
        if self._released or self.pgid <= 0:
            return False
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    async def find_escaped(self) -> list[P.Escapee]:
        found = await asyncio.to_thread(
            P.scan_escaped, self.keeper_id, self.spec.service, self.launch_id,
            pgid=self.pgid, since_ticks=self.start_ticks, pipe_link=None)
        for esc in found:
            known = self.escapees.get(esc.pid)
            if known is not None and known.alive():
                esc.close()
                continue
            if known is not None:
                known.close()
            self.escapees[esc.pid] = esc
        return [self.escapees[e.pid] for e in found]

    def signal_escapees(self, sig: int, only_new: bool = False) -> int:
        n = 0
        for esc in self.escapees.values():
            if (not only_new or not esc.signalled) and esc.alive() and esc.signal(sig):
                n += 1
        return n

    def escapees_alive(self) -> bool:
        return any(e.alive() for e in self.escapees.values())

    def close_output(self) -> None:
        """The output never comes through the daemon: nothing to close."""

    def release(self, keep: bool = False) -> None:
        """The run is over (group and escapees gone). With `keep`, the keeper stays for a
        relaunch of the same launch; otherwise it is told to exit."""
        if self._released:
            return
        self._released = True
        for esc in self.escapees.values():
            esc.close()
        self.escapees.clear()
        self._keepers.released(self, keep)

    async def relaunch(self, gen: int) -> None:
        """The same launch again in the same keeper (a fork there)."""
        reply = await self.link.ask({"op": "run", "gen": gen})
        if reply.get("op") != "started":
            raise KeeperGone(str(reply.get("message") or reply))
        self._released = False
        self.adopted = False
        self._new_run(reply)


def _create_time(pid: int) -> float:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:
        return 0.0


@dataclass
class _Keeper:
    """A keeper of ours: its process, its lease's write end, its link."""

    record: KeptLaunch
    dir: Path
    pid: int
    pidfd: int | None
    lease_w: int | None
    link: Link
    proc: KeptProcess | None = None
    child: bool = False  # our child (to be reaped), not one adopted from an earlier daemon
    heard: float = field(default_factory=lambda: asyncio.get_running_loop().time())
    gone: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop()
                                       .create_future())


@dataclass(frozen=True)
class Adoptable:
    """A keeper an earlier daemon left whose model still runs."""

    proc: KeptProcess
    record: KeptLaunch
    gen: int


class Keepers:
    """Every keeper of this daemon: launched, idle between two runs of a launch, adopted."""

    def __init__(self, base: Path | None, *, grace_s: float = 30.0,
                 unattended_s: float = 300.0, log_format: str = "plain",
                 output_fd: int = 2, systemd: SystemdHooks | None = None) -> None:
        self.base = base
        # under systemd: each keeper in a transient unit of its own (out of the daemon's
        # cgroup, which a restart of the daemon's unit ends), each lease's write end also in
        # the daemon's file descriptor store (so that a restart never ends a lease)
        self.systemd = systemd
        self.grace_s = grace_s
        self.unattended_s = unattended_s
        self.log_format = log_format
        self.output_fd = output_fd
        self._own_tmp: Path | None = None
        self._all: dict[str, _Keeper] = {}
        self._idle: dict[str, _Keeper] = {}  # service -> a keeper kept for a relaunch
        self.limiter = LogLimiter(__name__)
        self.adoptions = 0
        self._dead: list[tuple[Path, bool]] = []  # keepers found dead at the adoption
        self._ending: set[str] = set()  # keepers the daemon stopped or killed itself
        self._removing: set[asyncio.Future[None]] = set()  # directories being removed
        self._dead_containers: list[tuple[tuple[str, ...], str]] = []
        self.closing = False

    def _dir(self) -> Path:
        if self.base is None:
            if self._own_tmp is None:
                import tempfile

                self._own_tmp = Path(tempfile.mkdtemp(prefix="llm-supervisor-keep-"))
            return self._own_tmp
        if not self.base.parent.is_dir():  # the state directory, removed under us
            self.base.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            log.warning("state directory %s was missing: created it again", self.base.parent)
        self.base.mkdir(mode=0o700, exist_ok=True)
        return self.base

    def _remove(self, path: Path) -> None:
        """A keeper's directory removed off the loop (`close` waits for it)."""
        fut = asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, path, True)
        self._removing.add(fut)
        fut.add_done_callback(self._removing.discard)

    @property
    def state_label(self) -> str:
        """The state directory its containers are labelled with (a later supervisor on the
        same directory removes what a dead run of it left, and nothing else)."""
        return str(self.base.parent) if self.base is not None else str(self._dir())

    def _prepare(self, record: KeptLaunch) -> Path:
        """A new keeper's directory, with our record of its launch. Blocking."""
        kdir = self._dir() / record.keeper_id
        kdir.mkdir(mode=0o700)
        (kdir / LAUNCH).write_text(json.dumps(record.doc()))
        return kdir

    # --- launching -------------------------------------------------------------------------

    async def launch(self, spec: Spec, env: dict[str, str], creds: str,
                     marker: Callable[[str, str], dict[str, str]]) -> KeptProcess:
        """Run `spec` under a keeper: the idle one of the same launch (a relaunch), else a
        new one. `marker(keeper_id, launch_id)` gives the launch marker's variables."""
        record_digest, gen, port = spec.digest or repr(spec.argv), spec.gen, spec.port
        stop_timeout_s = spec.stop_timeout_s
        idle = self._idle.pop(spec.service, None)
        if idle is not None and idle.proc is not None and not idle.gone.done() \
                and idle.record.digest == record_digest and idle.record.port == port:
            try:
                await idle.proc.relaunch(gen)
                return idle.proc
            except KeeperGone as exc:
                log.warning("%s: relaunch in its keeper failed (%s); starting a new one",
                            spec.service, exc)
                await self._stop_keeper(idle, 0.0)
        elif idle is not None:
            await self._stop_keeper(idle, 0.0)
        keeper_id = f"{spec.service}-{secrets.token_hex(4)}"
        run = spec.container
        argv = spec.argv
        record = KeptLaunch(keeper_id, spec.service, port, record_digest, "1",
                            run.runtime if run is not None else ())
        kdir = await asyncio.to_thread(self._prepare, record)  # (file system: off the loop)
        env = {**env, **marker(keeper_id, record.launch_id)}
        cpus = ",".join(str(c) for c in spec.cpus) if spec.cpus else "-"
        mem = str(spec.mem_node) if spec.mem_node is not None else "-"
        keeper_args = ["--id", keeper_id, "--dir", str(kdir), "--service", spec.service,
                       "--gen", str(gen), "--grace", f"{self.grace_s:g}",
                       "--unattended", f"{self.unattended_s:g}",
                       "--stop-timeout", f"{stop_timeout_s:g}", "--cpus", cpus,
                       "--mem-node", mem, "--creds", creds, "--log-format", self.log_format]
        if run is not None:  # named and labelled after its keeper; stopped and removed by it
            argv = run.argv(spec.service, keeper_id, self.state_label)
            keeper_args += ["--container", C.name_of(keeper_id),
                            "--runtime", json.dumps(list(run.runtime))]
            if run.pull:
                keeper_args += ["--pull", run.image, "--pull-timeout", f"{run.pull_timeout_s:g}"]
        if self.systemd is not None:
            return await self._launch_unit(spec, record, kdir, keeper_args, env, argv=argv)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        lease_r, lease_w = os.pipe()
        link = Link(ours, keeper_id)
        started = link.expect()
        try:
            args = [sys.executable, "-I", "-S", "-c", _START.format(pkg=str(_PKG)),
                    *keeper_args, "--lease-fd", "3", "--client-fd", "4", "--", *argv]
            pid = _spawn_keeper(args, env, lease_r, theirs.fileno(), self.output_fd)
        except OSError as exc:
            link.close()
            os.close(lease_w)
            self._remove(kdir)
            raise SpawnError(f"cannot start the keeper of {spec.service}: "
                             f"{exc.strerror or exc}") from None
        finally:
            os.close(lease_r)
            theirs.close()
        k = _Keeper(record, kdir, pid, P.pidfd(pid), lease_w, link, child=True)
        self._watch(k)
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                snap = await asyncio.shield(started)
        except (TimeoutError, KeeperGone):
            await self._stop_keeper(k, 0.0)
            raise SpawnError(f"the keeper of {spec.service} did not start (see its "
                             "output above)") from None
        proc = KeptProcess(self, spec, record, link, snap, keeper_pid=pid, adopted=False)
        k.proc = proc
        return proc

    async def _launch_unit(self, spec: Spec, record: KeptLaunch, kdir: Path,
                           keeper_args: list[str], env: dict[str, str], *,
                           argv: tuple[str, ...]) -> KeptProcess:
        """Under systemd: the keeper in a transient unit of its own (started by PID 1: it
        inherits nothing of ours), then connected to through its socket and given its lease
        (parked in the file descriptor store too)."""
        assert self.systemd is not None
        unit = unit_of(record.keeper_id)
        args = [sys.executable, "-I", "-S", "-c", _START.format(pkg=str(_PKG)), *keeper_args,
                "--", *argv]
        try:
            # (a container's keeper also waits on the runtime's stop and rm: its unit's stop
            # timeout, the engine's plus 30 s, covers them too)
            await self.systemd.start_unit(unit, f"llm-supervisor keeper of {spec.service}",
                                          args, env, spec.stop_timeout_s
                                          + (60.0 if record.runtime else 0.0))
        except SpawnError:
            self._remove(kdir)
            raise
        try:
            link, snap = await self._connect(kdir, _START_TIMEOUT_S)
        except KeeperGone as exc:
            await self.systemd.stop_unit(unit)
            self._remove(kdir)
            raise SpawnError(f"the keeper of {spec.service} did not start ({exc}; "
                             f"`journalctl -u {unit}`)") from None
        pid = snap.get("keeper_pid")
        if snap.get("op") != "snapshot" or not isinstance(pid, int):
            link.close()
            await self.systemd.stop_unit(unit)
            raise SpawnError(f"the keeper of {spec.service} answered {snap.get('op')!r}")
        lease_w = await self._give_lease(link, record.keeper_id)
        k = _Keeper(record, kdir, pid, P.pidfd(pid), lease_w, link)
        self._watch(k)
        proc = KeptProcess(self, spec, record, link, snap, keeper_pid=pid, adopted=False)
        k.proc = proc
        return proc

    async def _connect(self, kdir: Path, timeout_s: float) -> tuple[Link, dict[str, Any]]:
        """Connect to a keeper's socket (waiting up to `timeout_s` for it to appear) and say
        hello: its snapshot (or its `error proto`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                sock = await P.connect_in(kdir, "ctl.sock", _CONNECT_TIMEOUT_S)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if loop.time() >= deadline:
                    raise KeeperGone(f"no socket: {exc.strerror}") from None
                await asyncio.sleep(0.005)
            except (OSError, TimeoutError) as exc:
                raise KeeperGone(str(exc) or "no answer") from None
        link = Link(sock, kdir.name)
        try:
            snap = await link.ask({"op": "hello", "proto": list(PROTO)},
                                  timeout_s=_HELLO_TIMEOUT_S)
        except KeeperGone:
            link.close()
            raise
        return link, snap

    async def _give_lease(self, link: Link, keeper_id: str) -> int:
        """A new lease: its read end to the keeper, its write end kept (and, under systemd,
        parked in the fd store). Raises KeeperGone."""
        lease_r, lease_w = os.pipe()
        try:
            reply = await link.ask({"op": "lease"}, fds=(lease_r,))
        except KeeperGone:
            os.close(lease_w)
            raise
        finally:
            os.close(lease_r)
        if reply.get("op") != "ok":
            log.warning("keeper %s refused a lease (%s): its model stops after its grace",
                        keeper_id, reply.get("message"))
        if self.systemd is not None:
            self.systemd.forget(lease_name(keeper_id))  # one lease per keeper in the store
            self.systemd.store(lease_w, lease_name(keeper_id))
        return lease_w

    def _watch(self, k: _Keeper) -> None:
        self._all[k.record.keeper_id] = k
        loop = asyncio.get_running_loop()
        if k.pidfd is None:
            k.gone.set_result(None)
            return

        def ended() -> None:
            loop.remove_reader(k.pidfd)  # type: ignore[arg-type]
            if k.child:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(k.pid, os.WNOHANG)
            os.close(k.pidfd)  # type: ignore[arg-type]
            k.pidfd = None
            self._forget(k)
            if not k.gone.done():
                k.gone.set_result(None)

        loop.add_reader(k.pidfd, ended)

    def _forget(self, k: _Keeper) -> None:
        self._ending.discard(k.record.keeper_id)
        if self._all.get(k.record.keeper_id) is k:
            del self._all[k.record.keeper_id]
        if self._idle.get(k.record.service) is k:
            del self._idle[k.record.service]
        if k.lease_w is not None:
            os.close(k.lease_w)
            k.lease_w = None
            if self.systemd is not None:
                self.systemd.forget(lease_name(k.record.keeper_id))
        k.link.close()
        if k.record.runtime:
            self._track(self._container_after(k))
        else:
            self._remove(k.dir)

    def _track(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._removing.add(task)
        task.add_done_callback(self._removing.discard)

    async def _container_after(self, k: _Keeper) -> None:
        """A keeper of a container ended: one that ended without writing its exit (killed),
        or whose exit says its runtime could not remove the container, left it; it is
        removed here (once more). Then its directory goes."""
        end = await asyncio.to_thread(_read_json, k.dir / "exit.json")
        name = k.record.container
        removed = isinstance(end, dict) and end.get("container_removed") is not False
        if not removed and name is not None:
            log.warning("%s: keeper %s ended without removing its container %s: removing it",
                        k.record.service, k.record.keeper_id, name)
            await C.remove(k.record.runtime, [name], 10.0)
        await asyncio.to_thread(shutil.rmtree, k.dir, True)

    async def sweep_containers(self, runtimes: set[tuple[str, ...]]) -> list[str]:
        """At start, after the adoption: remove the containers labelled with this state
        directory whose keeper is not one of ours now (a dead run's)."""
        if not runtimes:
            return []
        return await C.sweep(sorted(runtimes), self.state_label, set(self._all))

    def released(self, proc: KeptProcess, keep: bool) -> None:
        k = self._all.get(proc.keeper_id)
        if k is None:
            return
        if keep and k.proc is proc and not k.gone.done() and not proc.outdated:
            old = self._idle.pop(proc.spec.service, None)
            self._idle[proc.spec.service] = k
            if old is not None and old is not k:
                asyncio.get_running_loop().create_task(self._stop_keeper(old, 0.0))
            return
        asyncio.get_running_loop().create_task(self._stop_keeper(k, 0.0))

    def retire(self, service: str) -> None:
        """The service will not be launched again soon: its idle keeper goes."""
        k = self._idle.pop(service, None)
        if k is not None:
            asyncio.get_running_loop().create_task(self._stop_keeper(k, 0.0))

    async def _stop_keeper(self, k: _Keeper, timeout_s: float) -> None:
        """Tell a keeper to stop (its model, if any, first) and wait until it is gone; one
        that does not answer is killed."""
        self._ending.add(k.record.keeper_id)
        with contextlib.suppress(KeeperGone):
            k.link.send({"op": "stop", "timeout_s": timeout_s})
        # a container's keeper has the runtime's stop and rm to wait for (bounded there:
        # 15 s and 30 s more, and what they leave given 7 s): killed sooner, it could not
        # clean up what the runtime left
        extra = 60.0 if k.record.runtime else 0.0
        try:
            async with asyncio.timeout(timeout_s + 5.0 + extra):
                await asyncio.shield(k.gone)
        except TimeoutError:
            log.error("keeper %s (pid %d) did not stop: killing it", k.record.keeper_id, k.pid)
            self._kill(k)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await asyncio.shield(k.gone)

    def _kill(self, k: _Keeper) -> None:
        self._ending.add(k.record.keeper_id)
        if k.pidfd is not None:
            P.send(k.pidfd, signal.SIGKILL)

    def kill_keeper(self, keeper_id: str, why: str) -> None:
        k = self._all.get(keeper_id)
        if k is not None and not k.gone.done():
            log.error("keeper %s (pid %d) %s: killing it (its model with it)", keeper_id,
                      k.pid, why)
            self._kill(k)

    def ending(self, keeper_id: str) -> bool:
        """Whether the daemon itself ended this keeper (stopped or killed it)."""
        return keeper_id in self._ending

    # --- adopting --------------------------------------------------------------------------

    async def adopt(self) -> list[Adoptable]:
        """The keepers an earlier daemon left: each is connected to and given a lease. Those
        whose model still runs are returned (for the actors to adopt, or to stop); those
        that do not answer are killed with what they kept; those whose model ended are
        told to exit."""
        if self.base is None or not self.base.is_dir():
            return []
        found: list[Adoptable] = []
        self._dead = []
        for kdir in sorted(await asyncio.to_thread(_dirs, self.base)):
            try:
                got = await self._adopt_one(kdir)
            except Exception:  # one broken keeper never stops the start
                self.limiter.exception(f"adopt-{kdir.name}", "keeper %s: not adopted",
                                       kdir.name)
                continue
            if got is not None:
                found.append(got)
        await self._bury(self._dead)
        return found

    async def _adopt_one(self, kdir: Path) -> Adoptable | None:
        record = KeptLaunch.from_doc(await asyncio.to_thread(_read_json, kdir / LAUNCH))
        state = await asyncio.to_thread(_read_json, kdir / "state.json")
        keeper_pid = state.get("keeper_pid") if isinstance(state, dict) else None
        for attempt in range(4):
            try:
                link, snap = await self._connect(kdir, 0.0)
            except KeeperGone as exc:
                # a keeper that lives (a stray connection in its way, a slow box) is asked
                # again before it is taken for dead
                if attempt < 3 and isinstance(keeper_pid, int) \
                        and keeper_args(keeper_pid).get("dir") == str(kdir):
                    await asyncio.sleep(0.3)
                    continue
                await self._dead_keeper(kdir, record, keeper_pid, str(exc))
                return None
            if snap.get("code") == "busy" and attempt < 3:
                link.close()
                await asyncio.sleep(0.3)
                continue
            break
        if snap.get("op") == "error" and snap.get("code") == "busy":
            log.error("keeper %s is attached to another supervisor (%s): left alone",
                      kdir.name, snap.get("message"))
            link.close()
            return None
        if snap.get("op") == "error" and snap.get("code") == "proto" and record is not None \
                and isinstance(state, dict):
            return await self._adopt_outdated(kdir, record, state, link, snap.get("proto"))
        pid = snap.get("keeper_pid")
        if snap.get("op") != "snapshot" or record is None or not isinstance(pid, int) \
                or record.keeper_id != kdir.name:
            why = snap.get("message") if snap.get("op") == "error" else "an unknown launch"
            log.warning("keeper %s: %s; stopping it and its model", kdir.name, why)
            with contextlib.suppress(KeeperGone):
                await link.ask({"op": "stop"}, timeout_s=60.0)
            link.close()
            await asyncio.to_thread(shutil.rmtree, kdir, True)
            return None
        lease_w = self.systemd.take(lease_name(record.keeper_id)) \
            if self.systemd is not None else None
        if lease_w is None or not snap.get("lease"):  # (a restart under systemd keeps it)
            if lease_w is not None:
                os.close(lease_w)
            try:
                lease_w = await self._give_lease(link, record.keeper_id)
            except KeeperGone:
                link.close()
                return None
        k = _Keeper(record, kdir, pid, P.pidfd(pid), lease_w, link)
        self._watch(k)
        self._settings(k)  # this daemon's grace and unattended limit, not the earlier one's
        gen = snap.get("gen")
        proc = KeptProcess(self, _AdoptedSpec(record.service), record, link, snap,
                           keeper_pid=pid, adopted=True)
        k.proc = proc
        if snap.get("state") != "running":  # its model ended while no daemon was there
            log.info("keeper %s: its model ended (%s); not adopted", kdir.name,
                     snap.get("exit"))
            await self._stop_keeper(k, 0.0)
            return None
        return Adoptable(proc, record, gen if isinstance(gen, int) else 0)

    async def _adopt_outdated(self, kdir: Path, record: KeptLaunch, state: dict[str, Any],
                              link: Link, proto: object) -> Adoptable | None:
        """A keeper of another protocol (a release apart): its model keeps serving, under a
        new lease; the keeper is only ever told to stop (the two operations every protocol
        keeps), and shown `outdated`. Its engine is proven by the pid and start time its
        state file recorded."""
        pid, ticks, keeper_pid = state.get("pid"), state.get("ticks"), state.get("keeper_pid")
        st = P.stat(pid) if isinstance(pid, int) and not isinstance(pid, bool) else None
        if st is None or st.start_ticks != ticks or not isinstance(keeper_pid, int):
            log.warning("keeper %s speaks protocol %s and its model cannot be proven from its "
                        "state file: stopping it", kdir.name, proto)
            with contextlib.suppress(KeeperGone):
                await link.ask({"op": "stop"}, timeout_s=60.0)
            link.close()
            await asyncio.to_thread(shutil.rmtree, kdir, True)
            return None
        assert isinstance(pid, int)
        lease_w = self.systemd.take(lease_name(record.keeper_id)) \
            if self.systemd is not None else None
        if lease_w is None:
            try:
                lease_w = await self._give_lease(link, record.keeper_id)
            except KeeperGone:
                link.close()
                return None
        log.warning("keeper %s speaks protocol %s, not %d-%d: its model is adopted as it "
                    "runs (outdated: it can only be stopped; a restart gets a new keeper)",
                    kdir.name, proto, *PROTO)
        k = _Keeper(record, kdir, keeper_pid, P.pidfd(keeper_pid), lease_w, link)
        self._watch(k)
        gen = state.get("gen")
        snap = {"pid": pid, "ticks": ticks, "gen": gen, "state": "running"}
        proc = KeptProcess(self, _AdoptedSpec(record.service), record, link, snap,
                           keeper_pid=keeper_pid, adopted=True, outdated=True)
        k.proc = proc
        return Adoptable(proc, record, gen if isinstance(gen, int) else 0)

    async def _dead_keeper(self, kdir: Path, record: KeptLaunch | None, keeper_pid: object,
                           why: str) -> None:
        """A keeper that does not answer: killed if it is still there (proven a keeper by its
        command line); what carries its marker, and its directory, go with the others at the
        end of the adoption (one pass over /proc for all of them)."""
        real = False
        if isinstance(keeper_pid, int) and not isinstance(keeper_pid, bool) and keeper_pid > 1:
            fd = P.pidfd(keeper_pid)
            if fd is not None:
                try:
                    # ours: a keeper of this very directory (a copy of a state directory
                    # names the keepers of another one)
                    if keeper_args(keeper_pid).get("dir") == str(kdir):
                        real = True
                        log.warning("keeper %s (pid %d) does not answer (%s): killing it",
                                    kdir.name, keeper_pid, why)
                        P.send(fd, signal.SIGKILL)
                finally:
                    os.close(fd)
        self._dead.append((kdir, real or record is not None))
        if record is not None and record.container is not None:
            self._dead_containers.append((record.runtime, record.container))

    async def _bury(self, dead: list[tuple[Path, bool]]) -> None:
        if not dead:
            return
        names = {kdir.name for kdir, _ in dead}
        # a keeper of the same id alive with another directory (this state directory is a
        # copy): neither it nor what carries its marker is ours
        elsewhere = {kid for kid, kdir in (await asyncio.to_thread(live_keepers)).items()
                     if kid in names and kdir != str(self.base / kid if self.base else "")}
        for kid in sorted(elsewhere):
            log.warning("keeper %s runs for another state directory: left alone (only this "
                        "directory's record of it is removed)", kid)
        names -= elsewhere
        dead = [(kdir, real and kdir.name in names) for kdir, real in dead]
        if self.systemd is not None:
            for name in names:
                fd = self.systemd.take(lease_name(name))
                if fd is not None:
                    os.close(fd)
                    self.systemd.forget(lease_name(name))
            for kdir, real in dead:
                if real:  # (a directory that was never a keeper's has no unit)
                    await self.systemd.stop_unit(unit_of(kdir.name))
        left = await asyncio.to_thread(P.scan_marked, names) if names else []
        if left:
            log.warning("stopping %d process(es) left by keepers that did not answer: %s",
                        len(left), ", ".join(sorted({x.service for x in left})))
        try:
            await P.stop_pidfds([x.pidfd for x in left], 5.0)
        finally:
            for x in left:
                os.close(x.pidfd)
        by_runtime: dict[tuple[str, ...], list[str]] = {}
        for runtime, name in self._dead_containers:
            if C.keeper_of(name) in names:
                by_runtime.setdefault(runtime, []).append(name)
        self._dead_containers = []
        for runtime, cnames in by_runtime.items():
            log.warning("removing the container(s) of keepers that did not answer: %s",
                        ", ".join(cnames))
            await C.remove(runtime, cnames, 10.0)
        for kdir, _ in dead:
            await asyncio.to_thread(shutil.rmtree, kdir, True)

    def adopted(self, item: Adoptable, spec: Spec) -> None:
        """An actor took the adopted instance: it now has its launch spec (and its keeper
        this configuration's stop timeout)."""
        item.proc.spec = spec
        self.adoptions += 1
        k = self._all.get(item.record.keeper_id)
        if k is not None and not item.proc.outdated:
            self._settings(k, spec.stop_timeout_s)

    def _settings(self, k: _Keeper, stop_timeout_s: float | None = None) -> None:
        doc: dict[str, Any] = {"op": "settings", "grace_s": self.grace_s,
                               "unattended_s": self.unattended_s}
        if stop_timeout_s is not None:
            doc["stop_timeout_s"] = stop_timeout_s
        with contextlib.suppress(KeeperGone):
            k.link.send(doc)
            k.link.expect()  # its ok, read and dropped

    async def stop_adoptable(self, item: Adoptable, timeout_s: float) -> None:
        k = self._all.get(item.record.keeper_id)
        if k is not None:
            await self._stop_keeper(k, timeout_s)

    # --- the end ---------------------------------------------------------------------------

    async def heartbeat(self) -> None:
        """A word to every keeper now and then (`ping`): a keeper that hears nothing from a
        supervisor for `unattended_s` stops its model, attached or not (a frozen daemon
        watches nothing)."""
        period = max(0.5, min(30.0, self.unattended_s / 4))
        while True:
            await asyncio.sleep(period)
            now = asyncio.get_running_loop().time()
            for k in list(self._all.values()):
                if k.proc is not None and k.proc.outdated:
                    continue  # (it may not know ping)
                if now - k.heard > max(3 * period, 15.0) and not k.gone.done():
                    # a keeper that stopped answering (frozen): its model cannot be stopped
                    # through it, so it goes, its model with it (the parent-death signal)
                    log.error("keeper %s (pid %d) has not answered for %.0f s: killing it",
                              k.record.keeper_id, k.pid, now - k.heard)
                    self._kill(k)
                    if k.proc is not None:
                        k.proc.kill_group()
                    continue
                with contextlib.suppress(KeeperGone):
                    k.link.send({"op": "ping"})
                    k.link.expect().add_done_callback(functools.partial(self._heard, k))

    @staticmethod
    def _heard(k: _Keeper, fut: asyncio.Future[dict[str, Any]]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            k.heard = asyncio.get_running_loop().time()

    def keeper_pids(self) -> list[int]:
        return [k.pid for k in self._all.values()]

    def kill_all(self) -> None:
        """Fast stop: SIGKILL every keeper's model (the keepers then exit when told)."""
        for k in list(self._all.values()):
            with contextlib.suppress(KeeperGone):
                k.link.send({"op": "signal", "sig": int(signal.SIGKILL)})

    async def close(self, handover: bool = False) -> None:
        """Stop every keeper (their models are stopped already; a model still running is
        stopped by its keeper) and wait until they are gone; with `handover`, leave them:
        their leases end, and each waits `adopt_grace_s` for the next daemon."""
        self.closing = True
        keepers = list(self._all.values())
        if not handover:
            await asyncio.gather(*(self._stop_keeper(k, 10.0) for k in keepers))
        for k in keepers:
            if k.lease_w is not None:
                os.close(k.lease_w)
                k.lease_w = None
            k.link.close()
            if k.pidfd is not None:
                with contextlib.suppress(ValueError, OSError):
                    asyncio.get_running_loop().remove_reader(k.pidfd)
                os.close(k.pidfd)
                k.pidfd = None
        self._all.clear()
        self._idle.clear()
        if self._removing:
            # (a container's removal by a runtime that hangs: not waited for beyond this;
            # what is left is removed by the next start's sweep)
            _done, pending = await asyncio.wait(self._removing, timeout=1.0)
            if pending:
                log.info("waiting for %d container removal(s) (at most 30 s)", len(pending))
                _done, pending = await asyncio.wait(pending, timeout=29.0)
            if pending:
                log.error("%d container removal(s) still running after 30 s: cancelled (the "
                          "next start removes what they leave)", len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=10.0)
        if self._own_tmp is not None and not handover:
            shutil.rmtree(self._own_tmp, ignore_errors=True)


@dataclass(frozen=True)
class _AdoptedSpec:
    """The launch spec of an adopted instance until its actor gives the real one."""

    service: str
    argv: tuple[str, ...] = ()
    cpus: tuple[int, ...] | None = None
    mem_node: int | None = None
    gen: int = 0
    port: int | None = None
    stop_timeout_s: float = 10.0
    digest: str = ""
    container: C.ContainerRun | None = None


def keeper_args(pid: int) -> dict[str, str]:
    """A keeper's options (`--id`, `--dir`, ...) from its command line; empty if the process
    is not a keeper."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read(1 << 16).decode("utf-8", "replace").split("\0")
    except OSError:
        return {}
    if not any("_keeper" in a for a in argv[:6]):  # (python -I -S -c "...import _keeper")
        return {}
    out: dict[str, str] = {}
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg.startswith("--") and i + 1 < len(argv):
            out.setdefault(arg[2:], argv[i + 1])
    return out


def live_keepers() -> dict[str, str]:
    """Every keeper running on this machine: its id -> its directory. Blocking."""
    out: dict[str, str] = {}
    for pid in P.pids():
        args = keeper_args(pid)
        if "id" in args and "dir" in args:
            out[args["id"]] = args["dir"]
    return out


def lease_name(keeper_id: str) -> str:
    """Its lease's name in systemd's file descriptor store."""
    return f"lease-{keeper_id}"


def unit_of(keeper_id: str) -> str:
    """A keeper's transient unit (only the id's random part: any service name is valid in a
    config, not every one in a unit name)."""
    return f"llm-keep-{keeper_id.rpartition('-')[2]}.service"


class SystemdHooks(Protocol):
    """What the keepers need of systemd (systemd.py's `Systemd`)."""

    async def start_unit(self, unit: str, description: str, argv: list[str],
                         env: dict[str, str], stop_timeout_s: float, *,
                         properties: tuple[str, ...] = ()) -> None: ...

    async def stop_unit(self, unit: str) -> None: ...

    def store(self, fd: int, name: str) -> None: ...

    def take(self, name: str) -> int | None: ...

    def forget(self, name: str) -> None: ...


def _spawn_keeper(args: list[str], env: dict[str, str], lease_r: int, client: int,
                  output_fd: int) -> int:
    """posix_spawn the keeper in a session of its own: stdin /dev/null, stdout and stderr the
    output (the journal, or the daemon's stderr), the lease's read end as fd 3 and its end of
    the socket pair as fd 4 (dup2 clears close-on-exec on the copy only)."""
    moved: list[int] = []
    try:
        # a source already at 3 or 4 would be overwritten (or keep its close-on-exec): move it
        if lease_r in (3, 4):
            lease_r = os.dup(lease_r)
            moved.append(lease_r)
        if client in (3, 4):
            client = os.dup(client)
            moved.append(client)
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_DUP2, output_fd, 1)]
        if output_fd != 2:
            actions.append((os.POSIX_SPAWN_DUP2, output_fd, 2))
        actions += [(os.POSIX_SPAWN_DUP2, lease_r, 3), (os.POSIX_SPAWN_DUP2, client, 4)]
        # (no signal blocked in the keeper, whatever the spawning thread had blocked)
        return os.posix_spawn(sys.executable, args, env, file_actions=actions, setsid=True,
                              setsigmask=())
    finally:
        for fd in moved:
            os.close(fd)


def _dirs(base: Path) -> list[Path]:
    try:
        return [p for p in base.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return []


def _read_json(path: Path) -> Any:
    """A keeper's file, read like any state file (a regular file, no symlink, bounded, not
    waited on); None when it is missing or cannot be trusted."""
    try:
        return read_json(path, _MAX_MESSAGE)
    except Damaged:
        return None
