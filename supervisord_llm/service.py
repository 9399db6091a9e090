"""The service actor: one task owns a service's lifecycle.

Everything that happens to a service (a command, the process exiting, a health result, a
timer) arrives as an event on its queue. The decisions are made by `lifecycle.decide`, a pure
function; this actor only executes the actions it returns (launch, signal, probe, timers) and
feeds back what they produced. Only the actor changes its fields: the supervisor and the host
send events (`Reconfigure`, `Kill`, holds, restarts with a reason), never attribute writes.

Every launch has a generation number; events of an earlier generation are dropped, so a late
exit or probe of a replaced process can never act on its successor.

A service is gone when its main process has exited, its process group is empty, and the
processes that escaped the group carrying its launch marker are gone too (they are stopped with
it); escaped processes not proven ours are reported (log, `escaped` in the status) and left
alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from . import lifecycle as L
from .containers import RUNTIME_EXITS, refusal
from .errors import SpawnError
from .health import ProbeKind, ProbeResult
from .keep import digest
from .plan import ServicePlan
from .ports import port_free
from .procs import Escapee
from .spawn import KeptProcess, LaunchSpec, Spawner
from .states import RUNNING, RestartReason, State
from .ticks import sleep_to_tick

log = logging.getLogger(__name__)

_GROUP_POLL_S = 0.02  # only while a stopped service's leftovers are being reaped
_STARTUP_PROBE_MAX_S = 0.5
describe_exit = L.describe_exit


class Prober(Protocol):
    async def probe(self, url: str, timeout_s: float) -> ProbeResult: ...


# --- events of the actor (beyond the lifecycle's) --------------------------------------------


@dataclass
class Reconfigure:
    """A new plan that changes nothing the running process depends on (a gate-only change)."""

    plan: ServicePlan


@dataclass
class _Found:
    """What a /proc scan found after the group emptied (posted by the reap task)."""

    gen: int
    found: list[Escapee]


@dataclass
class _Timer:
    token: int
    kind: str


@dataclass
class _Adopt:
    proc: KeptProcess
    gen: int
    reply: asyncio.Future[int]


@dataclass
class _Command:
    event: L.Event | Reconfigure
    reply: asyncio.Future[int] | None


@dataclass
class HealthStatus:
    ok: bool | None = None
    last_error: str | None = None
    checked_at: float | None = None


@dataclass
class Waiter:
    predicate: Callable[[ServiceActor], bool]
    future: asyncio.Future[State]


@dataclass
class Counters:
    restarts: dict[str, int] = field(default_factory=dict)
    health_failures: int = 0

    def restart(self, reason: RestartReason) -> None:
        self.restarts[reason.value] = self.restarts.get(reason.value, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.restarts.values())


COMMANDS: dict[str, Callable[[], L.Event]] = {
    "start": L.Start,
    "stop": lambda: L.Stop("operator"),
    "restart": L.Restart,
    "reset": L.Reset,
    "drain": L.Drain,
    "resume": L.Resume,
}


def rules_of(plan: ServicePlan) -> L.Rules:
    c = plan.config
    return L.Rules(
        name=c.name, policy=c.restart.policy, health=plan.health_url() is not None,
        failures=c.health.failures,
        # a pull (pull = "missing") is part of the start, bounded on its own
        startup_timeout_s=c.health.startup_timeout_s + (
            c.container.pull_timeout_s if c.container is not None
            and c.container.pull == "missing" else 0.0),
        stop_signal=c.stop.signal, stop_timeout_s=c.stop.timeout_s,
        backoff_initial_s=c.restart.backoff_initial_s, backoff_max_s=c.restart.backoff_max_s,
        max_restarts=c.restart.max_restarts, window_s=c.restart.window_s,
    )


def launch_spec(plan: ServicePlan, gen: int, port: int | None,
                base_env: Mapping[str, str]) -> LaunchSpec:
    """What launching the service on `port` runs; its digest names the launch (the same for
    two daemons with the same service configuration, whatever their own environment)."""
    argv, cpus = plan.argv(port), plan.cpus
    mem = plan.numa_node if plan.bind_memory else None
    run = plan.container_run(port)
    if run is not None:  # the pinning is the container's flags; the runtime runs unpinned
        argv, cpus, mem = run.argv(plan.config.name, f"{plan.config.name}-XXXXXXXX", ""), None, None
    return LaunchSpec(
        service=plan.config.name, argv=argv, env=plan.environment(base_env, port), cpus=cpus,
        mem_node=mem, user=plan.config.user, gen=gen, port=port,
        stop_timeout_s=plan.config.stop.timeout_s,
        digest=digest(argv if run is None else (json.dumps(run.key()),),
                      plan.environment({}, port), cpus, mem, plan.config.user),
        container=run)


class ServiceActor:
    def __init__(
        self,
        plan: ServicePlan,
        spawner: Spawner,
        prober: Prober,
        *,
        port: int | None = None,
        counters: Counters | None = None,
        wanted: bool = False,
        holds: frozenset[str] = frozenset(),
        base_env: Mapping[str, str] | None = None,
        on_change: Callable[[ServiceActor], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.plan = plan
        self.name = plan.config.name
        self.port = plan.config.port if port is None else port
        self.counters = counters or Counters()
        self._rules = rules_of(plan)
        self._spawner = spawner
        self._prober = prober
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._on_change = on_change or (lambda actor: None)
        self._clock = clock
        self._rng = rng or random.Random()
        self.model = L.Model(wanted=wanted, holds=holds)
        self.proc: KeptProcess | None = None
        self.adopted = False  # the current launch is one an earlier daemon made
        self.health = HealthStatus()
        self.start_duration_s: float | None = None
        self._events: asyncio.Queue[_Command | _Adopt | _Found | _Timer | L.Event] = \
            asyncio.Queue()
        self._waiters: list[Waiter] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_token = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._health_task: asyncio.Task[None] | None = None
        self._escaped: dict[int, Escapee] = {}  # not proven ours: reported, left alone
        self._task: asyncio.Task[None] | None = None

    # --- what others read --------------------------------------------------------------------

    @property
    def cfg(self) -> Any:
        return self.plan.config

    @property
    def state(self) -> State:
        return self.model.state

    @property
    def gen(self) -> int:
        return self.model.gen

    @property
    def up(self) -> bool:
        return self.model.up

    @property
    def holds(self) -> frozenset[str]:
        return self.model.holds

    @property
    def failed_reason(self) -> str | None:
        return self.model.failed_reason if self.state is State.FAILED else None

    @property
    def last_exit(self) -> str | None:
        return self.model.last_exit

    @property
    def restart_count(self) -> int:
        return self.counters.total

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    # --- public API (used by the supervisor and the host; safe from any task) -------------------

    def run(self) -> asyncio.Task[None]:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"svc-{self.name}")
        self._task.add_done_callback(self._ended)
        return self._task

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A bug: say so now. The watchdog stops being petted and systemd restarts us.
            log.critical("%s: service actor crashed", self.name, exc_info=task.exception())

    async def send(self, event: L.Event | Reconfigure) -> int:
        """Queue an event; returns the generation current once the actor has handled it."""
        return await self.queue(event)

    def queue(self, event: L.Event | Reconfigure) -> asyncio.Future[int]:
        """Queue an event; the future resolves with the generation current once the actor
        has handled it."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._events.put_nowait(_Command(event, fut))
        return fut

    async def command(self, kind: str) -> int:
        """An operator's command by name (start, stop, restart, reset, drain, resume)."""
        return await self.send(COMMANDS[kind]())

    def preset(self, *, wanted: bool, holds: frozenset[str]) -> None:
        """Before `run()`: what it starts with (the operator's hold kept across a restart of
        the daemon: wanted up, held `operator`, as `llmctl stop` leaves it)."""
        if self.alive:
            raise RuntimeError(f"{self.name}: preset after the actor started")
        self.model = replace(self.model, wanted=wanted, holds=holds)

    def adopt(self, proc: KeptProcess, gen: int) -> asyncio.Future[int]:
        """Take over a running instance an earlier daemon launched (before `run()`'s first
        start, instead of launching): it is this service's launch `gen` from now on."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._events.put_nowait(_Adopt(proc, gen, fut))
        return fut

    def post(self, event: L.Event) -> None:
        self._events.put_nowait(event)

    def kill_now(self, keep_wanted: bool = False) -> None:
        """Fast stop: SIGKILL at once (second SIGTERM to the daemon; with `keep_wanted`, the
        power-down's deadline: it starts again once its holds are released); the actor then
        settles in `stopped` through the ordinary stop path."""
        self._events.put_nowait(L.Kill(keep_wanted))

    async def wait_for(self, predicate: Callable[[ServiceActor], bool],
                       timeout_s: float | None) -> State:
        if predicate(self):
            return self.state
        fut: asyncio.Future[State] = asyncio.get_running_loop().create_future()
        waiter = Waiter(predicate, fut)
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                return await fut
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    async def wait_settled(self, after_gen: int, timeout_s: float | None) -> State:
        """Until the service is ready (or draining: ready behind a gate closed for some
        reason) with a launch newer than `after_gen`, failed, or stopped while not meant to
        run."""

        def settled(a: ServiceActor) -> bool:
            return ((a.state in (State.READY, State.DRAINING) and a.gen > after_gen)
                    or a.state is State.FAILED or (a.state is State.STOPPED and not a.up))

        return await self.wait_for(settled, timeout_s)

    async def wait_stopped(self, timeout_s: float | None) -> State:
        return await self.wait_for(
            lambda a: a.state in (State.STOPPED, State.FAILED) and a.proc is None, timeout_s)

    def status(self, now: float | None = None) -> dict[str, Any]:
        now = self._clock() if now is None else now
        h, m = self.health, self.model
        return {
            "name": self.name,
            "state": m.state.value,
            "pid": self.proc.pid if self.proc is not None and not m.exited else None,
            "gpus": [g.uuid for g in self.plan.gpus],
            "numa_node": self.plan.numa_node,
            "cpus": list(self.plan.cpus) if self.plan.cpus else None,
            "port": self.port,
            "health": {
                "ok": h.ok,
                "last_error": h.last_error,
                "checked_s_ago": None if h.checked_at is None else round(now - h.checked_at, 3),
            },
            "restarts": self.restart_count,
            "last_exit": m.last_exit,
            "uptime_s": (round(now - m.launched_at, 3)
                         if m.launched_at is not None and m.state in RUNNING else None),
            "inflight": 0,
            "gate": "none",
            "throttled": False,  # the GPU guard says (status.service_status)
            "holds": sorted(m.holds),
            "desired": "up" if m.up else "down",
            "backoff_s": (round(max(0.0, m.backoff_until - now), 3)
                          if m.state is State.BACKOFF and m.backoff_until is not None else None),
            "failed_reason": self.failed_reason,
            "escaped": sorted(pid for pid, e in self._all_escaped() if e.alive()),
            "adopted": self.adopted and self.proc is not None,
            # kept by a keeper of another protocol (a release apart): it can only be stopped
            "outdated": self.proc is not None and self.proc.outdated,
        }

    def _all_escaped(self) -> list[tuple[int, Escapee]]:
        ours = list(self.proc.escapees.items()) if self.proc is not None else []
        return [*self._escaped.items(), *ours]

    async def shutdown(self) -> None:
        """Stop the actor task (after the service has been stopped)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # --- the actor loop -------------------------------------------------------------------------

    async def _loop(self) -> None:
        try:
            while True:
                item = await self._events.get()
                if isinstance(item, _Command):
                    if isinstance(item.event, Reconfigure):
                        self._reconfigure(item.event.plan)
                    else:
                        await self._step(item.event)
                    if item.reply is not None and not item.reply.done():
                        item.reply.set_result(self.model.gen)
                elif isinstance(item, _Timer):
                    if item.token == self._timer_token:
                        self._timer = None
                        await self._step(L.TimerFired(item.kind))
                elif isinstance(item, _Found):
                    await self._found(item)
                elif isinstance(item, _Adopt):
                    await self._adopt(item)
                else:
                    await self._step(item)
        finally:
            self._cancel_timer()
            for task in list(self._tasks):
                task.cancel()
            for esc in self._escaped.values():
                esc.close()

    async def _step(self, event: L.Event) -> None:
        if isinstance(event, L.Probed) and event.gen == self.model.gen:
            self._record_probe(event)
        decision = L.decide(self.model, event, self._rules, self._clock(), self._rng.random())
        held = self.model.holds != decision.model.holds or \
            self.model.wanted != decision.model.wanted
        self.model = decision.model
        if held and not any(isinstance(a, L.Transition) for a in decision.actions):
            self._on_change(self)  # holds shown in status and to the gates (why closed)
        follow: list[L.Event] = []
        for action in decision.actions:
            ev = await self._execute(action)
            if ev is not None:
                follow.append(ev)
        for ev in follow:  # what an action produced at once (a launch's outcome)
            await self._step(ev)

    async def _execute(self, action: L.Action) -> L.Event | None:
        if isinstance(action, L.Transition):
            self._transitioned(action)
        elif isinstance(action, L.Launch):
            return await self._launch(action.gen)
        elif isinstance(action, L.SignalGroup):
            if self.proc is not None:
                self.proc.signal_group(action.sig)
        elif isinstance(action, L.SignalEscapees):
            if self.proc is not None:
                self.proc.signal_escapees(action.sig, only_new=action.only_new)
        elif isinstance(action, L.StartHealth):
            url = self.plan.health_url(self.port)
            if url is not None:
                self._stop_health()
                self._health_task = self._spawn_task(self._health_loop(action.gen, url),
                                                     "health")
        elif isinstance(action, L.StopHealth):
            self._stop_health()
        elif isinstance(action, L.SetTimer):
            self._set_timer(action.delay_s, action.kind)
        elif isinstance(action, L.CancelTimer):
            self._cancel_timer()
        elif isinstance(action, L.Reap):
            if self.proc is not None:
                self._spawn_task(self._reap(action.gen, self.proc), "reap")
        elif isinstance(action, L.Finish):
            if self.proc is not None:
                # its keeper stays for the relaunch that follows (a fork there), or goes
                self.proc.release(keep=self.model.state in (State.STARTING, State.BACKOFF))
            self.proc = None
            self.adopted = False
            self.health = HealthStatus()
        elif isinstance(action, L.CountRestart):
            self.counters.restart(action.reason)
        elif isinstance(action, L.HealthFailed):
            self.counters.health_failures += 1
            log.warning("%s: health check failed (%d/%d): %s", self.name, action.count,
                        action.of, action.detail)
        elif isinstance(action, L.Note):
            log.warning("%s: %s", self.name, action.text)
        return None

    def _transitioned(self, t: L.Transition) -> None:
        if t.new is State.READY and t.old is State.STARTING and self.model.launched_at:
            self.start_duration_s = self._clock() - self.model.launched_at
        if t.new in (State.STOPPED, State.FAILED) and self.proc is None:
            self._spawner.retire(self.name)  # no relaunch soon: its idle keeper goes
        level = logging.WARNING if t.new in (State.BACKOFF, State.FAILED) else logging.INFO
        log.log(level, "%s: %s -> %s (%s)", self.name, t.old, t.new, t.why)
        self._on_change(self)
        for waiter in list(self._waiters):
            if not waiter.future.done() and waiter.predicate(self):
                waiter.future.set_result(t.new)

    def _reconfigure(self, plan: ServicePlan) -> None:
        self.plan = plan
        self._rules = rules_of(plan)
        self._on_change(self)

    # --- executing ---------------------------------------------------------------------------

    async def _launch(self, gen: int) -> L.Event:
        self._prune_escaped()
        self.health = HealthStatus()
        if self.port is not None and not port_free(self.port):
            # a server that cannot bind would pass its health check against the stranger
            return L.Launched(gen, f"port {self.port} is in use by another process")
        spec = self.launch_spec(gen)
        try:
            proc = await self._spawner.launch(spec)
        except SpawnError as exc:
            self.proc = None
            return L.Launched(gen, str(exc), refused=exc.refused)
        except OSError as exc:  # out of descriptors, or memory: a failed launch, not a bug
            self.proc = None
            return L.Launched(gen, f"cannot launch: {exc.strerror or exc}")
        self.proc = proc
        log.info("%s: launched pid %d%s", self.name, proc.pid,
                 f" on {','.join(f'GPU{g.index}' for g in self.plan.gpus)}"
                 if self.plan.gpus else "")
        self._spawn_task(self._watch(gen, proc), "watch")
        return L.Launched(gen)

    def launch_spec(self, gen: int, port: int | None = None) -> LaunchSpec:
        return launch_spec(self.plan, gen, self.port if port is None else port,
                           self._base_env)

    async def _adopt(self, item: _Adopt) -> None:
        self.proc = item.proc
        self.adopted = True
        self.health = HealthStatus()
        self._spawn_task(self._watch(item.gen, item.proc), "watch")
        log.info("%s: adopted pid %d (launch %d, port %s), running since an earlier "
                 "supervisor", self.name, item.proc.pid, item.gen, self.port)
        await self._step(L.Adopted(item.gen))
        if not item.reply.done():
            item.reply.set_result(self.model.gen)

    async def _watch(self, gen: int, proc: KeptProcess) -> None:
        code = await proc.wait()  # the exit itself, even while escaped processes hold the pipe
        refused = None
        c = self.plan.config.container
        if c is not None and code in RUNTIME_EXITS:
            refused = refusal(c.runtime, code, proc.tail)
        self.post(L.Exited(gen, code, proc.group_alive(), refused))

    async def _health_loop(self, gen: int, url: str) -> None:
        """A probe at every multiple of the interval (during start-up: of
        min(interval_s, 0.5 s)) on the loop's clock: probes start `interval_s` apart, and
        every service with the same interval is probed in the same pass of the loop."""
        h = self.plan.config.health
        while True:
            starting = self.model.state is State.STARTING
            await sleep_to_tick(min(h.interval_s, _STARTUP_PROBE_MAX_S) if starting
                                else h.interval_s)
            r = await self._prober.probe(url, h.timeout_s)
            self.post(L.Probed(gen, r.ok, r.not_yet, r.kind is ProbeKind.TIMEOUT, r.detail))

    def _record_probe(self, ev: L.Probed) -> None:
        self.health = HealthStatus(ok=ev.ok, last_error=None if ev.ok else ev.detail,
                                   checked_at=self._clock())

    def _stop_health(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            self._health_task = None

    async def _reap(self, gen: int, proc: KeptProcess) -> None:
        """Once the main process has exited: until its group is empty and the escaped processes
        being stopped are gone, then look (off the loop) for processes that escaped it."""
        while proc.group_alive() or proc.escapees_alive():  # noqa: ASYNC110 - no event for it
            await asyncio.sleep(_GROUP_POLL_S)
        self._events.put_nowait(_Found(gen, await proc.find_escaped()))

    async def _found(self, item: _Found) -> None:
        """Report what escaped the group; the lifecycle decides about the ones proven ours."""
        current = item.gen == self.model.gen and self.proc is not None
        new_ours = 0
        for esc in item.found:
            if esc.ours:
                if current and not esc.signalled:
                    new_ours += 1
                    log.warning("%s: process %d (%s) escaped its process group; stopping it",
                                self.name, esc.pid, esc.cmd)
                continue
            known = self._escaped.get(esc.pid)
            if not current or (known is not None and known.alive()):
                esc.close()
                continue
            if known is not None:
                known.close()
            self._escaped[esc.pid] = esc
            log.warning("%s: process %d (%s) escaped its process group and holds its output; "
                        "not proven ours (no launch marker): left running, output closed",
                        self.name, esc.pid, esc.cmd)
        await self._step(L.Reaped(item.gen, new_ours))

    def _prune_escaped(self) -> None:
        for pid, esc in list(self._escaped.items()):
            if not esc.alive():
                esc.close()
                del self._escaped[pid]

    def _set_timer(self, delay: float, kind: str) -> None:
        self._cancel_timer()
        token = self._timer_token
        self._timer = asyncio.get_running_loop().call_later(
            max(0.0, delay), self._events.put_nowait, _Timer(token, kind))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_token += 1

    def _spawn_task(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.name}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


__all__ = ["COMMANDS", "Counters", "HealthStatus", "Prober", "Reconfigure", "ServiceActor",
           "describe_exit"]
