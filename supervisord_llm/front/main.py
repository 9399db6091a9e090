"""The front process: every gate and the router, on an event loop of their own (uvloop where it
is installed), apart from the daemon. It serves listening sockets the daemon bound and handed
over, and is driven over its control socket (`wire`); it outlives the daemon (a restart, a
crash, an upgrade) and keeps every stream going meanwhile.

- One daemon at a time talks to it: `hello` gets a snapshot of every gate (settings, drain
  reasons, upstreams, what waits for a cold start); the daemon then sets what it decides.
- The lease is a pipe whose write end the daemon holds (as the keepers' is). At its end of
  file (the daemon exited) a grace period starts; a new lease ends it. When the grace runs out,
  or no daemon has spoken for `unattended` seconds, the front stops: it stops accepting,
  lets what is in flight finish for a few seconds and exits.
- What it says unasked: `state` (each gate's requests inside, waiting, idle clock; sent when
  it changed, at most every PUSH_S, and at once when an on-demand gate's waiters change),
  `ask` (a request wants an on-demand service loaded) and `waiting`.

Run as `python -P -m supervisord_llm.front --dir DIR ...` by the daemon (`client.FrontClient`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Final

from .. import native
from ..audit import AuditLog
from ..config import GateSection, RouterSection
from ..gate.door import Door
from ..gate.host import finish_gate
from ..gate.proxy import Gate, GateEntry, Histogram
from ..gate.router import Router
from ..gate.server import Listener, serve_sockets
from ..gate.upstream import UpstreamPool
from ..logs import LogLimiter, pipeline, setup_logging
from . import docs
from .wire import Channel, ChannelClosed, close_fds

log = logging.getLogger("supervisord_llm.front")

PROTO: Final = 1
_TEST_BUILD_ENV: Final = "LLM_SUPERVISOR_TEST_FRONT_BUILD"  # with LLM_SUPERVISOR_TEST_HOOKS=1


def _build() -> str:
    """What this front's code is: the release and a digest of the modules the front runs (an
    upgrade of any of them is a new build, which the daemon upgrades to by a hand-over)."""
    import hashlib

    from .. import __version__

    if os.environ.get("LLM_SUPERVISOR_TEST_HOOKS") == "1" and os.environ.get(_TEST_BUILD_ENV):
        return os.environ[_TEST_BUILD_ENV]
    pkg = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    files = [*sorted((pkg / "front").glob("*.py")), *sorted((pkg / "gate").glob("*.py")),
             pkg / "http1.py", pkg / "logs.py", pkg / "config" / "schema.py"]
    for path in files:
        try:
            h.update(path.name.encode() + b"\0" + path.read_bytes())
        except OSError:
            h.update(path.name.encode() + b"\0?")
    return f"{__version__}+{h.hexdigest()[:12]}"


BUILD: Final = _build()
CTL: Final = "ctl.sock"
PUSH_S: Final = 0.2
# a gate that goes idle again and again (one client, one request after the other) tells the
# daemon at most this often; requests waiting for a load are told at once
IDLE_TELL_S: Final = 0.1
PENDING_S: Final = 10.0  # a connection that does not say hello within this is closed
MAX_PENDING: Final = 8
REMOVE_GRACE_S: Final = 10.0  # requests in progress on a gate being removed or moved
STOP_GRACE_S: Final = 5.0  # in flight when the front stops for good (its models stop too)


def hist_doc(h: Histogram) -> list[Any]:
    buckets, total, count = h.snapshot()
    return [buckets, total, count]


class Front:
    def __init__(self, directory: Path, grace_s: float, unattended_s: float,
                 memory_max_mb: int | None = None) -> None:
        self.dir = directory
        self.memory_max_mb = memory_max_mb
        self.grace_s = grace_s
        self.unattended_s = unattended_s
        self.limiter = LogLimiter("supervisord_llm.gate")
        self.pool = UpstreamPool()
        self.gates: dict[str, Gate] = {}
        self.listeners: dict[str, Listener] = {}
        self.router: Router | None = None
        self.router_listener: Listener | None = None
        self.door = Door()  # keys, limits, the audit log: the router's and the gates'
        self.door_doc: dict[str, Any] | None = None  # as the daemon last set it
        self.audit: AuditLog | None = None
        self.client: Channel | None = None
        self._pending: list[Channel] = []  # connections that have not said hello
        self.greeted = False  # the client said hello
        self.lease_fd: int | None = None
        self.lease_lost_at: float | None = None
        self.last_word = time.monotonic()  # the last message of a daemon
        self.done = asyncio.Event()
        self._sent: dict[str, tuple[Any, ...]] = {}
        self._push_soon = False
        self._told: dict[str, tuple[float, int]] = {}  # gate -> (when, count) last `waiting`
        self._tell_later: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stopping = False
        self.ctl_ino: int | None = None
        self.dirfd: int | None = None

    # --- the control socket ------------------------------------------------------------------

    async def serve(self, client_fd: int | None, lease_fd: int | None) -> None:
        loop = asyncio.get_running_loop()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # bound through /proc/self/fd: a state directory deeper than a socket address may be
        # (108 bytes) works, as for the keepers
        self.dirfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        tmp = f".{CTL}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=self.dirfd)
        server.bind(f"/proc/self/fd/{self.dirfd}/{tmp}")
        os.chmod(tmp, 0o600, dir_fd=self.dirfd)
        server.listen(8)
        os.replace(tmp, CTL, src_dir_fd=self.dirfd, dst_dir_fd=self.dirfd)
        self.ctl_ino = os.stat(CTL, dir_fd=self.dirfd).st_ino
        server.setblocking(False)
        loop.add_reader(server.fileno(), self._accept, server)
        if lease_fd is not None:
            self._lease(lease_fd)
        if client_fd is not None:
            self._attach(socket.socket(fileno=client_fd))
        self._spawn(self._tick())
        await self.done.wait()
        # what it ends with (stopped: nothing in flight, what finished finished): the daemon
        # counts as cut what its last word said was in flight
        self._push()
        loop.remove_reader(server.fileno())
        server.close()

    def _accept(self, server: socket.socket) -> None:
        try:
            sock, _ = server.accept()
        except OSError:
            return
        self._attach(sock)

    def _attach(self, sock: socket.socket) -> None:
        """A connection: the daemon once it says hello (the last one to say it: a daemon
        that comes back replaces one that is gone, or hung; the state directory's lock keeps
        two live daemons apart). Until then it may only ping; one that says nothing for
        PENDING_S is closed, and at most MAX_PENDING wait."""
        while len(self._pending) >= MAX_PENDING:
            self._pending.pop(0).close()
        ch = Channel(sock, "daemon")
        ch.on_message = lambda doc, fds: self._message(ch, doc, fds)
        ch.on_close = lambda: self._detached(ch)
        self._pending.append(ch)
        asyncio.get_running_loop().call_later(
            PENDING_S, lambda: ch.close() if ch in self._pending else None)

    def _detached(self, ch: Channel) -> None:
        if ch in self._pending:
            self._pending.remove(ch)
        if self.client is ch:
            self.client = None
            self.greeted = False
            self.last_word = time.monotonic()

    def _send(self, doc: dict[str, Any]) -> None:
        ch = self.client
        if ch is not None and self.greeted:
            with contextlib.suppress(ChannelClosed, ValueError):
                ch.send(doc)

    # --- the lease ---------------------------------------------------------------------------

    def _lease(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        if self.lease_fd is not None:
            loop.remove_reader(self.lease_fd)
            os.close(self.lease_fd)
        os.set_blocking(fd, False)
        self.lease_fd = fd
        self.lease_lost_at = None
        loop.add_reader(fd, self._lease_readable)

    def _lease_readable(self) -> None:
        assert self.lease_fd is not None
        try:
            data = os.read(self.lease_fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            return
        asyncio.get_running_loop().remove_reader(self.lease_fd)
        os.close(self.lease_fd)
        self.lease_fd = None
        self.lease_lost_at = time.monotonic()
        log.info("front: the daemon's lease ended; serving on for %g s, until a daemon comes "
                 "back", self.grace_s)

    async def _tick(self) -> None:
        while not self.stopping:
            await asyncio.sleep(PUSH_S)
            now = time.monotonic()
            if self.lease_lost_at is not None and now - self.lease_lost_at >= self.grace_s:
                log.warning("front: no daemon came back within %g s: stopping", self.grace_s)
                self._spawn(self.stop(STOP_GRACE_S))
                return
            if now - self.last_word >= self.unattended_s:
                # none attached, or one that says nothing (frozen): the daemon pings every
                # few seconds while it is well
                log.warning("front: no word from a daemon for %g s: stopping",
                            self.unattended_s)
                self._spawn(self.stop(STOP_GRACE_S))
                return
            self._push()
            self._check_memory()

    def _check_memory(self) -> None:
        """Over `memory_max_mb` resident: exit (what it holds is cut; the daemon starts a new
        front at once, with the same sockets). Under systemd, MemoryMax= above it is the
        kernel's backstop."""
        if self.memory_max_mb is None:
            return
        try:
            with open("/proc/self/statm", "rb") as fh:
                rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return
        if rss > self.memory_max_mb * 1024 * 1024:
            log.error("front: %d MB resident, over front_memory_max_mb (%d): exiting; the "
                      "daemon starts a new front (the requests in this one are cut)",
                      rss // (1024 * 1024), self.memory_max_mb)
            pipe = pipeline()
            if pipe is not None:
                pipe.flush(1.0)
            os._exit(3)

    # --- what the daemon asks -----------------------------------------------------------------

    def _message(self, ch: Channel, doc: dict[str, Any], fds: list[int]) -> None:
        op = doc.get("op")
        if ch is not self.client and op == "hello":
            old, self.client = self.client, ch
            self._pending.remove(ch)
            if old is not None:
                log.info("front: a daemon said hello: it replaces the one attached before")
                old.close()
        if ch is self.client:
            self.last_word = time.monotonic()
        try:
            if op == "hello":
                close_fds(fds)
                self.greeted = True
                self._sent.clear()
                ch.answer(doc, self.snapshot())
                for gate in self.gates.values():  # waiters ask the new daemon again
                    gate.ask_again()
                return
            if (ch is not self.client or not self.greeted) and op != "ping":
                close_fds(fds)
                ch.answer(doc, {"op": "error", "code": "hello", "message": "hello first"})
                return
            handler = _HANDLERS.get(str(op))
            if handler is None:
                close_fds(fds)
                ch.answer(doc, {"op": "error", "code": "op", "message": f"unknown op {op!r}"})
                return
            handler(self, ch, doc, fds)
        except (ValueError, KeyError, TypeError) as exc:
            close_fds(fds)
            ch.answer(doc, {"op": "error", "code": "bad", "message": str(exc)})

    def snapshot(self) -> dict[str, Any]:
        gates = {}
        for name, g in self.gates.items():
            gates[name] = {
                "cfg": docs.to_doc(g.cfg), "drains": sorted(g.drains),
                "factor": g.admission.factor, "listening": name in self.listeners,
                "upstream": g.upstream, "backup": g.backup, "closed_why": g.closed_why,
                "on_demand": g.on_demand, "unloading": g.unloading, "yielding": g.yielding,
                "cold_message": g.cold_message, **self._light(g)}
        router = None
        if self.router is not None:
            # its catalogue too: a daemon that hands this front over to a new one passes it
            # on with the router's sockets (the new front's router knows every model from
            # its first request, before the daemon has pushed its own)
            router = {"cfg": docs.to_doc(self.router.cfg),
                      "listening": self.router_listener is not None,
                      "catalog": [self.router.routes,
                                  [json.loads(e) for e in self.router.entries.values()]]}
        return {"op": "snapshot", "proto": PROTO, "build": BUILD, "pid": os.getpid(),
                "gates": gates, "door": self.door_doc,
                "router": router, "grace_s": self.grace_s, "unattended_s": self.unattended_s}

    def _light(self, g: Gate) -> dict[str, Any]:
        listener = self.listeners.get(g.name)
        return {"connections": len(listener.connections) if listener is not None else 0,
                "active": g.active, "inflight": g.inflight, "queued": g.queued,
                "limit": g.limit, "last_active": g.last_active, "cold_waiting": g.cold_waiting,
                "last_ok": g.last_ok, "unloading": g.unloading, "yielding": g.yielding}

    def _push(self) -> None:
        self._push_soon = False
        if self.client is None or not self.greeted:
            self._sent.clear()
            return
        changed = {}
        for name, g in self.gates.items():
            light = self._light(g)
            key = tuple(light.values())
            if self._sent.get(name) != key:
                self._sent[name] = key
                changed[name] = light
        if changed:
            self._send({"op": "state", "gates": changed})

    def push_soon(self) -> None:
        if not self._push_soon:
            self._push_soon = True
            asyncio.get_running_loop().call_soon(self._push)

    # gate callbacks (on this loop)
    def _ask(self, name: str, model: str | None) -> None:
        self._send({"op": "ask", "name": name, "model": model})

    def _waiting(self, name: str, count: int) -> None:
        now = time.monotonic()
        when, told = self._told.get(name, (0.0, -1))
        if count == 0 and told == 0 and now - when < IDLE_TELL_S:
            if name not in self._tell_later:  # idle again, soon after the last time: later
                self._tell_later[name] = asyncio.get_running_loop().call_later(
                    when + IDLE_TELL_S - now, self._tell_idle, name)
            return
        self._tell(name, count, now)

    def _tell_idle(self, name: str) -> None:
        self._tell_later.pop(name, None)
        gate = self.gates.get(name)
        if gate is not None:
            self._tell(name, gate.cold_waiting, time.monotonic())

    def _tell(self, name: str, count: int, now: float) -> None:
        later = self._tell_later.pop(name, None)
        if later is not None:
            later.cancel()
        self._told[name] = (now, count)
        # the gates' state first: the daemon decides on `waiting` (an idle gate may be
        # stopped, its idle clock runs) with what it knows of them, which must be now's
        self._push()
        self._send({"op": "waiting", "name": name, "count": count})

    # --- gates --------------------------------------------------------------------------------

    def set_gate(self, name: str, cfg: GateSection, socks: list[socket.socket] | None,
                 state: dict[str, Any] | None = None) -> None:
        """Add or change a gate; `state` (the daemon's decisions: upstreams, on-demand
        settings, drains...) is in force before its listener takes a connection."""
        gate = self.gates.get(name)
        if gate is None:
            gate = Gate(name, cfg, self.pool, self.limiter, self.door)
            gate.set_demand(False, 900.0, self._ask, self._waiting)
            self.gates[name] = gate
        else:
            gate.reconfigure(cfg)
        if state:
            _apply(self, gate, state)
        if socks is not None or cfg.listen is None:
            old = self.listeners.pop(name, None)
            if socks:
                self.listeners[name] = serve_sockets(GateEntry(gate), socks)
            if old is not None:
                self._spawn(old.close(REMOVE_GRACE_S))
        self.push_soon()

    async def remove_gate(self, name: str, grace_s: float) -> None:
        self._sent.pop(name, None)
        later = self._tell_later.pop(name, None)
        if later is not None:
            later.cancel()
        self._told.pop(name, None)
        await finish_gate(self.gates.pop(name, None), self.listeners.pop(name, None), grace_s)

    def set_router(self, cfg: RouterSection | None, socks: list[socket.socket] | None) -> None:
        old = self.router_listener
        if cfg is None:
            self.router = None
            self.router_listener = None
            if old is not None:
                self._spawn(old.close(REMOVE_GRACE_S))
            return
        if self.router is None:
            self.router = Router(cfg, self.gates, self.limiter, self.door)
        self.router.reconfigure(cfg)
        if socks:
            self.router_listener = serve_sockets(self.router, socks)
            if old is not None:
                self._spawn(old.close(REMOVE_GRACE_S))

    def stats(self) -> dict[str, Any]:
        gates = {}
        for name, g in self.gates.items():
            st = g.stats
            gates[name] = {
                "requests": dict(st.requests), "rejected": dict(st.rejected),
                "duration": hist_doc(st.duration), "ttfb": hist_doc(st.ttfb),
                "ttft": hist_doc(st.ttft), "event_rate": hist_doc(st.event_rate),
                "models": {m: {"requests": dict(ms.requests), "ttft": hist_doc(ms.ttft)}
                           for m, ms in g.models.items()},
                "turned_away": (self.listeners[name].turned_away if name in self.listeners
                                else 0),
                **self._light(g)}
        router = None
        if self.router is not None:
            listener = self.router_listener
            router = {"rejected": dict(self.router.stats.rejected),
                      "requests": dict(self.router.stats.requests),
                      "turned_away": listener.turned_away if listener is not None else 0}
        door = self.door.stats()
        door["audit"] = self.audit.counters() if self.audit is not None else None
        return {"op": "stats", "gates": gates, "router": router, "door": door}

    def set_door(self, doc: dict[str, Any]) -> None:
        """Keys (their hashes and limits; None: no [auth]) and the audit log (its path, or
        None). The audit file is opened again each time (logrotate)."""
        keys = doc.get("keys")
        if keys is not None and not isinstance(keys, list):
            raise ValueError("door: bad keys")
        audit = doc.get("audit")
        path = audit.get("path") if isinstance(audit, dict) else None
        gid = audit.get("gid") if isinstance(audit, dict) else None
        self.door.set_keys(keys)
        self.door.sum_up()
        self.door.flush_lines()
        if self.audit is not None and self.audit.path != path:
            self.audit.close(0.5)
            self.audit = None
        if isinstance(path, str) and path:
            if self.audit is None:
                self.audit = AuditLog(path, gid if isinstance(gid, int) else None)
            else:
                self.audit.reopen()
        self.door.audit = self.door.buffer_line if self.audit is not None else None
        self.door.sink = self.audit.put_batch if self.audit is not None else None
        self.door_doc = {"keys": keys, "audit": audit}

    def listener_fds(self) -> tuple[list[list[Any]], list[int]]:
        keys: list[list[Any]] = []
        fds: list[int] = []
        for name, listener in self.listeners.items():
            socks = listener._socks
            keys.append([name, len(socks)])
            fds.extend(s.fileno() for s in socks)
        if self.router_listener is not None:
            socks = self.router_listener._socks
            keys.append([None, len(socks)])
            fds.extend(s.fileno() for s in socks)
        return keys, fds

    async def stop(self, grace_s: float) -> None:
        """Stop accepting everywhere, let what is in flight finish for `grace_s`, exit (a
        second, shorter stop shortens the wait)."""
        if self.stopping:
            try:
                async with asyncio.timeout(grace_s):
                    await self.done.wait()
            except TimeoutError:
                log.warning("front: stopping now, with requests still in flight")
                self.done.set()
            return
        self.stopping = True
        waits = []
        if self.router_listener is not None:
            waits.append(self.router_listener.close(grace_s))
            self.router_listener = None
        # the gates stay (a daemon may still ask whether they are idle) while their
        # listeners close and what is in them finishes
        waits += [finish_gate(gate, self.listeners.pop(name, None), grace_s)
                  for name, gate in self.gates.items()]
        await asyncio.gather(*waits, return_exceptions=True)
        self.pool.close()
        if self.audit is not None:
            self.door.sum_up()
            self.door.flush_lines()
            await asyncio.to_thread(self.audit.close)
        self.done.set()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


# --- handlers: (front, channel, request, fds) -------------------------------------------------


def _socks(fds: list[int]) -> list[socket.socket]:
    return [socket.socket(fileno=fd) for fd in fds]


def _gate(f: Front, doc: dict[str, Any]) -> Gate:
    name = doc["name"]
    gate = f.gates.get(name) if isinstance(name, str) else None
    if gate is None:
        raise KeyError(f"no gate {name!r}")
    return gate


def _op_ping(f: Front, ch: Channel, doc: dict[str, Any], fds: list[int]) -> None:
    close_fds(fds)
    ch.answer(doc, {"op": "pong"})


def _op_lease(f: Front, ch: Channel, doc: dict[str, Any], fds: list[int]) -> None:
    if len(fds) != 1:
        close_fds(fds)
        raise ValueError("a lease is one file descriptor")
    f._lease(fds[0])
    ch.answer(doc, {"op": "ok"})


def _op_gate(f: Front, ch: Channel, doc: dict[str, Any], fds: list[int]) -> None:
    name = doc["name"]
    if not isinstance(name, str) or not name:
        close_fds(fds)
        raise ValueError("bad gate name")
    try:
        cfg = docs.from_doc(GateSection, doc["cfg"])
    except (ValueError, KeyError):
        close_fds(fds)
        raise
    state = doc.get("state")
    f.set_gate(name, cfg, _socks(fds) if fds else None,
               state if isinstance(state, dict) else None)
    ch.answer(doc, {"op": "ok"})


def _op_remove(f: Front, ch: Channel, doc: dict[str, Any], fds: list[int]) -> None:
    close_fds(fds)
    name = doc["name"]
    grace = float(doc.get("grace_s", REMOVE_GRACE_S))

    async def run() -> None:
        await f.remove_gate(name, grace)
        ch.answer(doc, {"op": "ok"})

    f._spawn(run())


def _op_set(f: Front, ch: Channel, doc: dict[str, Any], fds: list[int]) -> None:
    close_fds(fds)
    _apply(f, _gate(f, doc), doc)
    f.push_soon()
    ch.answer(doc, {"op": "ok"})


def _apply(f: Front, gate: Gate, doc: dict[str, Any]) -> None:
    """The daemon's decisions for a gate (the fields of `set`)."""
    if "upstreams" in doc:
        up, backup, why = doc["upstreams"]
        gate.set_upstreams((str(up[0]), int(up[1])) if up else None,
                           (str(backup[0]), int(backup[1])) if backup else None, str(why))
    if "demand" in doc:
        on_demand, timeout = doc["demand"]
        gate.set_demand(bool(on_demand), float(timeout), f._ask, f._waiting)
    if "drains" in doc:
        drains = {str(r) for r in doc["drains"]}
        for reason in gate.drains - drains:
            gate.resume(reason)
        for reason in drains - gate.drains:
            gate.drain(reason)
    if "factor" in doc:
        gate.set_limit_factor(float(doc["factor"]))
    if "cold_message" in doc:
        message = doc["cold_message"]
        gate.set_cold_message(None if message is None else str(message))
    if "yielding" in doc:
        gate.set_yielding(bool(doc["yielding"]))
    if "unloading" in doc:
        gate.set_unloading(bool(doc["unloading"]))


def _op_router(f: Front, ch: Channel, doc: dict[str, Any], fds: list[int]) -> None:
    cfg = None
    if doc.get("cfg") is not None:
        try:
            cfg = docs.from_doc(RouterSection, doc["cfg"])
        except ValueError:
            close_fds(fds)
            raise
    f.set_router(cfg, _socks(fds) if fds else None)
    if "catalog" in doc and f.router is not None:
        routes, entries = doc["catalog"]
        f.router.set_catalog(dict(routes), list(entries))
    ch.answer(doc, {"op": "ok"})


def _op_door(f: Front, ch: Channel, doc: dict[str, Any], fds: list[int]) -> None:
    close_fds(fds)
    f.set_door(doc)
    ch.answer(doc, {"op": "ok"})


def _op_catalog(f: Front, ch: Channel, doc: dict[str, Any], fds: list[int]) -> None:
    close_fds(fds)
    if f.router is not None:
        f.router.set_catalog(dict(doc["routes"]), list(doc["entries"]))
    ch.answer(doc, {"op": "ok"})


def _op_retire(f: Front, ch: Channel, doc: dict[str, Any], fds: list[int]) -> None:
    close_fds(fds)
    gate = f.gates.get(str(doc.get("name")))
    ok = gate.retire(bool(doc.get("drain"))) if gate is not None else True
    ch.answer(doc, {"op": "retired", "ok": ok,
                    **(f._light(gate) if gate is not None else {})})
    f.push_soon()


def _op_wait_idle(f: Front, ch: Channel, doc: dict[str, Any], fds: list[int]) -> None:
    close_fds(fds)
    gate = f.gates.get(str(doc.get("name")))
    if gate is None:
        ch.answer(doc, {"op": "idle", "idle": True})
        return
    port = doc.get("port")
    timeout = float(doc.get("timeout_s", 3600.0))
    g = gate

    def idle() -> bool:
        if isinstance(port, int):
            return not g.inside(port)
        return g.is_idle()

    async def run() -> None:
        try:
            async with asyncio.timeout(timeout):
                await g.wait_idle(idle)
        except TimeoutError:
            ch.answer(doc, {"op": "idle", "idle": False})
        else:
            ch.answer(doc, {"op": "idle", "idle": True})

    f._spawn(run())


def _op_stalled(f: Front, ch: Channel, doc: dict[str, Any], fds: list[int]) -> None:
    close_fds(fds)
    gate = _gate(f, doc)
    ch.answer(doc, {"op": "stalled", "value": gate.stalled_for(int(doc["port"]))})


def _op_stats(f: Front, ch: Channel, doc: dict[str, Any], fds: list[int]) -> None:
    close_fds(fds)
    ch.answer(doc, f.stats())


def _op_listeners(f: Front, ch: Channel, doc: dict[str, Any], fds: list[int]) -> None:
    close_fds(fds)
    keys, mine = f.listener_fds()
    ch.answer(doc, {"op": "listeners", "keys": keys}, mine)


def _op_stop(f: Front, ch: Channel, doc: dict[str, Any], fds: list[int]) -> None:
    close_fds(fds)

    async def run() -> None:
        await f.stop(float(doc.get("grace_s", STOP_GRACE_S)))
        ch.answer(doc, {"op": "stopped"})

    f._spawn(run())


def _op_settings(f: Front, ch: Channel, doc: dict[str, Any], fds: list[int]) -> None:
    close_fds(fds)
    f.grace_s = float(doc.get("grace_s", f.grace_s))
    f.unattended_s = float(doc.get("unattended_s", f.unattended_s))
    ch.answer(doc, {"op": "ok"})


_HANDLERS: Final = {
    "ping": _op_ping, "lease": _op_lease, "gate": _op_gate, "remove": _op_remove,
    "set": _op_set, "router": _op_router, "catalog": _op_catalog, "retire": _op_retire,
    "wait_idle": _op_wait_idle, "stalled_for": _op_stalled, "stats": _op_stats,
    "listeners": _op_listeners, "stop": _op_stop, "settings": _op_settings,
    "door": _op_door,
}


# --- the program --------------------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llm-supervisor-front")
    p.add_argument("--dir", required=True)
    p.add_argument("--grace", type=float, default=30.0)
    p.add_argument("--unattended", type=float, default=300.0)
    p.add_argument("--lease-fd", type=int)
    p.add_argument("--client-fd", type=int)
    p.add_argument("--log-format", default="plain")
    p.add_argument("--memory-max-mb", type=int)
    return p.parse_args(argv)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    setup_logging(args.log_format)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    front = Front(Path(args.dir), args.grace, args.unattended, args.memory_max_mb)
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    if native.COMPILED:
        log.info("front: the request path is compiled; event loop %s", type(loop).__module__)
    else:  # the same behaviour, about 3x the CPU per request (docs/performance.md)
        log.warning("front: the request path runs as pure Python: %s", native.WHY)
    loop.add_signal_handler(signal.SIGTERM, lambda: front._spawn(front.stop(STOP_GRACE_S)))
    # what is alive now (modules, the program) lives as long as the process: the cyclic
    # collector need not go over it again at every full collection under a flood
    gc.collect()
    gc.freeze()
    try:
        loop.run_until_complete(front.serve(args.client_fd, args.lease_fd))
    finally:
        if front.dirfd is not None:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(CTL, dir_fd=front.dirfd).st_ino == front.ctl_ino:  # not a successor's
                    os.unlink(CTL, dir_fd=front.dirfd)
        loop.close()
    return 0
