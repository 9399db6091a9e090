"""Models on demand: the swapper.

An on-demand service (`start = "on-demand"`) is held down for `idle` until a request for one
of its models reaches its gate (through the router or the gate itself); the gate asks for it
(`demand`) and keeps the request waiting. The swapper then starts it when its GPUs have room,
or first stops the least recently used idle on-demand services on those GPUs (never an
`always` service, never one with a request inside its gate, never one `llmctl start` pinned,
never one loaded less than its `min_residency_s` ago): the victim's gate is retired on the
gate loop only if nothing is inside it, so nothing is cut, and requests that come meanwhile
wait and ask for it again. While the only services that could make room are busy, the demand
does not wait for them to be idle by chance (steady traffic would starve it): those loaded at
least their `min_residency_s` ago are drained, least recently loaded first (their gates admit
no new request, which wait and load them again later; once the requests inside have their
answers, they are retired and stopped), and called off if the demand goes away. A demand
waits at most the gate's `queue_timeout_s` after its last request. `idle_stop_s` stops a
loaded service after that long without a request inside its gate.

Memory: a service needs on each of its GPUs the larger of its `vram_gb` and what was learned
once it was ready: NVML's per-process figure where the backend gives one, else the change of
the GPU's used memory across its start (kept only when nothing else on that GPU started or
stopped meanwhile). A GPU's memory in use is the larger of what our services need and what
the GPU reports used (a stranger's process counts too). `exclusive = true` reserves the
service's GPUs for it alone.

Runs on the daemon's loop; acts on services through the host's commands (holds `idle`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from . import lifecycle as L
from .config import GIB
from .errors import ControlError
from .gate.proxy import Histogram
from .modes import Mode
from .policy import room as R
from .policy.room import RoomPlan, gib
from .states import State
from .wants import WANTED_GRACE_S, Pending, settle

if TYPE_CHECKING:
    from .host import Host
    from .service import ServiceActor
    from .supervisor import Supervisor

log = logging.getLogger(__name__)

DRAIN_POLL_S: Final = 0.05  # how often a drain looks whether its requests are answered
HOLDING: Final = frozenset({State.STARTING, State.READY, State.DRAINING, State.STOPPING})
COLD_BUCKETS: Final = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass
class ServiceStats:
    cold_starts: dict[str, int] = field(default_factory=dict)  # by model that asked
    swaps: int = 0  # stopped to make room for another
    idle_stops: int = 0
    cold_start: Histogram = field(default_factory=lambda: Histogram(COLD_BUCKETS))


class Swapper:
    def __init__(self, sup: Supervisor, host: Host,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sup = sup
        self.host = host
        self._clock = clock
        self.pinned: set[str] = set()
        self._pinning: set[str] = set()  # an `llmctl start` loads them: pinned once loaded
        self.wants = sup.wants  # who waits for which service (the one owner)
        self.pending = self.wants.pending
        self.learned: dict[str, dict[str, int]] = {}  # service -> GPU uuid -> bytes
        self.stats: dict[str, ServiceStats] = {}
        self._loading: dict[str, tuple[int, float]] = {}  # service -> (gen, cold start began)
        self._epoch: dict[str, int] = {}  # GPU uuid -> starts/stops seen on it
        self._before: dict[str, tuple[int, dict[str, int], dict[str, int]]] = {}
        self._own: dict[str, dict[str, int]] = {}  # the service's own changes since then
        self._seen: dict[str, tuple[State, int]] = {}
        # actors (by id) with a stop or start of ours in flight: by identity, so that a
        # command stuck on an actor a reload removed never blocks the new one of that name
        self._acting: set[int] = set()
        self._changed_at: dict[str, float] = {}  # GPU uuid -> when a service on it changed
        self._ready_at: dict[str, float] = {}  # service -> when it became ready (residency)
        self._draining: dict[str, str] = {}  # service -> the one it is drained for
        self._evicting: set[str] = set()  # victims being stopped (until the stop is done)
        self._yielding: set[str] = set()  # those of them whose gates admit no new request
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        with contextlib.suppress(RuntimeError):  # built outside a loop (tests)
            self._loop = asyncio.get_running_loop()
        sup.on_change(self.poke)
        host.on_change(self.poke)  # an operation ended (or the mode changed)
        self._polled = asyncio.Event()  # set after each poll of the hub
        sup.hub.on_update(self._on_poll)

    # --- inputs --------------------------------------------------------------------------------

    def _on_poll(self) -> None:
        self._polled.set()
        if self.pending:  # a GPU's used memory may show the room a stop made
            self.poke()

    def poke(self) -> None:
        self.wants.poke()

    def demand(self, name: str, model: str | None, pin: bool = False,
               force: bool = False) -> Pending | None:
        """Load `name` (held `idle`) once there is room; `force`: even if it is not an
        on-demand service (a reload made it `always`)."""
        return self.wants.ask(name, model, pin, force)

    def stats_of(self, name: str) -> ServiceStats:
        st = self.stats.get(name)
        if st is None:
            st = self.stats[name] = ServiceStats()
        return st

    # --- the operator --------------------------------------------------------------------

    async def start(self, names: list[str]) -> None:
        """`llmctl start` of on-demand services: pinned (no idle stop, never a victim) and
        loaded now, making room like a request would; ControlError if room cannot be made
        within the gate's queue_timeout_s."""
        waits: list[tuple[str, asyncio.Future[str | None]]] = []
        self._pinning.update(names)  # no victims for each other: they are all to stay
        try:
            await self._start_pinned(names, waits)
        finally:
            self._pinning.difference_update(names)

    async def _start_pinned(self, names: list[str],
                            waits: list[tuple[str, asyncio.Future[str | None]]]) -> None:
        for name in names:
            actor = self.sup.actor(name)
            if "idle" not in actor.holds:
                self.pinned.add(name)  # loaded (or loading) already
            else:  # pinned once loaded: a start that fails pins nothing
                p = self.demand(name, None, pin=True)
                if p is not None:
                    fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
                    p.waiters.append(fut)
                    waits.append((name, fut))
        problems = []
        for _name, fut in waits:
            why = await fut
            if why is not None:
                problems.append(why)
        if problems:
            raise ControlError("failed", "; ".join(problems) + (
                "; a pinned model keeps its room until `llmctl stop NAME` (or `llmctl reset "
                "NAME`, back to on demand)" if "pinned by llmctl start" in "".join(problems)
                else ""))

    def unpin(self, names: list[str]) -> None:
        for name in names:
            self.pinned.discard(name)
            self.wants.settle(name, f"{name}: stopped by the operator")

    def on_demand_names(self, names: list[str]) -> list[str]:
        return [n for n in names if n in self.sup.actors and self.sup.actors[n].cfg.on_demand]

    # --- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Woken by what changes a decision (a demand, a request waiting or giving up, a gate
        going idle, a service changing state, a poll while something waits) and by its own
        deadlines (a queue timeout, an idle stop, a residency ending); no polling."""
        self._loop = asyncio.get_running_loop()
        self.wants.bind(self._loop)
        woken = self.wants.woken
        while True:
            woken.clear()
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("models on demand: internal error (carrying on)")
            left = self._next_deadline(self._clock())
            try:
                async with asyncio.timeout(left):
                    await woken.wait()
            except TimeoutError:
                pass

    def _next_deadline(self, now: float) -> float | None:
        """Seconds until the next moment a decision may change by time alone (None: none)."""
        times: list[float] = []
        for name, p in self.pending.items():
            actor = self.sup.actors.get(name)
            gate = actor.cfg.gate if actor is not None else None
            times.append(p.last + (gate.queue_timeout_s if gate is not None else 30.0))
            times.append(p.last + WANTED_GRACE_S)
        mono = time.monotonic()
        for name, actor in self.sup.actors.items():
            if actor.state is not State.READY:
                continue
            left = self.resident_left(actor, now)
            if left and self.pending:
                times.append(now + left)
            gate = self.sup.gate_of(name)
            if actor.cfg.idle_stop_s is not None and gate is not None:
                # the gate's idle clock is the monotonic one
                times.append(now + gate.last_active + actor.cfg.idle_stop_s - mono)
        ahead = [t - now for t in times if t > now]
        return min(ahead) + 0.01 if ahead else None

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self.wants.settle_all("llm-supervisor is stopping")

    async def step(self) -> None:
        now = self._clock()
        self._track(now)
        if self.host.mode.value in ("shutting_down", "powering_down", "powered_down"):
            for name in list(self.pending):
                self.wants.settle(name, f"{name} cannot be loaded now: llm-supervisor is "
                             f"{self.host.mode.value.replace('_', ' ')}")
            return
        await self._unretire()
        for name, actor in self.sup.actors.items():
            if not actor.cfg.on_demand and actor.holds == {"idle"} \
                    and actor.state is not State.FAILED and name not in self.pending:
                # one a reload made `always`: wanted until it is loaded, however long the
                # room (or the power) takes
                self.wants.ask(name, None, force=True)
        for name in list(self.pending):
            await self._serve(name, now)
        await self._idle_stops(now)

    # --- bookkeeping ------------------------------------------------------------------------

    def _track(self, now: float) -> None:
        """Starts and stops seen since the last step: cold-start times, the memory baseline
        before a launch, the GPUs' epochs, and the learning once ready."""
        for name, actor in self.sup.actors.items():
            cur = (actor.state, actor.gen)
            was = self._seen.get(name)
            if was == cur:
                continue
            self._seen[name] = cur
            if actor.state is State.STARTING and (was is None or was[1] != actor.gen) \
                    and self._before.get(name, (-1,))[0] != actor.gen:
                self._baseline(actor, actor.gen)  # a start not of ours: best effort
            if was is None or was[1] != actor.gen or (was[0] in HOLDING) != (cur[0] in HOLDING):
                for g in actor.plan.gpus:
                    self._epoch[g.uuid] = self._epoch.get(g.uuid, 0) + 1
                    if was is not None or cur[0] in HOLDING:  # not a first sight of a stop
                        self._changed_at[g.uuid] = time.monotonic()
                own = self._own.get(name)
                if own is not None:
                    for g in actor.plan.gpus:
                        own[g.uuid] = own.get(g.uuid, 0) + 1
            if actor.state is State.READY and (was is None or was[0] is not State.READY
                                               or was[1] != actor.gen):
                self._ready_at[name] = now
            if actor.state is State.READY and (was is None or was[0] is not State.READY):
                loading = self._loading.pop(name, None)
                if loading is not None:
                    self.stats_of(name).cold_start.observe(now - loading[1])
                    log.info("%s: loaded in %.1f s", name, now - loading[1])
                self._learn_later(actor)
            if actor.state in (State.STOPPED, State.FAILED):
                self._loading.pop(name, None)
            if actor.cfg.on_demand and actor.state is State.STOPPED and not actor.holds \
                    and not actor.model.wanted and id(actor) not in self._acting \
                    and not self._busy_op(name):
                # ended by itself (an exit 0 under on-failure): back to "on demand"
                self._spawn(self._to_idle(actor))
            if actor.cfg.on_demand and actor.state is State.BACKOFF and name not in self.pinned \
                    and name not in self.pending and id(actor) not in self._acting \
                    and not self.wants.waits(name):
                # a load that failed, and nobody waits for it: give its GPUs back rather than
                # retry for nobody (the next request tries again)
                log.warning("%s: its load failed and no request waits for it; unloading",
                            name)
                self._spawn(self._to_idle(actor))
            if actor.state is State.FAILED:
                self.wants.settle(name, f"{name} failed: {actor.failed_reason}")

    def _baseline(self, actor: ServiceActor, gen: int) -> None:
        """The GPUs' used memory before launch `gen` of the service (what it adds is
        learned once it is ready)."""
        self._before[actor.name] = (gen, self._used(actor), self._epochs(actor))
        self._own[actor.name] = {}

    def _epochs(self, actor: ServiceActor) -> dict[str, int]:
        return {g.uuid: self._epoch.get(g.uuid, 0) for g in actor.plan.gpus}

    def _used(self, actor: ServiceActor) -> dict[str, int]:
        """The memory its GPUs report used, from readings taken since the last start or stop
        of a service on each (an older one may still count a service that has gone)."""
        out = {}
        wanted = {g.uuid for g in actor.plan.gpus}
        for snap in self.sup.hub.snapshots():
            r = snap.reading
            uuid = snap.info.uuid
            if uuid in wanted and snap.status == "ok" and r is not None \
                    and r.memory_used_bytes is not None and snap.read_at is not None \
                    and snap.read_at > self._changed_at.get(uuid, float("-inf")):
                out[uuid] = r.memory_used_bytes
        return out

    def _learn_later(self, actor: ServiceActor) -> None:
        if actor.plan.gpus:
            self._spawn(self._learn(actor.name, actor.gen))

    async def _learn(self, name: str, gen: int) -> None:
        """What the service really uses on each GPU, once a poll after its ready has come."""
        actor = self.sup.actors.get(name)
        if actor is None:
            return
        ready_at = time.monotonic()
        poll = self.sup.cfg.gpu.poll_interval_s
        per_process = await self._process_memory(actor)
        learned: dict[str, int] = {}
        if per_process:
            learned = per_process
        else:
            # the next poll of its GPUs (woken by the hub, at most three poll intervals)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3 * poll):
                    while not all(sn.read_at is not None and sn.read_at > ready_at
                                  for sn in self.sup.hub.snapshots()
                                  if sn.info in actor.plan.gpus):
                        self._polled.clear()
                        await self._polled.wait()
            before = self._before.get(name)
            if before is None or before[0] != gen or actor.gen != gen:
                return
            now_used = self._used(actor)
            epochs = self._epochs(actor)
            own = self._own.get(name, {})
            for uuid, used in now_used.items():
                base = before[1].get(uuid)
                # a start or stop of another service on this GPU meanwhile spoils the delta
                others = epochs.get(uuid, 0) - before[2].get(uuid, 0) - own.get(uuid, 0)
                if base is not None and others == 0 and used > base:
                    learned[uuid] = used - base
        if learned and actor.gen == gen:
            self.learned[name] = learned
            how = "per process" if per_process else "growth of the GPU's used memory"
            log.info("%s: uses %s (%s)", name, ", ".join(
                f"{gib(b)} on GPU {u}" for u, b in learned.items()), how)

    async def _process_memory(self, actor: ServiceActor) -> dict[str, int]:
        """NVML's per-process memory of the service's processes, per GPU (empty if the
        backend cannot tell)."""
        proc = actor.proc
        if proc is None:
            return {}
        try:
            pids = await asyncio.to_thread(_tree, proc.pid)
        except Exception:
            return {}
        out: dict[str, int] = {}
        for g in actor.plan.gpus:
            try:
                table = await self.sup.hub.call(g, _process_table)
            except Exception:
                return {}
            if table is None:
                return {}
            total = sum(b for pid, b in table.items() if pid in pids)
            if total:
                out[g.uuid] = total
        return out

    def need(self, actor: ServiceActor) -> dict[str, int]:
        """What the service needs on each of its GPUs (bytes; 0 when unknown)."""
        declared = int((actor.cfg.vram_gb or 0) * GIB)
        learned = self.learned.get(actor.name, {})
        return {g.uuid: max(declared, learned.get(g.uuid, 0)) for g in actor.plan.gpus}

    # --- serving a demand -------------------------------------------------------------------

    async def _serve(self, name: str, now: float) -> None:
        p = self.pending[name]
        actor = self.sup.actors.get(name)
        if actor is None or not (actor.cfg.on_demand or p.force):
            del self.pending[name]
            settle(p, f"{name} is not an on-demand service any more")
            return
        other = actor.holds - {"idle"}
        if actor.state is State.FAILED or other:
            del self.pending[name]
            why = actor.failed_reason if actor.state is State.FAILED else \
                "held: " + ", ".join(sorted(other))
            settle(p, f"{name} cannot be loaded ({why})")
            return
        if "idle" not in actor.holds:  # loading or loaded already
            del self.pending[name]
            settle(p, None)
            return
        if not self.wanted(name, now):  # every request for it gave up: load nothing for nobody
            del self.pending[name]
            await self._set_message(self.sup.gate_of(name), None)
            settle(p, f"{name}: nobody waits for it any more")
            return
        if actor.state is not State.STOPPED or id(actor) in self._acting or self._busy_op(name):
            return  # being unloaded (or an operation on it runs): once that is over
        if not actor.model.wanted:
            # not started yet (a request that came while the daemon starts its services):
            # released now, it would not launch, and its gate would say "stopped"
            return
        if p.force and self.host.mode is Mode.ON_BATTERY:
            return  # made `always` by a reload: not loaded onto the battery (as if added)
        gate = self.sup.gate_of(name)
        timeout = actor.cfg.gate.queue_timeout_s if actor.cfg.gate else 30.0
        plan = self.room(actor)
        if plan.ok and not plan.victims:
            del self.pending[name]
            await self._set_message(gate, None)
            await self._load(actor, p)
            return
        if plan.ok:
            log.info("%s: making room: stopping %s", name, ", ".join(plan.victims))
            for victim in plan.victims:
                self._evicting.add(victim)  # freed in the plans that follow: no second victim
                self._spawn(self._evict(victim, name))
            return
        for victim in plan.drain:
            if victim not in self._draining:
                self._draining[victim] = name
                self._spawn(self._drain_out(victim, name))
        await self._set_message(gate, plan.message)
        # the operator's start is told at once when nothing could make room by waiting (what
        # holds it is pinned, `always` or exclusive); a request waits its queue_timeout_s
        if (now - p.last >= timeout and not p.force) or (
                p.pin and not plan.wait and not plan.drain):
            del self.pending[name]
            log.warning("%s: not loaded: %s", name, plan.message)
            settle(p, plan.message)

    async def _load(self, actor: ServiceActor, p: Pending) -> None:
        name = actor.name
        self._acting.add(id(actor))
        try:
            self._loading[name] = (actor.gen + 1, p.since)
            st = self.stats_of(name)
            key = p.model or (actor.cfg.models[0] if actor.cfg.models else name)
            st.cold_starts[key] = st.cold_starts.get(key, 0) + 1
            if p.pin:
                self.pinned.add(name)
            self._baseline(actor, actor.gen + 1)
            await self.host.command([name], L.Release("idle"), internal=True)
            settle(p, None)
        except ControlError as exc:
            self._loading.pop(name, None)
            settle(p, f"{name}: {exc.message}")
        finally:
            self._acting.discard(id(actor))

    def _busy_op(self, name: str) -> bool:
        return name in self.host.ops or "*" in self.host.ops or name in self.sup.extra

    # --- room ---------------------------------------------------------------------------------

    def _holding(self) -> list[ServiceActor]:
        """Services that hold, or will hold, their memory: running, stopping, or wanted up
        (one in backoff comes back and needs its place)."""
        return [a for a in self.sup.all_actors()
                if a.state in HOLDING or a.proc is not None or a.up
                or (not a.cfg.on_demand and a.model.wanted and "operator" not in a.holds)]

    def committed(self, uuid: str) -> int:
        """What the services holding (or about to hold) this GPU need of it: `vram_gb`, or
        what was learned, whichever is larger. The figure the no-room message counts, beside
        what the GPU itself reports used."""
        return sum(self.need(a).get(uuid, 0) for a in self._holding()
                   if any(g.uuid == uuid for g in a.plan.gpus))

    def _idle(self, actor: ServiceActor) -> bool:
        gate = self.sup.gate_of(actor.name)
        busy = gate is not None and (gate.active or gate.inflight
                                     or self.wants.waits(actor.name))
        return actor.state is State.READY and not busy and id(actor) not in self._acting

    def wanted(self, name: str, now: float | None = None) -> bool:
        return self.wants.wanted(name, now)

    def resident_left(self, actor: ServiceActor, now: float | None = None) -> float:
        """How long a ready service is still kept loaded by its `min_residency_s` (0: it
        may be stopped to make room)."""
        if actor.state is not State.READY or not actor.cfg.min_residency_s:
            return 0.0
        since = self._ready_at.get(actor.name)
        if since is None:
            return 0.0
        now = self._clock() if now is None else now
        return max(0.0, since + float(actor.cfg.min_residency_s) - now)

    def draining_for(self, name: str) -> str | None:
        """The service that `name` is being drained for (the fairness rule), once its gate
        admits no new request."""
        return self._draining.get(name) if name in self._yielding else None

    def room(self, want: ServiceActor) -> RoomPlan:
        """Whether `want` fits on its GPUs, and what to stop or drain first: the pure
        `policy.room.plan_room` over a snapshot of the services and GPUs."""
        return R.plan_room(*self.room_snapshot(want))

    def room_snapshot(self, want: ServiceActor) -> tuple[R.Want, list[R.Holder]]:
        """What `plan_room` decides on, read once: the wanted GPUs (their size and the memory
        they report used) and the services holding memory on them."""
        used = self._used(want)
        gpus = tuple(R.Gpu(g.uuid, g.index, g.memory_total_bytes, used.get(g.uuid))
                     for g in want.plan.gpus)
        wanted = {g.uuid for g in want.plan.gpus}
        now = self._clock()
        holders = []
        registered = set(map(id, self.sup.actors.values()))
        for a in self._holding():
            if a is want or not any(g.uuid in wanted for g in a.plan.gpus):
                continue
            gate = self.sup.gate_of(a.name)
            waiting = self.wants.waiting.get(a.name, 0)
            busy = gate is not None and bool(gate.active or gate.inflight or waiting)
            holders.append(R.Holder(
                name=a.name, need=self.need(a), on_demand=a.cfg.on_demand,
                exclusive=a.cfg.exclusive, state=a.state.value,
                going=(a.state is State.STOPPING and not a.up) or a.name in self._draining
                or a.name in self._evicting,
                pinned=a.name in self.pinned or a.name in self._pinning,
                registered=id(a) in registered, busy=busy, acting=id(a) in self._acting,
                resident_left=self.resident_left(a, now) if a.cfg.on_demand else 0.0,
                last_used=gate.last_active if gate is not None else 0.0,
                loaded_at=self._ready_at.get(a.name, 0.0),
                # what waits in the gate (to load it, or while it is drained) is not in flight
                in_flight=max(0, gate.active - waiting) if gate is not None else 0,
                draining_for=self._draining.get(a.name),
                min_residency_s=a.cfg.min_residency_s))
        return R.Want(want.name, gpus, self.need(want), want.cfg.exclusive), holders

    # --- stopping ------------------------------------------------------------------------------

    async def _retire(self, name: str, drain: bool = False) -> bool:
        gate = self.sup.gate_of(name)
        if gate is None:
            return True
        return await gate.retire(drain)

    async def _drain_out(self, name: str, for_whom: str) -> None:
        """The fairness rule: `name` (busy, loaded at least its min_residency_s ago) makes
        room for `for_whom`, which waits. Its gate admits no new request (they wait and ask
        for it again once it is stopped); once the requests inside have their answers it is
        retired and stopped (nothing is cut). Called off, the waiting requests served, if
        nobody waits for the room any more or it stops being a candidate."""
        actor = self.sup.actors.get(name)
        gate = self.sup.gate_of(name)
        if actor is None or id(actor) in self._acting or gate is None:
            self._draining.pop(name, None)
            return
        self._acting.add(id(actor))
        retired = False
        try:
            log.info("%s: draining to make room for %s (new requests for it wait; stopped "
                     "once the %d in flight are answered)", name, for_whom,
                     gate.active - gate.cold_waiting)
            mine = f"{name} is making room for {for_whom}: stopped once its requests in " \
                "flight are answered; it loads again when there is room"
            await self._set_message(gate, mine)
            while self.sup.actors.get(name) is actor and actor.state is State.READY \
                    and self.wanted(for_whom) and name not in self.pinned \
                    and not self.resident_left(actor) \
                    and "idle" not in actor.holds and self.sup.gate_of(name) is gate:
                if await self._retire(name, drain=True):
                    retired = True
                    break
                self._yielding.add(name)
                await asyncio.sleep(DRAIN_POLL_S)
            if not retired:
                log.info("%s: drain for %s called off (%s)", name, for_whom,
                         "no longer waiting" if not self.wanted(for_whom) else
                         "pinned" if name in self.pinned else
                         "kept by min_residency_s" if self.resident_left(actor) else
                         "it changed")
                if self.sup.gates is not None:
                    await self.sup.gates.run(gate.set_yielding, False)
                await self._set_message(gate, None, mine)
                return
            log.info("%s: stopping to make room for %s (drained)", name, for_whom)
            self.stats_of(name).swaps += 1
            try:
                await self.host.command([name], L.Stop("idle"), internal=True)
            except ControlError as exc:
                log.warning("%s: could not be stopped to make room for %s: %s", name, for_whom,
                            exc.message)
                await self._set_unloading(name, False)
            await self._set_message(gate, None, mine)  # stopped: said what it had to
        finally:
            self._draining.pop(name, None)
            self._yielding.discard(name)
            self._acting.discard(id(actor))
            self.poke()

    async def _set_message(self, gate: Any, message: str | None,
                           replacing: str | None = None) -> None:
        """The gate's cold message, why it cannot be loaded now (`replacing`: only if it is
        still that one); no call to the gate loop when it says that already."""
        if gate is None or self.sup.gates is None or gate.cold_message == message:
            return

        def put() -> None:
            if replacing is None or gate.cold_message == replacing:
                gate.set_cold_message(message)

        await self.sup.gates.run(put)

    async def _evict(self, name: str, for_whom: str) -> None:
        try:
            await self._stop_idle(name, f"to make room for {for_whom}", swap=True)
        finally:
            self._evicting.discard(name)

    async def _stop_idle(self, name: str, why: str, swap: bool) -> None:
        actor = self.sup.actors.get(name)
        if actor is None or id(actor) in self._acting:
            return
        self._acting.add(id(actor))
        try:
            if actor.state is not State.READY:
                return
            if not await self._retire(name):
                return  # a request came in meanwhile: not idle after all
            log.info("%s: stopping %s", name, why)
            st = self.stats_of(name)
            if swap:
                st.swaps += 1
            else:
                st.idle_stops += 1
            try:
                await self.host.command([name], L.Stop("idle"), internal=True)
            except ControlError as exc:
                log.warning("%s: could not be stopped %s: %s", name, why, exc.message)
                await self._set_unloading(name, False)
        finally:
            self._acting.discard(id(actor))
            self.poke()

    async def _set_unloading(self, name: str, value: bool) -> None:
        gate = self.sup.gate_of(name)
        if gate is not None and self.sup.gates is not None:
            await self.sup.gates.run(gate.set_unloading, value)

    async def _unretire(self) -> None:
        """A retired gate opens again once its service has stopped (it is `idle` then: a
        request starts it again) or did not stop after all."""
        for name, actor in self.sup.actors.items():
            gate = self.sup.gate_of(name)
            if gate is not None and gate.unloading and id(actor) not in self._acting and (
                    actor.state in (State.STOPPED, State.FAILED, State.BACKOFF)
                    or "idle" not in actor.holds):
                await self._set_unloading(name, False)

    async def _idle_stops(self, now: float) -> None:
        for name, actor in self.sup.actors.items():
            limit = actor.cfg.idle_stop_s
            if limit is None or name in self.pinned or actor.state is not State.READY \
                    or "idle" in actor.holds or self._busy_op(name) or not self._idle(actor):
                continue
            gate = self.sup.gate_of(name)
            if gate is not None and time.monotonic() - gate.last_active >= limit:
                self._spawn(self._stop_idle(name, f"after {limit:g} s without a request",
                                            swap=False))

    async def _to_idle(self, actor: ServiceActor) -> None:
        """Back to "on demand": held `idle` and wanted up (it loads on the next request)."""
        self._acting.add(id(actor))
        try:
            if self.sup.actors.get(actor.name) is actor:
                await self.host.command([actor.name], L.Stop("idle"), internal=True)
                await self.host.command([actor.name], L.Start(), internal=True)
        except ControlError:
            pass
        finally:
            self._acting.discard(id(actor))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _tree(pid: int) -> set[int]:
    import psutil

    try:
        proc = psutil.Process(pid)
        return {pid, *(c.pid for c in proc.children(recursive=True))}
    except psutil.Error:
        return {pid}


def _process_table(backend: Any, gpu: Any) -> dict[int, int] | None:
    fn = getattr(backend, "process_memory", None)
    if fn is None:
        return None
    result: dict[int, int] | None = fn(gpu)
    return result
