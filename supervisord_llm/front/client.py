"""The daemon's side of the front process: it launches the front (or re-attaches to the one an
earlier daemon left), binds every listening socket itself and hands it over (keeping its own
copy, so that a crash of the front refuses no connection: the kernel queues them until the
next front accepts), and keeps a mirror of each gate (`RemoteGate`) that the daemon's parts
read and drive as they drove the in-process gates.

What the daemon decides (upstreams, drain reasons, admission factor, on-demand settings and
messages) is held here and sent; what the front counts (requests inside, waiting, idle clock,
the last answer seen) comes back in `state` messages, at most PUSH_S old, or fresh after
`refresh()`. Decisions that must be atomic with the requests (retire a gate only if nothing is
inside; wait until idle) are asked of the front and answered there.

A front that dies is launched again at once, given the same sockets and every gate's state;
only the requests it was serving are cut (counted in `cut_requests`, logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from .. import procs as P
from ..config import GateSection, RouterSection
from ..errors import StartupError
from ..gate.server import bind_sockets
from ..logs import LogLimiter
from ..systemd import FRONT_LEASE
from . import docs
from .main import BUILD, CTL, PROTO
from .wire import Channel, ChannelClosed, close_fds

if TYPE_CHECKING:
    from ..keep import SystemdHooks

log = logging.getLogger(__name__)

T = TypeVar("T")
Upstream = tuple[str, int]
START_TIMEOUT_S: Final = 10.0
CONNECT_TIMEOUT_S: Final = 1.0
REMOVE_GRACE_S: Final = 10.0
CLOSE_GRACE_S: Final = 2.0  # at a stop (the gates were drained before)
RELAUNCH_BACKOFF_S: Final = (0.0, 0.5, 1.0, 2.0, 5.0)
HEARTBEAT_S: Final = 5.0
REFRESH_TIMEOUT_S: Final = 2.0
HELLO_TIMEOUT_S: Final = 3.0  # a front that takes longer is taken for hung


class Hist:
    """A histogram as the front last reported it (`snapshot()` like the gate's)."""

    def __init__(self) -> None:
        self.value: tuple[list[tuple[str, float]], float, int] = ([], 0.0, 0)

    def set(self, doc: object) -> None:
        if isinstance(doc, list) and len(doc) == 3:
            buckets, total, count = doc
            self.value = ([(str(b), float(n)) for b, n in buckets], float(total), int(count))

    def snapshot(self) -> tuple[list[tuple[str, float]], float, int]:
        return self.value


class StatsView:
    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.duration = Hist()
        self.ttfb = Hist()
        self.ttft = Hist()
        self.event_rate = Hist()
        self.turned_away = 0  # connections closed at once (max_connections_per_client)


class ModelView:
    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.ttft = Hist()


class RemoteGate:
    """One gate, as the daemon sees and drives it."""

    def __init__(self, front: FrontClient, name: str, cfg: GateSection) -> None:
        self.front = front
        self.name = name
        self.cfg = cfg
        # what the daemon decides
        self.drains: set[str] = set()
        self.upstream: Upstream | None = None
        self.backup: Upstream | None = None
        self.closed_why = "closed"
        self.on_demand = False
        self.startup_timeout_s = 900.0
        self.factor = 1.0
        self.cold_message: str | None = None
        # what the front counts (the last `state`)
        self.unloading = False
        self.yielding = False
        self.active = 0
        self.inflight = 0
        self.queued = 0
        self.limit = cfg.max_concurrency
        self.last_active = time.monotonic()
        self.cold_waiting = 0
        self.connections = 0  # client connections open on its own listener
        self.last_ok: tuple[Upstream, float] | None = None
        self.stats = StatsView()
        self.models: dict[str, ModelView] = {}

    @property
    def state(self) -> str:
        if self.drains:
            return "draining"
        return "closed" if self.upstream is None else "open"

    def _set(self, **fields: Any) -> None:
        self.front.send({"op": "set", "name": self.name, **fields})

    def full_state(self) -> dict[str, Any]:
        return {"upstreams": [self.upstream, self.backup, self.closed_why],
                "demand": [self.on_demand, self.startup_timeout_s],
                "drains": sorted(self.drains), "factor": self.factor,
                "cold_message": self.cold_message}

    # --- driven by the daemon's parts --------------------------------------------------------

    def set_upstreams(self, upstream: Upstream | None, backup: Upstream | None,
                      closed_why: str = "closed") -> None:
        self.upstream, self.backup, self.closed_why = upstream, backup, closed_why
        if upstream is not None:
            self.cold_message = None
        self._set(upstreams=[upstream, backup, closed_why])

    def set_demand(self, on_demand: bool, startup_timeout_s: float, *_callbacks: Any) -> None:
        self.on_demand, self.startup_timeout_s = on_demand, startup_timeout_s
        self._set(demand=[on_demand, startup_timeout_s])

    def drain(self, reason: str = "operator") -> None:
        self.drains.add(reason)
        self.set_drains()

    def resume(self, reason: str = "operator") -> None:
        self.drains.discard(reason)
        self.set_drains()

    def set_drains(self) -> None:
        self._set(drains=sorted(self.drains))

    def reconfigure(self, cfg: GateSection) -> None:
        self.cfg = cfg
        self.front.send({"op": "gate", "name": self.name, "cfg": docs.to_doc(cfg)})

    def set_limit_factor(self, factor: float) -> None:
        self.factor = factor
        self._set(factor=factor)

    def set_cold_message(self, message: str | None) -> None:
        self.cold_message = message
        self._set(cold_message=message)

    def set_yielding(self, yielding: bool) -> None:
        self.yielding = yielding
        self._set(yielding=yielding)

    def set_unloading(self, unloading: bool) -> None:
        self.unloading = unloading
        self._set(unloading=unloading)

    async def retire(self, drain: bool = False) -> bool:
        """Out of service if nothing is inside (decided in the front); True if retired."""
        if self.front.old_inside(self.name):
            return False  # a front handing over still serves some of its requests
        reply = await self.front.ask({"op": "retire", "name": self.name, "drain": drain})
        if reply is None:
            return False
        self.light(reply)
        return bool(reply.get("ok"))

    async def wait_idle(self, port: int | None = None, timeout_s: float = 3600.0) -> bool:
        """Until nothing is in flight (or waits for a cold start); with `port`, until nothing
        is in flight to that upstream. False if that took longer than `timeout_s` (or the
        front is gone meanwhile: its requests are cut)."""
        doc: dict[str, Any] = {"op": "wait_idle", "name": self.name, "timeout_s": timeout_s}
        if port is not None:
            doc["port"] = port
        waits = [self.front.ask(doc, timeout_s=timeout_s + 5),
                 *(self.front.ask_old(ch, doc, timeout_s + 5) for ch in list(self.front._old))]
        replies = await asyncio.gather(*waits)
        # no answer: that front is gone (what it served is cut) or hung (killed by the
        # heartbeat): nothing of it is in flight any more
        return all(r is None or bool(r.get("idle")) for r in replies)

    async def stalled_for(self, port: int) -> float | None:
        reply = await self.front.ask({"op": "stalled_for", "name": self.name, "port": port})
        value = reply.get("value") if reply is not None else None
        return float(value) if isinstance(value, (int, float)) else None

    def is_idle(self) -> bool:
        return self.inflight == 0 and self.cold_waiting == 0

    # --- from the front -----------------------------------------------------------------------

    def light(self, doc: dict[str, Any]) -> None:
        for key in ("active", "inflight", "queued", "limit", "cold_waiting", "connections"):
            value = doc.get(key)
            if isinstance(value, int):
                setattr(self, key, value)
        for key in ("unloading", "yielding"):
            value = doc.get(key)
            if isinstance(value, bool):
                setattr(self, key, value)
        value = doc.get("last_active")
        if isinstance(value, (int, float)):
            self.last_active = float(value)
        ok = doc.get("last_ok")
        if isinstance(ok, list) and len(ok) == 2 and isinstance(ok[0], list) \
                and len(ok[0]) == 2 and isinstance(ok[1], (int, float)):
            self.last_ok = ((str(ok[0][0]), int(ok[0][1])), float(ok[1]))

    def take_stats(self, doc: dict[str, Any]) -> None:
        self.light(doc)
        st = self.stats
        st.requests = _counts(doc.get("requests"))
        st.rejected = _counts(doc.get("rejected"))
        for key in ("duration", "ttfb", "ttft", "event_rate"):
            getattr(st, key).set(doc.get(key))
        turned = doc.get("turned_away")
        st.turned_away = turned if isinstance(turned, int) else 0
        models = doc.get("models")
        if isinstance(models, dict):
            for model, mdoc in models.items():
                if not isinstance(mdoc, dict):
                    continue
                view = self.models.setdefault(str(model), ModelView())
                view.requests = _counts(mdoc.get("requests"))
                view.ttft.set(mdoc.get("ttft"))


class RouterStatsView:
    def __init__(self) -> None:
        self.rejected: dict[str, int] = {}
        self.requests: dict[str, int] = {}
        self.turned_away = 0


class RemoteRouter:
    def __init__(self, cfg: RouterSection) -> None:
        self.cfg = cfg
        self.stats = RouterStatsView()
        self.catalog: tuple[dict[str, str], list[dict[str, object]]] = ({}, [])

    def set_catalog(self, routes: dict[str, str], entries: list[dict[str, object]]) -> None:
        raise NotImplementedError  # replaced per client (see FrontClient.set_router)


def _counts(doc: object) -> dict[str, int]:
    if not isinstance(doc, dict):
        return {}
    return {str(k): int(v) for k, v in doc.items() if isinstance(v, int)}


class FrontClient:
    """The front process, seen from the daemon (the interface the in-process gate host had:
    `gates`, `router`, `add`, `rebind`, `set_router`, `remove`, `close`, `call`, `run`,
    `submit`)."""

    def __init__(self, base: Path | None, *, grace_s: float = 30.0,
                 unattended_s: float = 300.0, log_format: str = "plain",
                 output_fd: int = 2,
                 on_ask: Callable[[str, str | None], None] | None = None,
                 on_waiting: Callable[[str, int], None] | None = None,
                 systemd: SystemdHooks | None = None, memory_max_mb: int = 2048) -> None:
        self.base = base
        # under systemd: the front in a transient unit of its own (out of the daemon's cgroup,
        # which a restart of the daemon's unit ends; with its own MemoryMax=), its lease's
        # write end parked in the daemon's file descriptor store
        self.systemd = systemd
        self.memory_max_mb = memory_max_mb
        self._unit: str | None = None
        self.grace_s = grace_s
        self.unattended_s = unattended_s
        self.log_format = log_format
        self.output_fd = output_fd
        self.on_ask = on_ask
        self.on_waiting = on_waiting
        self.gates: dict[str, RemoteGate] = {}
        self.router: RemoteRouter | None = None
        self.limiter = LogLimiter(__name__)
        self._socks: dict[str | None, list[socket.socket]] = {}  # our copies of the listeners
        self._loose: list[socket.socket] = []  # given up, until settle()
        self._ch: Channel | None = None
        self._pid: int | None = None
        self._pidfd: int | None = None
        self._lease_w: int | None = None
        self._own_tmp: Path | None = None
        self._up: asyncio.Future[None] | None = None  # set while a front is attached
        self._starting: asyncio.Task[None] | None = None
        self._crashes: list[float] = []
        self._heartbeat: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Future[None] | None = None
        self._gone: asyncio.Event | None = None  # set when the front process has exited
        self.closing = False
        self.adopted = False  # the front an earlier daemon left was taken over
        self.restarts = 0  # fronts launched again after a crash
        self.upgrades = 0  # fronts of another build replaced by a hand-over
        self._old: set[Channel] = set()  # fronts handing over: they finish what they serve
        self._old_light: dict[Channel, dict[str, int]] = {}  # their requests inside, by gate
        self._retiring: set[asyncio.Task[None]] = set()
        self.cut_requests = 0  # requests in flight in fronts that died
        # the front door (keys, audit): told every front before it gets a listener
        self.door: dict[str, Any] = {"keys": None, "audit": None}
        self.door_stats: dict[str, Any] = {}

    # --- the process --------------------------------------------------------------------------

    def _dir(self) -> Path:
        if self.base is None:
            if self._own_tmp is None:
                self._own_tmp = Path(tempfile.mkdtemp(prefix="llm-supervisor-front-"))
            return self._own_tmp
        self.base.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.base

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def attached(self) -> bool:
        return self._ch is not None

    async def start(self) -> None:
        """Attach to a front: the one an earlier daemon left (its gates become ours), else a
        new one. StartupError if none can be started."""
        if self._up is not None and self._up.done():
            return
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._start())
        task = self._starting
        try:
            await asyncio.shield(task)
        finally:
            if task.done():
                self._starting = None

    async def _start(self) -> None:
        d = await asyncio.to_thread(self._dir)
        if not await self._adopt(d):
            await self._launch(d)
        # before any listener: keys (or none), the audit log
        try:
            reply = await self.ask({"op": "door", **self.door}, raise_closed=True)
        except (ChannelClosed, TimeoutError, ValueError):
            raise StartupError("the front process did not take its keys") from None
        if reply is None or reply.get("op") != "ok":
            raise StartupError("the front process refused its keys: "
                               f"{(reply or {}).get('message')}")

    async def set_door(self, doc: dict[str, Any]) -> bool:
        """New keys or audit settings (a reload, `llmctl key`); the audit file is opened
        again. In force in the front when this returns True; False: the front refused them
        or did not answer (a front being started again gets them before its listeners)."""
        self.door = doc
        if self._ch is None:
            return True  # (replayed first to the front that comes)
        try:
            reply = await self.ask({"op": "door", **doc})
        except ValueError as exc:  # (too large for one message: the keys file's rules say)
            log.error("front: the keys cannot be sent: %s", exc)
            return False
        return reply is not None and reply.get("op") == "ok"

    async def stop_leftover(self) -> bool:
        """Stop the front an earlier daemon left, if there is one (True)."""
        d = await asyncio.to_thread(self._dir)
        if not await self._adopt(d):
            return False
        await self.close()
        return True

    async def _adopt(self, d: Path) -> bool:
        path = d / CTL
        if not path.exists():
            return False
        try:
            sock = await P.connect_in(d, CTL, CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError):
            with contextlib.suppress(OSError):
                path.unlink()  # a front that is gone
            return False
        pid = _peer_pid(sock)
        if pid is None or not _is_front(pid, d):
            log.warning("front: %s is not served by a front of ours (pid %s): launching "
                        "a new one", path, pid)
            sock.close()
            return False
        ch = self._channel(sock)
        try:
            snap, _ = await ch.ask({"op": "hello", "proto": PROTO}, timeout_s=HELLO_TIMEOUT_S)
        except (ChannelClosed, TimeoutError):
            snap = {"op": "no answer"}
        if snap.get("op") != "snapshot":
            # hung, or broken: it goes (the sockets it holds are freed for a new one)
            log.warning("front: pid %d answered %s: killing it, starting a new one", pid,
                        snap.get("message") or snap.get("op"))
            ch.on_close = lambda: None
            ch.close()
            await _kill_and_wait(pid, 5.0)
            return False
        self._pid, self._pidfd = pid, P.pidfd(pid)
        self._watch()
        lease_r, self._lease_w = os.pipe()
        self._park_lease()
        try:
            await ch.ask({"op": "lease"}, fds=(lease_r,))
            await ch.ask({"op": "settings", "grace_s": self.grace_s,
                          "unattended_s": self.unattended_s})
            reply, fds = await ch.ask({"op": "listeners"})
        except (ChannelClosed, TimeoutError):
            return False
        finally:
            os.close(lease_r)
        self._take_listeners(reply, fds)
        self._take_snapshot(snap)
        self.adopted = True
        log.info("front: re-attached to the front process (pid %d), %d gate(s)%s", pid,
                 len(self.gates), " and the router" if self.router is not None else "")
        self._attached(ch)
        if snap.get("build") != BUILD:
            await self._upgrade(d, str(snap.get("build")))
        return True

    async def _upgrade(self, d: Path, was: str) -> None:
        """A front of another build (an upgrade of llm-supervisor): a new one takes the
        listening sockets and every gate's state over; the old one stops accepting, lets its
        requests finish (at most the longest drain_timeout_s) and exits. Both accept from the
        same sockets meanwhile: no connection is refused, no stream cut."""
        old, old_pid = self._ch, self._pid
        assert old is not None
        log.info("front: pid %s runs build %s, this is %s: upgrading it by a hand-over",
                 old_pid, was, BUILD)
        kept = (old_pid, self._pidfd, self._gone, self._lease_w, old.on_message, old.on_close)
        old.on_message = lambda doc, fds: self._old_event(old, doc, fds)

        def old_closed() -> None:
            self._old_light.pop(old, None)

        old.on_close = old_closed
        self._old_light[old] = {name: g.active for name, g in self.gates.items()}
        self._ch, self._up, self._lease_w = None, None, None
        self._old.add(old)
        try:
            await self._launch(d)
            await self._replay()
        except (StartupError, ChannelClosed, TimeoutError) as exc:
            # the old one serves on (its lease was kept until the new one was up)
            log.error("front: the new front did not start (%s): the front of build %s serves "
                      "on", exc, was)
            if self._ch is not None:
                self._ch.on_close = lambda: None
                self._ch.close()
            self._kill()
            self._drop_lease()
            self._old.discard(old)
            self._old_light.pop(old, None)
            (self._pid, self._pidfd, self._gone, self._lease_w, old.on_message,
             old.on_close) = kept
            self._park_lease()
            self._attached(old)
            return
        if kept[3] is not None:  # the old front's lease: it ends now (its stop follows)
            os.close(kept[3])
        self.upgrades += 1
        grace = max((g.cfg.drain_timeout_s for g in self.gates.values()), default=60.0)
        log.info("front: pid %s serves now; pid %s finishes what it serves (at most %g s)",
                 self._pid, old_pid, grace)

        async def retire() -> None:
            try:
                with contextlib.suppress(TimeoutError):
                    await old.ask({"op": "stop", "grace_s": grace}, timeout_s=grace + 5)
            except ChannelClosed:
                pass
            finally:
                old.close()
                self._old.discard(old)

        task = asyncio.get_running_loop().create_task(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _take_listeners(self, reply: dict[str, Any], fds: list[int]) -> None:
        socks = [socket.socket(fileno=fd) for fd in fds]
        at = 0
        for item in reply.get("keys") or []:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], int)):
                continue
            key, n = item
            self._socks[key if isinstance(key, str) else None] = socks[at:at + n]
            at += n
        for sock in socks[at:]:
            sock.close()

    def _take_snapshot(self, snap: dict[str, Any]) -> None:
        gates = snap.get("gates")
        for name, doc in (gates.items() if isinstance(gates, dict) else ()):
            try:
                cfg = docs.from_doc(GateSection, doc.get("cfg"))
            except ValueError:
                continue
            g = RemoteGate(self, str(name), cfg)
            up, backup = doc.get("upstream"), doc.get("backup")
            g.upstream = (str(up[0]), int(up[1])) if isinstance(up, list) else None
            g.backup = (str(backup[0]), int(backup[1])) if isinstance(backup, list) else None
            g.closed_why = str(doc.get("closed_why", "closed"))
            g.on_demand = bool(doc.get("on_demand"))
            factor = doc.get("factor")
            g.factor = float(factor) if isinstance(factor, (int, float)) else 1.0
            g.light(doc)
            self.gates[g.name] = g
        router = snap.get("router")
        if isinstance(router, dict):
            with contextlib.suppress(ValueError):
                self.router = self._router(docs.from_doc(RouterSection, router.get("cfg")))
            catalog = router.get("catalog")  # (handed on to a new front with the sockets)
            if self.router is not None and isinstance(catalog, list) and len(catalog) == 2 \
                    and isinstance(catalog[0], dict) and isinstance(catalog[1], list):
                self.router.catalog = ({str(k): str(v) for k, v in catalog[0].items()},
                                       [e for e in catalog[1] if isinstance(e, dict)])

    def _old_event(self, ch: Channel, doc: dict[str, Any], fds: list[int]) -> None:
        """From a front handing over: what it still has inside, by gate (the rest of what it
        says is the current front's to say)."""
        close_fds(fds)
        gates = doc.get("gates") if doc.get("op") == "state" else None
        if not isinstance(gates, dict):
            return
        light = self._old_light.setdefault(ch, {})
        for name, doc_ in gates.items():
            if isinstance(doc_, dict) and isinstance(doc_.get("active"), int):
                light[str(name)] = doc_["active"]

    def old_inside(self, name: str) -> int:
        """Requests of gate `name` still inside fronts that hand over."""
        return sum(light.get(name, 0) for light in self._old_light.values())

    def _park_lease(self) -> None:
        """Under systemd: our lease's write end in the daemon's fd store (a restart of the
        daemon's unit keeps it; the earlier daemon's copy goes)."""
        if self.systemd is None or self._lease_w is None:
            return
        old = self.systemd.take(FRONT_LEASE)
        if old is not None:
            os.close(old)
        self.systemd.forget(FRONT_LEASE)
        self.systemd.store(self._lease_w, FRONT_LEASE)

    def _args(self, d: Path) -> list[str]:
        return [sys.executable, "-P", "-m", "supervisord_llm.front", "--dir", str(d),
                "--grace", f"{self.grace_s:g}", "--unattended", f"{self.unattended_s:g}",
                "--log-format", self.log_format, "--memory-max-mb", str(self.memory_max_mb)]

    async def _launch_unit(self, d: Path) -> None:
        """Under systemd: the front in a transient unit, connected to through its socket."""
        assert self.systemd is not None
        import secrets

        from ..errors import SpawnError

        unit = f"llm-front-{secrets.token_hex(4)}.service"
        with contextlib.suppress(OSError):
            (d / CTL).unlink()  # a dead front's: the new one's is the one to wait for
        try:
            await self.systemd.start_unit(
                unit, "llm-supervisor front process (gates and router)", self._args(d),
                dict(os.environ), CLOSE_GRACE_S + 5,
                # the front exits itself at memory_max_mb; the kernel's limit is a backstop
                properties=(f"MemoryMax={self.memory_max_mb * 5 // 4}M",
                            "OOMScoreAdjust=300"))
        except SpawnError as exc:
            raise StartupError(f"cannot start the front process: {exc}") from None
        self._unit = unit
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while True:
            try:
                sock = await P.connect_in(d, CTL, CONNECT_TIMEOUT_S)
                break
            except (FileNotFoundError, ConnectionRefusedError, TimeoutError):
                if loop.time() >= deadline:
                    await self.systemd.stop_unit(unit)
                    raise StartupError(f"the front process did not start (`journalctl -u "
                                       f"{unit}`)") from None
                await asyncio.sleep(0.01)
        pid = _peer_pid(sock)
        if pid is None or not _is_front(pid, d):
            sock.close()
            await self.systemd.stop_unit(unit)
            raise StartupError(f"{d / CTL} is served by another process (pid {pid})")
        self._pid, self._pidfd = pid, P.pidfd(pid)
        self._watch()
        ch = self._channel(sock)
        lease_r, self._lease_w = os.pipe()
        try:
            snap, _ = await ch.ask({"op": "hello", "proto": PROTO}, timeout_s=START_TIMEOUT_S)
            if snap.get("op") != "snapshot":
                raise StartupError(f"the front process answered {snap.get('op')!r}")
            await ch.ask({"op": "lease"}, fds=(lease_r,))
        except (ChannelClosed, TimeoutError):
            ch.close()
            self._kill()
            raise StartupError(f"the front process did not answer (`journalctl -u {unit}`)"
                               ) from None
        finally:
            os.close(lease_r)
        self._park_lease()
        self._attached(ch)

    async def _launch(self, d: Path) -> None:
        if self.systemd is not None:
            await self._launch_unit(d)
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        lease_r, lease_w = os.pipe()
        args = [*self._args(d), "--lease-fd", "3", "--client-fd", "4"]
        try:
            from ..keep import _spawn_keeper

            pid = _spawn_keeper(args, dict(os.environ), lease_r, theirs.fileno(),
                                self.output_fd)
        except OSError as exc:
            ours.close()
            os.close(lease_w)
            raise StartupError(f"cannot start the front process: {exc.strerror or exc}"
                               ) from None
        finally:
            os.close(lease_r)
            theirs.close()
        self._pid, self._pidfd, self._lease_w = pid, P.pidfd(pid), lease_w
        self._watch(child=True)
        ch = self._channel(ours)
        try:
            snap, _ = await ch.ask({"op": "hello", "proto": PROTO}, timeout_s=START_TIMEOUT_S)
        except (ChannelClosed, TimeoutError):
            ch.close()
            self._kill()
            raise StartupError("the front process did not start (see its output above)"
                               ) from None
        if snap.get("op") != "snapshot":
            ch.close()
            self._kill()
            raise StartupError(f"the front process answered {snap.get('op')!r}")
        self._attached(ch)

    def _channel(self, sock: socket.socket) -> Channel:
        ch = Channel(sock, "front")
        ch.on_message = self._event
        ch.on_close = lambda: self._closed(ch)
        return ch

    def _attached(self, ch: Channel) -> None:
        self._ch = ch
        self._up = asyncio.get_running_loop().create_future()
        self._up.set_result(None)
        if self._heartbeat is None:
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    def _watch(self, child: bool = False) -> None:
        fd = self._pidfd
        if fd is None:
            return
        loop = asyncio.get_running_loop()
        pid = self._pid
        gone = self._gone = asyncio.Event()

        def ended() -> None:
            gone.set()
            loop.remove_reader(fd)
            os.close(fd)
            if self._pidfd == fd:
                self._pidfd = None
            if child and pid is not None:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            ch = self._ch
            if ch is not None and self._pid == pid:
                ch.close()

        loop.add_reader(fd, ended)

    def _kill(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                P.send(self._pidfd, 9)

    def _closed(self, ch: Channel) -> None:
        if self._ch is not ch:
            return
        self._ch = None
        self._up = None
        if self.closing:
            return
        cut = sum(g.active for g in self.gates.values())  # (waiting for a cold start too)
        self.cut_requests += cut
        self.restarts += 1  # (counted at once: the new front follows)
        log.error("front: the front process (pid %s) is gone; %d request(s) in it were cut; "
                  "starting it again with the same listeners", self._pid, cut)
        self._kill()
        self._pid = None
        for name, g in self.gates.items():  # what waited there waits no more
            g.active = g.inflight = g.queued = g.connections = 0
            if g.cold_waiting:
                g.cold_waiting = 0
                if self.on_waiting is not None:
                    self.on_waiting(name, 0)
        self._drop_lease()
        self._starting = asyncio.get_running_loop().create_task(self._relaunch())

    async def _relaunch(self) -> None:
        now = time.monotonic()
        self._crashes = [t for t in self._crashes if now - t < 60.0] + [now]
        delay = RELAUNCH_BACKOFF_S[min(len(self._crashes) - 1, len(RELAUNCH_BACKOFF_S) - 1)]
        while not self.closing:
            if delay:
                await asyncio.sleep(delay)
            try:
                await self._launch(self._dir())
                await self._replay()
                log.info("front: started again (pid %s)", self._pid)
                return
            except (StartupError, ChannelClosed, TimeoutError) as exc:
                log.error("front: could not be started again: %s", exc)
                delay = RELAUNCH_BACKOFF_S[-1]

    async def _replay(self) -> None:
        """A new front: every gate with its sockets and the daemon's decisions, the router
        with its catalogue."""
        # the door first: no listener of the new front serves without the keys
        reply = await self.ask({"op": "door", **self.door}, raise_closed=True)
        if reply is None or reply.get("op") != "ok":
            raise StartupError("the new front process refused its keys: "
                               f"{(reply or {}).get('message')}")
        for name, g in self.gates.items():
            g.unloading = g.yielding = False
            g.active = g.inflight = g.queued = g.cold_waiting = 0
            # the state goes with the sockets: in force before the new front's listener takes
            # a connection (a handover shares the sockets with the old front: a request the
            # new one took before a separate `set` got 503 "not ready")
            await self.ask({"op": "gate", "name": name, "cfg": docs.to_doc(g.cfg),
                            "state": g.full_state()}, fds=self._fds(name), raise_closed=True)
        if self.router is not None:
            routes, entries = self.router.catalog
            await self.ask({"op": "router", "cfg": docs.to_doc(self.router.cfg),
                            "catalog": [routes, entries]}, fds=self._fds(None),
                           raise_closed=True)

    async def _beat(self) -> None:
        """A ping every HEARTBEAT_S (a quarter of unattended_limit_s when that is shorter:
        the front stops when it hears nothing for that long); a front that does not answer
        three in a row is killed (and started again)."""
        every = min(HEARTBEAT_S, self.unattended_s / 4)
        while not self.closing:
            await asyncio.sleep(every)
            ch = self._ch
            if ch is None:
                continue
            try:
                await ch.ask({"op": "ping"}, timeout_s=max(every * 3, 1.0))
            except TimeoutError:
                if self._ch is ch:
                    log.error("front: no answer for %g s: killing it", max(every * 3, 1.0))
                    ch.close()
            except ChannelClosed:
                pass

    def _drop_lease(self) -> None:
        if self._lease_w is not None:
            os.close(self._lease_w)
            self._lease_w = None
        if self.systemd is not None:
            self.systemd.forget(FRONT_LEASE)

    def _fds(self, key: str | None) -> list[int]:
        return [s.fileno() for s in self._socks.get(key, [])]

    # --- messages -----------------------------------------------------------------------------

    def _event(self, doc: dict[str, Any], fds: list[int]) -> None:
        close_fds(fds)
        op = doc.get("op")
        if op == "state":
            gates = doc.get("gates")
            for name, light in (gates.items() if isinstance(gates, dict) else ()):
                g = self.gates.get(str(name))
                if g is not None and isinstance(light, dict):
                    g.light(light)
        elif op == "ask":
            name, model = doc.get("name"), doc.get("model")
            if isinstance(name, str) and name in self.gates and self.on_ask is not None:
                self.on_ask(name, model if isinstance(model, str) else None)
        elif op == "waiting":
            name, count = doc.get("name"), doc.get("count")
            if isinstance(name, str) and name in self.gates and isinstance(count, int):
                self.gates[name].cold_waiting = count
                if self.on_waiting is not None:
                    self.on_waiting(name, count)

    async def ask_old(self, ch: Channel, doc: dict[str, Any],
                      timeout_s: float) -> dict[str, Any] | None:
        """Ask a front that hands over (None once it is gone)."""
        try:
            reply, fds = await ch.ask(doc, timeout_s=timeout_s)
        except (ChannelClosed, TimeoutError):
            return None
        close_fds(fds)
        return reply

    def send(self, doc: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        """Tell the front (nothing while it is being started again: the state is replayed
        then)."""
        for ch in (self._ch, *self._old):  # (a front handing over hears it too: what
            if ch is not None:  # waits there for a cold start is served there)
                with contextlib.suppress(ChannelClosed, ValueError):
                    ch.send(doc, fds)

    async def ask(self, doc: dict[str, Any], fds: list[int] | tuple[int, ...] = (),
                  timeout_s: float | None = 30.0, raise_closed: bool = False
                  ) -> dict[str, Any] | None:
        """The front's answer (None if it is gone meanwhile); its fds are closed."""
        ch = self._ch
        if ch is None:
            if raise_closed:
                raise ChannelClosed("front: not attached")
            return None
        try:
            reply, rfds = await ch.ask(doc, fds, timeout_s=timeout_s)
        except ChannelClosed:
            if raise_closed:
                raise
            return None
        except TimeoutError:
            if raise_closed:
                raise
            self.limiter.warning(f"timeout-{doc.get('op')}", "front: no answer to %s within "
                                 "%g s", doc.get("op"), timeout_s)
            return None
        close_fds(rfds)
        if reply.get("op") == "error":
            log.warning("front: %s refused: %s", doc.get("op"), reply.get("message"))
        return reply

    # --- the interface of the gate host --------------------------------------------------------

    def call(self, fn: Callable[..., None], *args: Any) -> None:
        fn(*args)

    async def run(self, fn: Callable[..., None], *args: Any) -> None:
        """`fn` now, then until the front has applied it."""
        fn(*args)
        await self.sync()

    async def submit(self, coro: Coroutine[Any, Any, T]) -> T:
        return await coro

    async def sync(self) -> None:
        await self.ask({"op": "ping"})

    async def refresh(self) -> None:
        """Fresh counters and statistics of every gate (for status and metrics); callers at
        the same moment share one question."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh())
        await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        reply = await self.ask({"op": "stats"}, timeout_s=REFRESH_TIMEOUT_S)
        if reply is None:
            return
        gates = reply.get("gates")
        for name, doc in (gates.items() if isinstance(gates, dict) else ()):
            g = self.gates.get(str(name))
            if g is not None and isinstance(doc, dict):
                g.take_stats(doc)
        door = reply.get("door")
        self.door_stats = door if isinstance(door, dict) else {}
        router = reply.get("router")
        if self.router is not None and isinstance(router, dict):
            self.router.stats.rejected = _counts(router.get("rejected"))
            self.router.stats.requests = _counts(router.get("requests"))
            turned = router.get("turned_away")
            self.router.stats.turned_away = turned if isinstance(turned, int) else 0

    def _bind(self, key: str | None, host: str, port: int, what: str) -> list[int]:
        """Listening sockets for `key` at host:port: ours already if we hold that address
        (another gate's, or one just given up: gates that trade ports in a reload or across
        a restart), else bound now (StartupError if it cannot be)."""
        socks = self._take_held(host, port)
        if socks is None:
            try:
                socks = bind_sockets(host, port)
            except OSError as exc:
                raise StartupError(f"cannot listen on {what}: {exc.strerror or exc}"
                                   ) from None
        old = self._socks.pop(key, [])
        self._socks[key] = socks
        self._retire_socks(old)
        return [s.fileno() for s in socks]

    def _take_held(self, host: str, port: int) -> list[socket.socket] | None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except OSError:
            return None
        want = {(family, addr[:2]) for family, _t, _p, _n, addr in infos}
        for key, socks in [*self._socks.items(), ("", self._loose)]:
            try:
                have = {(s.family, s.getsockname()[:2]) for s in socks}
            except OSError:
                continue
            if socks and have == want:
                if socks is self._loose:
                    self._loose = []
                else:
                    del self._socks[key]
                return socks
        return None

    def _retire_socks(self, socks: list[socket.socket]) -> None:
        """Our copies of listeners the front no longer serves (it finishes their requests):
        kept until `settle()`, for a gate that takes the address over meanwhile."""
        self._loose.extend(socks)

    def settle(self) -> None:
        """A reconfiguration is over: the listening sockets no gate took over are closed."""
        for sock in self._loose:
            sock.close()
        self._loose = []

    async def add(self, name: str, cfg: GateSection,
                  prepare: Callable[[RemoteGate], None] | None = None) -> RemoteGate:
        """A gate; `prepare` sets the daemon's first decisions on it (upstreams, on-demand),
        which the front puts in force before its listener takes a connection."""
        await self.start()
        g = self.gates.get(name)
        if g is not None:  # kept from the front an earlier daemon left
            await self.rebind(name, cfg)
            return g
        fds: list[int] = []
        if cfg.listen is not None:
            fds = self._bind(name, cfg.listen.host, cfg.listen.port,
                             f"{name}'s gate {cfg.listen}")
        g = RemoteGate(self, name, cfg)
        if prepare is not None:
            prepare(g)
        self.gates[name] = g
        await self.ask({"op": "gate", "name": name, "cfg": docs.to_doc(cfg),
                        "state": g.full_state()}, fds=fds)
        return g

    async def rebind(self, name: str, cfg: GateSection) -> None:
        """Settings and, if it changed, the listen address (bound first: StartupError, and
        nothing changes, if it cannot be)."""
        g = self.gates[name]
        fds: list[int] = []
        was = g.cfg.listen
        have = self._socks.get(name)
        if cfg.listen is not None and (cfg.listen != was or not have):
            fds = self._bind(name, cfg.listen.host, cfg.listen.port,
                             f"{name}'s gate {cfg.listen} (it stays on "
                             f"{was or 'the router only'})")
        elif cfg.listen is None:
            self._retire_socks(self._socks.pop(name, []))
        g.cfg = cfg
        await self.ask({"op": "gate", "name": name, "cfg": docs.to_doc(cfg)}, fds=fds)

    def _router(self, cfg: RouterSection) -> RemoteRouter:
        router = RemoteRouter(cfg)

        def set_catalog(routes: dict[str, str], entries: list[dict[str, object]]) -> None:
            router.catalog = (routes, entries)
            self.send({"op": "catalog", "routes": routes, "entries": entries})

        router.set_catalog = set_catalog  # type: ignore[method-assign]
        return router

    async def set_router(self, cfg: RouterSection | None,
                         catalog: tuple[dict[str, str], list[dict[str, object]]] | None = None
                         ) -> None:
        await self.start()
        if cfg is None:
            self.router = None
            self._retire_socks(self._socks.pop(None, []))
            await self.ask({"op": "router", "cfg": None})
            return
        fds: list[int] = []
        was = self.router.cfg.listen if self.router is not None else None
        if was != cfg.listen or not self._socks.get(None):
            fds = self._bind(None, cfg.listen.host, cfg.listen.port,
                             f"router.listen {cfg.listen}" + (f" (it stays on {was})"
                                                              if was else ""))
        if self.router is None:
            self.router = self._router(cfg)
        self.router.cfg = cfg
        doc: dict[str, Any] = {"op": "router", "cfg": docs.to_doc(cfg)}
        if catalog is not None:
            self.router.catalog = catalog
            doc["catalog"] = [catalog[0], catalog[1]]
        await self.ask(doc, fds=fds)

    async def remove(self, name: str, grace_s: float = REMOVE_GRACE_S,
                     wait: bool = True) -> None:
        """Close a gate: it stops accepting, its requests get `grace_s`; `wait`: until then
        (else the front answers when it is done, and nobody waits)."""
        self.gates.pop(name, None)
        self._retire_socks(self._socks.pop(name, []))
        doc = {"op": "remove", "name": name, "grace_s": grace_s}
        if wait:
            await self.ask(doc, timeout_s=grace_s + 5)
        else:
            self.send(doc)

    async def close(self, handover: bool = False) -> None:
        """Stop the front (it stops accepting; what is in flight gets CLOSE_GRACE_S), or with
        `handover` leave it serving for the next daemon (its lease ends with this process:
        the next daemon has the grace period to take it over)."""
        self.closing = True
        if self._starting is not None:
            self._starting.cancel()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._old and not handover:  # fronts still handing over: their requests get the
            # same grace as the current one's
            async def stop_old(old: Channel) -> None:
                with contextlib.suppress(ChannelClosed, TimeoutError):
                    await old.ask({"op": "stop", "grace_s": CLOSE_GRACE_S},
                                  timeout_s=CLOSE_GRACE_S + 3)

            await asyncio.gather(*(stop_old(old) for old in list(self._old)))
        for task in list(self._retiring):
            task.cancel()
        ch = self._ch
        if handover:
            if ch is not None:
                ch.close()
        else:
            if ch is not None:
                with contextlib.suppress(TimeoutError):
                    await self.ask({"op": "stop", "grace_s": CLOSE_GRACE_S},
                                   timeout_s=CLOSE_GRACE_S + 3)
                ch.close()
            await self._wait_gone(3.0)
        for socks in self._socks.values():
            for sock in socks:
                sock.close()
        self._socks.clear()
        self.settle()
        if handover:
            if self._lease_w is not None:  # (under systemd, its copy in the store stays)
                os.close(self._lease_w)
                self._lease_w = None
        else:
            self._drop_lease()
        if self._own_tmp is not None:
            import shutil

            await asyncio.to_thread(shutil.rmtree, self._own_tmp, True)
            self._own_tmp = None

    async def _wait_gone(self, timeout_s: float) -> None:
        gone = self._gone
        if self._pidfd is None or gone is None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await gone.wait()
        except TimeoutError:
            self._kill()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await gone.wait()


async def _kill_and_wait(pid: int, timeout_s: float) -> None:
    fd = P.pidfd(pid)
    if fd is None:
        return
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()

    def ended() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(fd, ended)
    try:
        P.send(fd, 9)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await gone
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _peer_pid(sock: socket.socket) -> int | None:
    import struct

    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, _gid = struct.unpack("3i", raw)
    return pid if uid == os.geteuid() else None


def _is_front(pid: int, d: Path) -> bool:
    """The process is a front serving `d` (its command line says so)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return False
    try:
        at = argv.index(b"--dir")
    except ValueError:
        return False
    return b"supervisord_llm.front" in argv and at + 1 < len(argv) \
        and argv[at + 1] == os.fsencode(str(d))
