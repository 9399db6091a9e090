"""The registry: the service actors, the replacements of hot swaps in progress, the gates, and
the GPU hub; it points each gate at its service's current instance.

It changes no actor's fields: it sends them events. Host-wide operations (reload, swap, drain,
stop) belong to the host actor (`host.py`), which is the only one that changes the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import Config
from .errors import ControlError, StartupError
from .front.client import FrontClient, RemoteGate
from .lifecycle import Drain, Resume, Stop
from .plan import ServicePlan
from .sensors.hub import GpuHub
from .service import Counters, Prober, ServiceActor
from .spawn import Adoptable, Spawner
from .states import State
from .ticks import sleep_to_tick
from .wants import Wants

log = logging.getLogger(__name__)

# The allowance on top of a service's own timeouts before a wait for it is given up: the
# stop signal, SIGKILL at stop.timeout_s, and the reaping of its group take a moment.
SETTLE_GRACE_S = 5.0


@dataclass
class LoopStats:
    lag_s: float = 0.0
    last_tick: float = 0.0
    watchdog_pings: int = 0


def load_state(actor: ServiceActor) -> str:
    """Whether a service's models are loaded, the one classification (the gates, the router's
    catalogue, the swapper): `loaded` (ready or draining), `unloaded` (held `idle`: a request
    loads it), `loading` (starting, or in backoff after a failed start, wanted up and held by
    nothing), else its state."""
    if actor.state in (State.READY, State.DRAINING):
        return "loaded"
    if "idle" in actor.holds:
        return "unloaded"
    if not actor.holds and actor.model.wanted and actor.state in (State.STARTING,
                                                                  State.BACKOFF):
        return "loading"
    return str(actor.state)


def closed_why(actor: ServiceActor | None) -> str:
    """Why a service's gate is closed (for the 503's message); for an on-demand service,
    `idle` (not loaded: a request starts it) and `loading` (a request waits)."""
    if actor is None:
        return "stopped"
    if actor.state is State.FAILED:
        return "failed"
    if actor.cfg.on_demand:
        loaded = load_state(actor)
        if loaded == "unloaded" and actor.holds == {"idle"}:
            return "idle"
        if loaded == "loading":
            return "loading"
    if actor.holds - {"operator", "idle"}:
        return "held"
    if actor.state is State.STOPPED or (actor.state is State.STOPPING and not actor.up):
        return "stopped"
    return "closed"


def _port_allowed(actor: ServiceActor, port: int | None) -> bool:
    """Whether an instance on `port` is this service's as configured: its port, its gate's
    swap port, or (a gated service without one: the hot swap picks a free port) any."""
    cfg = actor.cfg
    if port == cfg.port:
        return True
    gate = cfg.gate
    return gate is not None and (gate.swap_port is None or port == gate.swap_port)


def _process_age_s() -> float | None:
    """Seconds since this process started (its start time in /proc), or None."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            ticks = int(fh.read().rpartition(b")")[2].split()[19])
        with open("/proc/uptime", "rb") as fh:
            uptime = float(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))


def initial_holds(plan: ServicePlan) -> frozenset[str]:
    """An on-demand service starts held `idle`: its first request loads it."""
    return frozenset({"idle"}) if plan.config.on_demand else frozenset()


class Supervisor:
    def __init__(
        self,
        cfg: Config,
        plans: list[ServicePlan],
        hub: GpuHub,
        spawner: Spawner,
        prober: Prober,
        *,
        base_env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        front: Callable[[], FrontClient] | None = None,
    ) -> None:
        self.cfg = cfg
        # the front process (gates and router), made when the first gate or the router is
        self.gates: FrontClient | None = None
        self._make_front = front or (lambda: FrontClient(None))
        # a front an earlier daemon left serves on: its upstreams are not touched until the
        # services it serves are adopted (or not)
        self._hold_upstreams = False
        self._retiring: dict[asyncio.Task[None], Adoptable] = {}  # earlier instances finishing
        self.hub = hub
        self.spawner = spawner
        self.prober = prober
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._clock = clock
        self.started_at = clock()
        self.loop = LoopStats(last_tick=clock())
        self.actors: dict[str, ServiceActor] = {}
        # instances beyond the registry's, while a hot swap runs: (role, actor) by service;
        # role "replacement" (starting), then "retiring" (the old one, finishing its requests)
        self.extra: dict[str, tuple[str, ServiceActor]] = {}
        # who waits for which on-demand service (the gates ask here; the swapper serves)
        self.wants = Wants(self._may_want, clock)
        # holds a service gets when a reload adds it: `powered_down` while the power
        # controller holds the services (it alone writes this)
        self.new_holds: set[str] = set()
        self._pushed: dict[str, tuple[object, ...]] = {}
        self._demand_pushed: dict[str, tuple[bool, float]] = {}
        self._router_pushed: tuple[tuple[str, str, str], ...] | None = None
        self._started = False  # the first start_gates() has run
        self.reattach_s: float | None = None  # start -> every adopted service ready
        self._listeners: list[Callable[[], None]] = []
        # the front door (keys, audit), as `access.Access` makes it: every front is told it
        self.door: dict[str, Any] = {"keys": None, "audit": None}
        for plan in plans:
            self.actors[plan.name] = self.make_actor(plan, holds=initial_holds(plan))

    def make_actor(self, plan: ServicePlan, *, port: int | None = None,
                   counters: Counters | None = None, wanted: bool = False,
                   holds: frozenset[str] = frozenset(), added: bool = False) -> ServiceActor:
        """A service actor; `added`: a service a reload adds, which gets `new_holds` (not
        loaded onto the battery). A hot swap's replacement, or a service a reload restarts
        with a new configuration, replaces one that runs: it does not."""
        if added:
            holds = holds | self.new_holds
        return ServiceActor(plan, self.spawner, self.prober, port=port, counters=counters,
                            wanted=wanted, holds=holds, base_env=self._base_env,
                            on_change=lambda _a: self.changed(), clock=self._clock)

    def _may_want(self, name: str, force: bool) -> bool:
        actor = self.actors.get(name)
        return actor is not None and (actor.cfg.on_demand or force)

    def on_change(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    def changed(self) -> None:
        self.sync_gates()
        for fn in self._listeners:
            fn()

    # --- gates -------------------------------------------------------------------------------

    def gate_of(self, name: str) -> RemoteGate | None:
        return None if self.gates is None else self.gates.gates.get(name)

    def _front(self) -> FrontClient:
        if self.gates is None:
            front = self._make_front()
            front.on_ask = self._ask
            front.on_waiting = self.wants.set_waiting
            front.door = self.door
            self.gates = front
        return self.gates

    async def set_door(self, doc: dict[str, Any]) -> bool:
        """Keys and audit settings: in force in the front (if there is one) on True."""
        self.door = doc
        if self.gates is not None:
            return await self.gates.set_door(doc)
        return True

    def _ask(self, name: str, model: str | None) -> None:
        self.wants.ask(name, model)

    async def _take_over_front(self) -> None:
        """At the first start: the front an earlier daemon left (if any) becomes ours; its
        gates that are no longer configured close; the drain reasons of the earlier daemon
        go, but the operator's (the ledger has them too); a new front if there was none and
        one is needed."""
        wanted = {a.name for a in self.actors.values() if a.cfg.gate is not None}
        front = self._front()
        if not wanted and self.cfg.router is None:
            if await front.stop_leftover():
                log.info("front: the front process an earlier daemon left was stopped (no "
                         "gate or router configured now)")
            self.gates = None
            return
        await front.start()
        if not front.adopted:
            return
        self._hold_upstreams = True
        for name in list(front.gates):
            if name not in wanted:  # its requests finish meanwhile (the start goes on)
                await front.remove(name, front.gates[name].cfg.drain_timeout_s, wait=False)
        for gate in front.gates.values():
            if gate.drains - {"operator"}:
                gate.drains &= {"operator"}
                gate.set_drains()
        if self.cfg.router is None and front.router is not None:
            await front.set_router(None)

    def release_upstreams(self) -> None:
        """The adoption is over: the gates follow their services from now on."""
        if self._hold_upstreams:
            self._hold_upstreams = False
            self.changed()

    async def start_gates(self) -> list[str]:
        """Bind every configured gate that is not bound yet (closed until its service is
        ready). At start a gate that cannot bind is fatal (StartupError); `errors` collects
        them instead (a reload), one line each."""
        errors: list[str] = []
        if not self._started:
            await self._take_over_front()
        for actor in self.actors.values():
            if actor.cfg.gate is not None and (self.gate_of(actor.name) is None
                                               or not self._started):
                try:
                    await self._front().add(actor.name, actor.cfg.gate, self._prepare)
                except StartupError as exc:
                    if not self._started:
                        raise
                    errors.append(str(exc))
        if self.cfg.router is not None or (self.gates is not None and self.gates.router):
            # after the gates, with the catalogue: its first request finds every model
            entries = self.model_entries()
            try:
                await self._front().set_router(
                    self.cfg.router, ({str(e["id"]): str(e["service"]) for e in entries},
                                      entries))
                self._router_pushed = None
            except StartupError as exc:
                if not self._started:
                    raise
                errors.append(str(exc))
        self._started = True
        if self.gates is not None:
            self.gates.settle()
        self.changed()  # the gates follow their services; the parts that watch gates look
        return errors

    async def remove_gate(self, name: str) -> None:
        if self.gates is not None and self.gate_of(name) is not None:
            await self.gates.remove(name)
        self._pushed.pop(name, None)
        self._demand_pushed.pop(name, None)

    def _upstream(self, name: str | None, backup: bool = False) -> tuple[str, int] | None:
        """Where a gate sends its requests: its service while it is ready, or draining
        (requests in flight finish there); a backup only while it is ready (a backup whose
        own gate is drained, for a power-down or by an operator, takes no new requests
        through another gate either)."""
        actor = self.actors.get(name) if name else None
        if actor is None or actor.port is None:
            return None
        if actor.state is State.READY or (actor.state is State.DRAINING and not backup):
            return ("127.0.0.1", actor.port)
        if actor.state is State.STARTING and actor.adopted and actor.proc is not None \
                and not backup and self._serving(name, actor.port):
            # adopted, its first health check not done yet, and the front served it while no
            # daemon was there: it goes on (one that was still loading stays closed)
            return ("127.0.0.1", actor.port)
        return None

    def _prepare(self, gate: RemoteGate) -> None:
        """A new gate's first state, set before it listens (a request in the first moment is
        then told the truth: an on-demand service's waits for its load, not 503 'closed')."""
        actor = self.actors.get(gate.name)
        if actor is None or actor.cfg.gate is None:
            return
        gate.on_demand = actor.cfg.on_demand
        gate.startup_timeout_s = actor.cfg.health.startup_timeout_s
        self._demand_pushed[gate.name] = (gate.on_demand, gate.startup_timeout_s)
        wanted = (self._upstream(gate.name),
                  self._upstream(actor.cfg.gate.backup, backup=True), closed_why(actor))
        gate.upstream, gate.backup, gate.closed_why = wanted
        self._pushed[gate.name] = wanted

    def _serving(self, name: str | None, port: int | None) -> bool:
        """The gate of `name` sends its requests to `port` now."""
        gate = self.gate_of(name) if name else None
        return gate is not None and gate.upstream is not None and gate.upstream[1] == port

    def sync_gates(self) -> None:
        """Point each gate at its service while it is ready (and at its backup's); tell the
        router which models are where."""
        if self.gates is None:
            return
        for name, gate in self.gates.gates.items():
            actor = self.actors.get(name)
            if actor is None or actor.cfg.gate is None:
                continue
            demand = (actor.cfg.on_demand, actor.cfg.health.startup_timeout_s)
            if self._demand_pushed.get(name) != demand:
                self._demand_pushed[name] = demand
                gate.set_demand(demand[0], demand[1])
            if self._hold_upstreams:
                continue
            wanted = (self._upstream(name), self._upstream(actor.cfg.gate.backup, backup=True),
                      closed_why(actor))
            if self._pushed.get(name) != wanted:
                self._pushed[name] = wanted
                gate.set_upstreams(*wanted)
            # the service's state follows its gate: draining while any drain reason holds
            if actor.state is State.READY and gate.drains:
                actor.post(Drain())
            elif actor.state is State.DRAINING and not gate.drains:
                actor.post(Resume())
        self._sync_router()

    def model_entries(self) -> list[dict[str, object]]:
        """Every model behind the router: its service and the state of that service."""
        out: list[dict[str, object]] = []
        for actor in self.actors.values():
            state = load_state(actor)
            for model in actor.cfg.models:
                out.append({"id": model, "object": "model", "created": 0,
                            "owned_by": "llm-supervisor", "service": actor.name,
                            "state": state, "start": actor.cfg.start})
        return out

    def _sync_router(self) -> None:
        router = self.gates.router if self.gates is not None else None
        if router is None:
            return
        entries = self.model_entries()
        routes = {str(e["id"]): str(e["service"]) for e in entries}
        key = tuple((str(e["id"]), str(e["service"]), str(e["state"])) for e in entries)
        if self._router_pushed != key:
            self._router_pushed = key
            router.set_catalog(routes, entries)

    async def gates_settled(self) -> None:
        """Until every change pushed to the gates so far has been applied by the front (and
        their counters read afresh)."""
        if self.gates is not None and self.gates.gates:
            await self.gates.refresh()

    # --- lifecycle -----------------------------------------------------------------------------

    async def start_all(self, hold: str | None = None,
                        adoptable: Sequence[Adoptable] = (),
                        held: Collection[str] = ()) -> list[str]:
        """Launch every service in config order (not waiting for the models to load); with
        `hold`, they are wanted up but held down for it (the UPS on low battery at start).
        A service whose instance an earlier daemon left running (`adoptable`, launched just
        as this configuration would launch it) adopts it instead of launching; the others
        are stopped first (a service removed or changed: its GPU memory is needed). `held`:
        services the operator had stopped before the daemon restarted (`llmctl stop`): they
        stay held, unless they run (adopted: what runs wins). Returns the services adopted."""
        chosen: dict[str, Adoptable] = {}
        extra: list[tuple[Adoptable, str]] = []
        # the oldest instance of a service first: in the middle of a hot swap the one that
        # was serving (loaded for sure), not the replacement that may still be loading
        # (unless the front an earlier daemon left serves another: after a swap's switch)
        for item in sorted(adoptable, key=lambda i: (
                not self._serving(i.record.service, i.record.port), i.proc.start_ticks)):
            actor = self.actors.get(item.record.service)
            why = "not configured" if actor is None else \
                "a second instance" if item.record.service in chosen else \
                "its launch changed" if item.record.digest != actor.launch_spec(
                    item.gen, item.record.port).digest else \
                f"its port changed ({item.record.port})" if not _port_allowed(
                    actor, item.record.port) else None
            if why is None:
                chosen[item.record.service] = item
            else:
                extra.append((item, why))
        for item, why in extra:
            log.warning("%s: an earlier supervisor's instance (pid %d) is not what this "
                        "configuration launches (%s): stopping it", item.record.service,
                        item.proc.pid, why)
        later = [(item, why) for item, why in extra if why == "a second instance"
                 and self.gate_of(item.record.service) is not None]
        await asyncio.gather(*(self.spawner.keepers.stop_adoptable(
            item, self.actors[item.record.service].cfg.stop.timeout_s
            if item.record.service in self.actors else 30.0) for item, why in extra
            if (item, why) not in later))
        for item, _why in later:  # the other instance of a hot swap: what it still serves
            # through the gate finishes first (at most drain_timeout_s), as in the swap
            task = asyncio.get_running_loop().create_task(self._retire_extra(item))
            self._retiring[task] = item
            task.add_done_callback(lambda t: self._retiring.pop(t, None))
        for actor in list(self.actors.values()):
            took = chosen.get(actor.name)
            if took is not None:
                actor.port = took.record.port
                self.spawner.keepers.adopted(took, actor.launch_spec(took.gen))
                if not actor.alive:
                    actor.run()
                await actor.adopt(took.proc, took.gen)
                if actor.name in held:  # the operator's stop was under way: it goes on
                    log.info("%s: held by the operator (llmctl stop) before the restart: "
                             "stopping it", actor.name)
                    await actor.send(Stop("operator"))
                if hold is not None:
                    await actor.send(Stop(hold))
                continue
            if actor.name in held and not actor.alive:
                actor.preset(wanted=True, holds=actor.holds | {"operator"})
                log.info("%s: held by the operator (llmctl stop) before the restart: stays "
                         "down until `llmctl start %s`", actor.name, actor.name)
                actor.run()
                if hold is not None:
                    await actor.send(Stop(hold))
                continue
            if not actor.alive:
                actor.run()
            if hold is not None:
                await actor.send(Stop(hold))
            await actor.command("start")
        return list(chosen)

    async def _retire_extra(self, item: Adoptable) -> None:
        actor = self.actors[item.record.service]
        gate = self.gate_of(item.record.service)
        if gate is not None and actor.cfg.gate is not None and item.record.port is not None:
            await gate.wait_idle(port=item.record.port, timeout_s=actor.cfg.gate.drain_timeout_s)
        await self.spawner.keepers.stop_adoptable(item, actor.cfg.stop.timeout_s)

    async def stop_actor(self, actor: ServiceActor, *, remove: bool = False) -> None:
        """Stop a service and wait until it is gone (SIGKILL if it outlives its stop timeout
        and the grace); with `remove`, end its actor too."""
        if actor.alive:
            await actor.send(Stop())
            try:
                await actor.wait_stopped(actor.cfg.stop.timeout_s + SETTLE_GRACE_S)
            except TimeoutError:
                log.error("%s: did not stop in time; killing its process group", actor.name)
                actor.kill_now()
                try:
                    await actor.wait_stopped(SETTLE_GRACE_S)
                except TimeoutError:
                    log.error("%s: still not gone; leaving it to the orphan guardian",
                              actor.name)
        if remove:
            await actor.shutdown()

    async def time_reattach(self, names: list[str], limit_s: float = 600.0) -> None:
        """How long from the daemon's start until every adopted service was ready again
        (`reattach_s`; logged). Services that leave adoption otherwise (held, failed) end
        the wait for them."""
        t0 = time.monotonic()
        waits = [self.actors[n].wait_for(lambda a: a.state is not State.STARTING, limit_s)
                 for n in names if n in self.actors]
        with contextlib.suppress(TimeoutError):
            await asyncio.gather(*waits)
        since_start = _process_age_s()
        self.reattach_s = since_start if since_start is not None else time.monotonic() - t0
        ready = [n for n in names if n in self.actors
                 and self.actors[n].state in (State.READY, State.DRAINING)]
        log.info("re-attached to %d model(s) an earlier supervisor left (%s ready) %.0f ms "
                 "after the start", len(names), ", ".join(ready) or "none",
                 self.reattach_s * 1000)

    def kill_all(self) -> None:
        """Fast stop (second SIGTERM): SIGKILL every process group now."""
        for actor in self.all_actors():
            actor.kill_now()
        self.spawner.kill_all()

    async def close(self, handover: bool = False) -> None:
        """`handover`: the front serves on for the next daemon."""
        for task, item in list(self._retiring.items()):  # stopped now, with the rest
            task.cancel()
            if not handover:
                await self.spawner.keepers.stop_adoptable(item, 2.0)
        for actor in self.all_actors():
            await actor.shutdown()
        if self.gates is not None:
            await self.gates.close(handover=handover)

    def all_actors(self) -> list[ServiceActor]:
        return [*self.actors.values(), *(a for _role, a in self.extra.values())]

    def tasks_alive(self) -> bool:
        return all(a.alive for a in self.actors.values())

    # --- queries -----------------------------------------------------------------------------

    def actor(self, name: str) -> ServiceActor:
        try:
            return self.actors[name]
        except KeyError:
            known = ", ".join(self.actors) or "none configured"
            raise ControlError("unknown_service",
                               f"no service named {name!r} (services: {known})") from None

    def any_failed(self) -> bool:
        return any(a.state is State.FAILED for a in self.actors.values())

    def ports_in_use(self) -> set[int]:
        """Every port an instance, a replacement, a gate or the metrics listener holds or is
        configured to hold."""
        ports = {self.cfg.metrics.listen.port} if self.cfg.metrics.listen else set()
        for actor in self.all_actors():
            for p in (actor.port, actor.cfg.port):
                if p is not None:
                    ports.add(p)
            gate = actor.cfg.gate
            if gate is not None:
                if gate.listen is not None:
                    ports.add(gate.listen.port)
                if gate.swap_port is not None:
                    ports.add(gate.swap_port)
        return ports

    # --- the loop monitor --------------------------------------------------------------------

    async def monitor_loop(self, interval_s: float = 1.0) -> None:
        """Measure event-loop lag: how late a timer fires. On the shared ticks (it wakes with
        the GPU polls, not on its own); /healthz calls the loop stale after 5 s."""
        loop = asyncio.get_running_loop()
        while True:
            when = await sleep_to_tick(interval_s)
            self.loop.lag_s = max(0.0, loop.time() - when)
            self.loop.last_tick = self._clock()
