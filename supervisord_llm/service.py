"""The service actor: one task owns a service's lifecycle.

Everything that happens to a service (a command from llmctl, the process exiting, a health
result, a timer) arrives as an event on its queue; only `_handle()` changes the state, and only
through `_transition()`, which checks the table in `states.py`, logs `old -> new (reason)`,
tells the supervisor and wakes the waiters of every settled state, failure paths included.

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
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import ControlError, SpawnError
from .health import ProbeKind, ProbeResult
from .plan import ServicePlan
from .policy.backoff import RestartTracker
from .spawn import Escapee, LaunchSpec, ServiceProcess, Spawner
from .states import RUNNING, RestartReason, State, can_transition

log = logging.getLogger(__name__)

_GROUP_POLL_S = 0.02  # only while a stopped service's leftovers are being reaped
_STARTUP_PROBE_MAX_S = 0.5


class Prober(Protocol):
    async def probe(self, url: str, timeout_s: float) -> ProbeResult: ...


# --- events ----------------------------------------------------------------------------------


@dataclass
class Command:
    kind: str  # start | stop | restart | reset | drain | resume
    reply: asyncio.Future[int] | None = None  # resolves with the generation after handling


@dataclass
class Exited:
    gen: int
    returncode: int


@dataclass
class Reaped:
    """The group of an exited main process is empty; `found` escaped it (a scan of /proc)."""

    gen: int
    found: list[Escapee]


@dataclass
class Probed:
    gen: int
    result: ProbeResult


@dataclass
class Timer:
    token: int
    kind: str  # startup | stop_deadline | backoff | stable


Event = Command | Exited | Reaped | Probed | Timer


@dataclass
class HealthStatus:
    ok: bool | None = None
    last_error: str | None = None
    checked_at: float | None = None


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


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


class ServiceActor:
    def __init__(
        self,
        plan: ServicePlan,
        spawner: Spawner,
        prober: Prober,
        *,
        base_env: Mapping[str, str] | None = None,
        on_change: Callable[[ServiceActor], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.plan = plan
        self.cfg = plan.config
        self.name = plan.config.name
        self._spawner = spawner
        self._prober = prober
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._on_change = on_change or (lambda actor: None)
        self._clock = clock
        r = self.cfg.restart
        self.tracker = RestartTracker(r.backoff_initial_s, r.backoff_max_s, r.max_restarts,
                                      r.window_s, rng or random.Random())
        self.state = State.STOPPED
        self.desired_up = False
        self.proc: ServiceProcess | None = None
        self.gen = 0
        self.port = self.cfg.port
        self.health = HealthStatus()
        self.counters = Counters()
        self.restart_count = 0
        self.last_exit: str | None = None
        self.launched_at: float | None = None
        self.start_duration_s: float | None = None
        self.backoff_until: float | None = None
        self.throttled = False
        self.failed_reason: str | None = None
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._waiters: list[Waiter] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_token = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._health_task: asyncio.Task[None] | None = None
        self._failures = 0
        self._exited = False  # main process of the current generation has exited
        self._exit_code = 0
        self._killing = False  # past the stop deadline (or a fast stop): SIGKILL what is found
        self._escaped: dict[int, Escapee] = {}  # reported at the service's last end
        self._pending: RestartReason | None = None  # why the current stop happens
        self._task: asyncio.Task[None] | None = None

    # --- public API (used by the supervisor; safe from any task) ------------------------------

    def run(self) -> asyncio.Task[None]:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"svc-{self.name}")
        self._task.add_done_callback(self._ended)
        return self._task

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A bug: say so now. The watchdog stops being petted and systemd restarts us.
            log.critical("%s: service actor crashed", self.name, exc_info=task.exception())

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def command(self, kind: str) -> int:
        """Queue a command; returns the generation current once the actor has handled it."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._events.put_nowait(Command(kind, fut))
        return await fut

    def post(self, event: Event) -> None:
        self._events.put_nowait(event)

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
        """Until the service is ready with a launch newer than `after_gen`, failed, or
        stopped while meant to be down."""

        def settled(a: ServiceActor) -> bool:
            return (
                (a.state is State.READY and a.gen > after_gen)
                or a.state is State.FAILED
                or (a.state is State.STOPPED and not a.desired_up)
            )

        return await self.wait_for(settled, timeout_s)

    async def wait_stopped(self, timeout_s: float | None) -> State:
        return await self.wait_for(
            lambda a: a.state in (State.STOPPED, State.FAILED) and a.proc is None, timeout_s
        )

    def kill_now(self) -> None:
        """Fast stop: SIGKILL the group at once (second SIGTERM to the daemon); the actor
        then settles in `stopped` through the ordinary stop path."""
        self.desired_up = False
        self._killing = True
        if self.proc is not None:
            self.proc.signal_group(signal.SIGKILL)
            self.proc.signal_escapees(signal.SIGKILL)
        self._events.put_nowait(Command("stop"))

    def status(self, now: float | None = None) -> dict[str, Any]:
        now = self._clock() if now is None else now
        h = self.health
        return {
            "name": self.name,
            "state": self.state.value,
            "pid": self.proc.pid if self.proc is not None and not self._exited else None,
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
            "last_exit": self.last_exit,
            "uptime_s": (
                round(now - self.launched_at, 3)
                if self.launched_at is not None and self.state in RUNNING else None
            ),
            "inflight": 0,
            "gate": "none",
            "throttled": self.throttled,
            "desired": "up" if self.desired_up else "down",
            "backoff_s": (
                round(max(0.0, self.backoff_until - now), 3)
                if self.state is State.BACKOFF and self.backoff_until is not None else None
            ),
            "failed_reason": self.failed_reason if self.state is State.FAILED else None,
            "escaped": [pid for pid, e in sorted(self._escaped.items()) if e.alive()],
        }

    # --- the actor loop ---------------------------------------------------------------------

    async def _loop(self) -> None:
        try:
            while True:
                event = await self._events.get()
                try:
                    await self._handle(event)
                except ControlError as exc:
                    if isinstance(event, Command) and event.reply and not event.reply.done():
                        event.reply.set_exception(exc)
                    continue
                if isinstance(event, Command) and event.reply and not event.reply.done():
                    event.reply.set_result(self.gen)
        finally:
            self._cancel_timer()
            for task in list(self._tasks):
                task.cancel()
            for esc in self._escaped.values():
                if esc not in (self.proc.escapees.values() if self.proc else ()):
                    esc.close()

    async def _handle(self, ev: Event) -> None:
        if isinstance(ev, Command):
            await self._on_command(ev.kind)
        elif isinstance(ev, Exited):
            if ev.gen == self.gen:
                self._on_exit(ev.returncode)
        elif isinstance(ev, Reaped):
            if ev.gen == self.gen and self.proc is not None:
                self._on_reaped(ev.found)
            else:
                for esc in ev.found:
                    if not esc.ours:
                        esc.close()
        elif isinstance(ev, Probed):
            if ev.gen == self.gen and not self._exited and self.state in (
                    State.STARTING, State.READY, State.DRAINING):
                self._on_probe(ev.result)
        elif isinstance(ev, Timer) and ev.token == self._timer_token:
            self._timer = None
            await self._on_timer(ev.kind)

    # --- transitions -------------------------------------------------------------------------

    def _transition(self, new: State, reason: str) -> None:
        old = self.state
        if not can_transition(old, new):
            raise RuntimeError(f"{self.name}: illegal transition {old} -> {new} ({reason})")
        self.state = new
        level = logging.WARNING if new in (State.BACKOFF, State.FAILED) else logging.INFO
        log.log(level, "%s: %s -> %s (%s)", self.name, old, new, reason)
        self._on_change(self)
        for waiter in list(self._waiters):
            if not waiter.future.done() and waiter.predicate(self):
                waiter.future.set_result(new)

    def _set_timer(self, delay: float, kind: str) -> None:
        self._cancel_timer()
        self._timer_token += 1
        token = self._timer_token
        self._timer = asyncio.get_running_loop().call_later(
            max(0.0, delay), self._events.put_nowait, Timer(token, kind)
        )

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

    # --- commands ----------------------------------------------------------------------------

    async def _on_command(self, kind: str) -> None:
        s = self.state
        if kind == "start":
            self.desired_up = True
            if s is State.FAILED:
                self.tracker.reset()
            if s in (State.STOPPED, State.FAILED):
                await self._launch("start")
            elif s is State.BACKOFF:
                self._cancel_timer()
                await self._launch("start during backoff")
        elif kind == "stop":
            self.desired_up = False
            if s in (State.STARTING, State.READY, State.DRAINING):
                self._begin_stop("stop requested")
            elif s in (State.BACKOFF, State.FAILED):
                self._cancel_timer()
                self._transition(State.STOPPED, "stop requested")
        elif kind == "restart":
            self.desired_up = True
            if s in (State.STARTING, State.READY, State.DRAINING):
                self._pending = RestartReason.MANUAL
                self._begin_stop("restart requested")
            elif s is State.STOPPING:
                self._pending = RestartReason.MANUAL
            else:
                if s is State.FAILED:
                    self.tracker.reset()
                self._cancel_timer()
                await self._launch("restart requested")
        elif kind == "reset":
            self.tracker.reset()
            self.failed_reason = None
            if s is State.FAILED:
                self.desired_up = True
                await self._launch("reset")
        elif kind == "drain":
            if s is State.READY:
                self._transition(State.DRAINING, "gate draining")
        elif kind == "resume":
            if s is State.DRAINING:
                self._transition(State.READY, "gate reopened")
        else:
            raise ControlError("bad_request", f"unknown service command {kind!r}")

    # --- launching ---------------------------------------------------------------------------

    async def _launch(self, reason: str) -> None:
        self.gen += 1
        gen = self.gen
        self._exited = False
        self._killing = False
        self._prune_escaped()
        self._failures = 0
        self._pending = None
        self.health = HealthStatus()
        self.backoff_until = None
        self.failed_reason = None
        self._transition(State.STARTING, reason)
        plan = self.plan
        spec = LaunchSpec(
            service=self.name,
            argv=plan.argv(self.port),
            env=plan.environment(self._base_env, self.port),
            cpus=plan.cpus,
            mem_node=plan.numa_node if plan.bind_memory else None,
            user=self.cfg.user,
        )
        self.launched_at = self._clock()
        try:
            self.proc = await self._spawner.launch(spec)
        except SpawnError as exc:
            self.proc = None
            self.last_exit = f"launch failed: {exc}"
            log.error("%s: %s", self.name, exc)
            self._after_exit(RestartReason.EXIT)
            return
        if self.gen != gen:  # pragma: no cover - the actor is single-threaded
            return
        log.info("%s: launched pid %d%s", self.name, self.proc.pid,
                 f" on {','.join(f'GPU{g.index}' for g in plan.gpus)}" if plan.gpus else "")
        proc = self.proc
        self._spawn_task(self._watch(gen, proc), "watch")
        url = plan.health_url(self.port)
        if url is None:
            self._became_ready("launched (no health check)")
        else:
            self._set_timer(self.cfg.health.startup_timeout_s, "startup")
            self._health_task = self._spawn_task(self._health_loop(gen, url), "health")

    async def _watch(self, gen: int, proc: ServiceProcess) -> None:
        code = await proc.wait()  # the exit itself, even while escaped processes hold the pipe
        self.post(Exited(gen, code))

    async def _health_loop(self, gen: int, url: str) -> None:
        h = self.cfg.health
        while True:
            starting = self.state is State.STARTING
            await asyncio.sleep(min(h.interval_s, _STARTUP_PROBE_MAX_S) if starting
                                else h.interval_s)
            result = await self._prober.probe(url, h.timeout_s)
            self.post(Probed(gen, result))

    def _stop_health(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            self._health_task = None

    def _on_probe(self, result: ProbeResult) -> None:
        self.health.checked_at = self._clock()
        if result.ok:
            self.health.ok = True
            self.health.last_error = None
            self._failures = 0
            if self.state is State.STARTING:
                self._became_ready(f"health {result.detail}")
            return
        self.health.ok = False
        self.health.last_error = result.detail
        if self.state is State.STARTING and result.not_yet:
            return  # still loading
        self._failures += 1
        self.counters.health_failures += 1
        h = self.cfg.health
        log.warning("%s: health check failed (%d/%d): %s", self.name, self._failures,
                    h.failures, result.detail)
        if self._failures >= h.failures:
            hung = " (hung?)" if result.kind is ProbeKind.TIMEOUT else ""
            self._restart_for(RestartReason.HEALTH,
                              f"{self._failures} health failures{hung}: {result.detail}")

    def _became_ready(self, reason: str) -> None:
        now = self._clock()
        if self.launched_at is not None:
            self.start_duration_s = now - self.launched_at
        self._transition(State.READY, reason)
        self._set_timer(self.tracker.stable_s, "stable")

    # --- stopping ----------------------------------------------------------------------------

    def _restart_for(self, reason: RestartReason, detail: str) -> None:
        self._pending = reason
        self._begin_stop(detail)

    def _begin_stop(self, reason: str) -> None:
        self._stop_health()
        self._transition(State.STOPPING, reason)
        self._set_timer(self.cfg.stop.timeout_s, "stop_deadline")
        proc = self.proc
        if proc is None:
            return
        if not self._exited:
            proc.signal_group(self.cfg.stop.signal)
        else:
            proc.signal_group(signal.SIGTERM)
        proc.signal_group(signal.SIGCONT)  # a stopped process cannot act on the signal

    def _on_exit(self, code: int) -> None:
        self._exited = True
        self._exit_code = code
        self._stop_health()
        desc = describe_exit(code)
        self.last_exit = desc
        proc = self.proc
        assert proc is not None
        if self.state is not State.STOPPING:
            self._pending = self._exit_reason(code)
            if proc.group_alive():
                # The main process is gone but it left children: stop them before anything else.
                log.warning("%s: main process %s; stopping what it left behind", self.name, desc)
                self._begin_stop(f"main process {desc}")
        self._spawn_task(self._reap(self.gen, proc), "reap")

    async def _reap(self, gen: int, proc: ServiceProcess) -> None:
        """Once the main process has exited: until its group is empty and the escaped processes
        being stopped are gone, then look (off the loop) for processes that escaped it."""
        while proc.group_alive() or proc.escapees_alive():  # noqa: ASYNC110 - no event for it
            await asyncio.sleep(_GROUP_POLL_S)
        self.post(Reaped(gen, await proc.find_escaped()))

    def _on_reaped(self, found: list[Escapee]) -> None:
        proc = self.proc
        assert proc is not None
        stopping: list[Escapee] = []
        for esc in found:
            known = self._escaped.get(esc.pid)
            if esc.ours:
                if not esc.signalled:
                    stopping.append(esc)
                if known is not None and known is not esc:
                    known.close()
                self._escaped[esc.pid] = esc
                continue
            if known is not None and known.alive():
                esc.close()
                continue
            if known is not None:
                known.close()
            self._escaped[esc.pid] = esc
            log.warning("%s: process %d (%s) escaped its process group and holds its output; "
                        "not proven ours (no launch marker): left running, output closed",
                        self.name, esc.pid, esc.cmd)
        if stopping:
            for esc in stopping:
                log.warning("%s: process %d (%s) escaped its process group; stopping it",
                            self.name, esc.pid, esc.cmd)
            if self.state is not State.STOPPING:
                self._begin_stop(f"main process {self.last_exit}; {len(stopping)} "
                                 f"process(es) escaped its group")
            sig = signal.SIGKILL if self._killing else signal.SIGTERM
            proc.signal_escapees(sig, only_new=True)
            proc.signal_escapees(signal.SIGCONT)
            self._spawn_task(self._reap(self.gen, proc), "reap")
            return
        self._finish(self._exit_code)

    def _prune_escaped(self) -> None:
        for pid, esc in list(self._escaped.items()):
            if not esc.alive():
                esc.close()
                del self._escaped[pid]

    def _exit_reason(self, code: int) -> RestartReason | None:
        """Why the service is going down when its process exits by itself."""
        policy = self.cfg.restart.policy
        if policy == "always" or (policy == "on-failure" and code != 0):
            return RestartReason.EXIT
        return None

    def _finish(self, code: int) -> None:
        """The main process and its whole group are gone."""
        proc = self.proc
        if proc is not None:
            proc.release()
        self.proc = None
        self._cancel_timer()
        self.health = HealthStatus()
        was = self.state
        desc = describe_exit(code)
        reason: RestartReason | None
        if was is State.STOPPING:
            if not self.desired_up:
                self._transition(State.STOPPED, f"stopped ({desc})")
                return
            if self._pending is RestartReason.MANUAL:
                self.restart_count += 1
                self.counters.restart(RestartReason.MANUAL)
                self._transition(State.STOPPED, "restarting")
                self.post(Command("start"))
                return
            # a stop for a cause, or what an exit by itself left behind (cause: its policy)
            reason = self._pending
        else:
            # The process ended by itself while starting or ready.
            reason = self._exit_reason(code)
            log.warning("%s: process %s", self.name, desc)
        if reason is None:
            if self.cfg.restart.policy == "never" and code != 0:
                self._fail(f"{desc}; restart policy is never")
            else:
                self.desired_up = False
                self._transition(State.STOPPED, f"{desc}; restart policy {self.cfg.restart.policy}")
            return
        self._after_exit(reason)

    def _after_exit(self, reason: RestartReason) -> None:
        """Decide between backoff and failed after an unplanned end."""
        now = self._clock()
        ran_s = now - self.launched_at if self.launched_at is not None else None
        if self.cfg.restart.policy == "never":
            self._fail(f"{self.last_exit}; restart policy is never")
            return
        if self.tracker.exhausted(now):
            r = self.cfg.restart
            self._fail(f"{r.max_restarts} restarts within {r.window_s:g} s; "
                       f"last: {self.last_exit}")
            return
        delay = self.tracker.next_delay(now, ran_s)
        self.restart_count += 1
        self.counters.restart(reason)
        self.backoff_until = now + delay
        self._transition(State.BACKOFF,
                         f"{reason.value}: {self.last_exit}; restart in {delay:.2f} s")
        self._set_timer(delay, "backoff")

    def _fail(self, why: str) -> None:
        self.failed_reason = why
        self.desired_up = False
        self._transition(State.FAILED, f"{why}; `llmctl reset {self.name}` to start again")

    async def _on_timer(self, kind: str) -> None:
        if kind == "backoff" and self.state is State.BACKOFF:
            await self._launch("backoff elapsed")
        elif kind == "startup" and self.state is State.STARTING and not self._exited:
            self._restart_for(RestartReason.HEALTH,
                              f"not ready within startup_timeout_s "
                              f"({self.cfg.health.startup_timeout_s:g} s)")
        elif kind == "stop_deadline" and self.state is State.STOPPING and self.proc is not None:
            log.warning("%s: still running %g s after the stop signal: SIGKILL",
                        self.name, self.cfg.stop.timeout_s)
            self._killing = True
            self.proc.signal_group(signal.SIGKILL)
            self.proc.signal_escapees(signal.SIGKILL)  # the reap task sees them go
        elif kind == "stable" and self.state is State.READY:
            self.tracker.mark_stable()

    async def shutdown(self) -> None:
        """Stop the actor task (after the service has been stopped)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
