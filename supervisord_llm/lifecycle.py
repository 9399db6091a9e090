"""A service's decisions, as a pure function: `decide(model, event, rules, now, rand)` returns
the next model, the state transitions it went through and the actions to take. No asyncio, no
processes, no I/O: the service actor (`service.py`) executes the actions and feeds back what
happened as events. Tested as a table (tests/test_lifecycle.py).

A service is *wanted* up or down, and may be *held* down by one or more reasons at once
(`operator`, `gpu_lost`, `cooling`, `powered_down`): it runs when it is wanted and nothing
holds it; it starts when the last hold is released.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field, replace
from typing import Final

from .policy.backoff import Budget
from .states import RestartReason, State, can_transition

HOLDS: Final = ("operator", "gpu_lost", "cooling", "powered_down")
# a hold released that starts the service again counts as a restart for this reason
HOLD_REASONS: Final = {"cooling": RestartReason.THERMAL, "gpu_lost": RestartReason.GPU_LOST,
                       "powered_down": RestartReason.POWER}
# restarts that someone asked for: the service comes back at once, without backoff
COMMANDED: Final = frozenset({RestartReason.MANUAL, RestartReason.THERMAL,
                              RestartReason.GPU_LOST, RestartReason.POWER})
LIVE: Final = frozenset({State.STARTING, State.READY, State.DRAINING})


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


# --- what the decisions depend on ----------------------------------------------------------


@dataclass(frozen=True)
class Rules:
    """The parts of a service's configuration that its decisions read."""

    name: str
    policy: str = "on-failure"  # always | on-failure | never
    health: bool = True  # an HTTP health check decides "ready" (else: ready once launched)
    failures: int = 3
    startup_timeout_s: float = 900.0
    stop_signal: int = int(signal.SIGTERM)
    stop_timeout_s: float = 30.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0
    max_restarts: int = 10
    window_s: float = 600.0


@dataclass(frozen=True)
class Model:
    state: State = State.STOPPED
    wanted: bool = False
    holds: frozenset[str] = frozenset()
    gen: int = 0  # the current launch
    running: bool = False  # a process of the current launch may be alive
    exited: bool = False  # its main process has exited
    exit_code: int = 0
    killing: bool = False  # past the stop deadline, or a fast stop: SIGKILL what is found
    pending: RestartReason | None = None  # why the current stop happens
    then_start: bool = False  # a start came during the stop: launch once it is over
    fail_after: str | None = None  # this stop ends in `failed` with this reason (overheated)
    failures: int = 0  # consecutive failed health checks
    launched_at: float | None = None
    backoff_until: float | None = None
    last_exit: str | None = None
    failed_reason: str | None = None
    budget: Budget = field(default_factory=Budget)

    @property
    def up(self) -> bool:
        return self.wanted and not self.holds


# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Want it up (llmctl start, the config); releases the operator's hold."""


@dataclass(frozen=True)
class Stop:
    """Hold it down for `hold`; without a hold: want it down (shutdown, removal)."""

    hold: str | None = None


@dataclass(frozen=True)
class Release:
    hold: str


@dataclass(frozen=True)
class StopFailed:
    """Stop it and leave it `failed` with `why` until `llmctl reset` (a GPU that overheated
    with `on_critical = "stop"`)."""

    why: str


@dataclass(frozen=True)
class Restart:
    reason: RestartReason = RestartReason.MANUAL


@dataclass(frozen=True)
class Reset:
    pass


@dataclass(frozen=True)
class Drain:
    """Its gate closed to new requests (any drain reason)."""


@dataclass(frozen=True)
class Resume:
    pass


@dataclass(frozen=True)
class Kill:
    """Fast stop: SIGKILL now, then settle as a stop. Without `keep_wanted` (the daemon's
    fast stop) it is no longer wanted up; with it (the power-down's deadline, the service
    held `powered_down`) it comes back when its holds are released."""

    keep_wanted: bool = False


@dataclass(frozen=True)
class Launched:
    gen: int
    error: str | None = None  # the launch failed
    refused: bool = False  # ... and trying again cannot help until someone acts: failed


@dataclass(frozen=True)
class Adopted:
    """A running instance an earlier daemon launched (kept by its keeper) is this service's
    launch `gen` now: wanted up, as it runs (an on-demand model's `idle` hold goes: it is
    loaded); starting until its first health check confirms it."""

    gen: int


@dataclass(frozen=True)
class Exited:
    gen: int
    code: int
    group_alive: bool  # the main process left children in its group
    # the container runtime refused to run it (its words): while starting, the start fails
    # (the same command would be refused again)
    refused: str | None = None


@dataclass(frozen=True)
class Reaped:
    """The group of the exited main process is empty; `new_ours` processes proven ours that
    escaped it were found and not yet signalled."""

    gen: int
    new_ours: int = 0


@dataclass(frozen=True)
class Probed:
    gen: int
    ok: bool
    not_yet: bool  # loading / refused / timeout: "still starting" during start-up
    timeout: bool
    detail: str


@dataclass(frozen=True)
class TimerFired:
    kind: str  # startup | stop_deadline | backoff | stable


Event = (Start | Stop | Release | StopFailed | Restart | Reset | Drain | Resume | Kill
         | Launched | Adopted | Exited | Reaped | Probed | TimerFired)


# --- actions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transition:
    old: State
    new: State
    why: str


@dataclass(frozen=True)
class Launch:
    gen: int


@dataclass(frozen=True)
class SignalGroup:
    sig: int


@dataclass(frozen=True)
class SignalEscapees:
    sig: int
    only_new: bool = False


@dataclass(frozen=True)
class StartHealth:
    gen: int


@dataclass(frozen=True)
class StopHealth:
    pass


@dataclass(frozen=True)
class SetTimer:
    kind: str
    delay_s: float


@dataclass(frozen=True)
class CancelTimer:
    pass


@dataclass(frozen=True)
class Reap:
    gen: int


@dataclass(frozen=True)
class Finish:
    """The launch is over (main process, group and escapees gone): release it."""


@dataclass(frozen=True)
class CountRestart:
    reason: RestartReason


@dataclass(frozen=True)
class HealthFailed:
    count: int
    of: int
    detail: str


@dataclass(frozen=True)
class Note:
    """A line for the log (warning) that is not a transition."""

    text: str


Action = (Transition | Launch | SignalGroup | SignalEscapees | StartHealth | StopHealth
          | SetTimer | CancelTimer | Reap | Finish | CountRestart | HealthFailed | Note)


@dataclass(frozen=True)
class Decision:
    model: Model
    actions: tuple[Action, ...]


class IllegalTransition(Exception):
    pass


# --- the function ---------------------------------------------------------------------------


class _Step:
    """Accumulates one decision: the model as it changes, and the actions in order."""

    def __init__(self, model: Model, rules: Rules, now: float, rand: float) -> None:
        self.m = model
        self.r = rules
        self.now = now
        self.rand = rand
        self.actions: list[Action] = []

    def set(self, **changes: object) -> None:
        self.m = replace(self.m, **changes)  # type: ignore[arg-type]

    def go(self, new: State, why: str) -> None:
        old = self.m.state
        if not can_transition(old, new):
            raise IllegalTransition(f"{self.r.name}: {old} -> {new} ({why})")
        self.set(state=new)
        self.actions.append(Transition(old, new, why))

    def do(self, *actions: Action) -> None:
        self.actions.extend(actions)

    # --- the steps the events share ---

    def launch(self, why: str) -> None:
        gen = self.m.gen + 1
        self.set(gen=gen, running=True, exited=False, killing=False, failures=0, pending=None,
                 then_start=False, fail_after=None, backoff_until=None, failed_reason=None,
                 launched_at=self.now)
        self.go(State.STARTING, why)
        self.do(CancelTimer(), Launch(gen))

    def ready(self, why: str) -> None:
        self.go(State.READY, why)
        self.do(SetTimer("stable", self.m.budget.stable_s(self.r.window_s)))

    def begin_stop(self, why: str) -> None:
        self.do(StopHealth())
        self.go(State.STOPPING, why)
        self.do(SetTimer("stop_deadline", self.r.stop_timeout_s))
        if self.m.running:
            self.do(SignalGroup(signal.SIGTERM if self.m.exited else self.r.stop_signal),
                    SignalGroup(signal.SIGCONT))  # a stopped process cannot act on it

    def fail(self, why: str) -> None:
        self.set(failed_reason=why, wanted=False)
        self.go(State.FAILED, f"{why}; `llmctl reset {self.r.name}` to start again")

    def exit_reason(self, code: int) -> RestartReason | None:
        """Why the service is going down when its process exits by itself."""
        if self.r.policy == "always" or (self.r.policy == "on-failure" and code != 0):
            return RestartReason.EXIT
        return None

    def after_exit(self, reason: RestartReason) -> None:
        """Backoff or failed, after an unplanned end."""
        if self.r.policy == "never":
            self.fail(f"{self.m.last_exit}; restart policy is never")
            return
        r, b = self.r, self.m.budget
        if b.exhausted(self.now, r.max_restarts, r.window_s):
            self.fail(f"{r.max_restarts} restarts within {r.window_s:g} s; "
                      f"last: {self.m.last_exit}")
            return
        ran_s = None if self.m.launched_at is None else self.now - self.m.launched_at
        budget, delay = b.next_delay(self.now, ran_s, self.rand, r.backoff_initial_s,
                                     r.backoff_max_s, r.window_s)
        self.set(budget=budget, backoff_until=self.now + delay)
        self.do(CountRestart(reason))
        self.go(State.BACKOFF, f"{reason.value}: {self.m.last_exit}; restart in {delay:.2f} s")
        self.do(SetTimer("backoff", delay))

    def finish(self) -> None:
        """The main process, its group and what escaped it are gone."""
        code = self.m.exit_code
        desc = describe_exit(code)
        self.set(running=False)
        self.do(Finish(), CancelTimer())
        reason: RestartReason | None
        if self.m.state is State.STOPPING:
            if self.m.fail_after is not None:
                self.fail(self.m.fail_after)
                return
            if not self.m.up:
                self.go(State.STOPPED, f"process {desc}")
                return
            pending = self.m.pending
            if pending in COMMANDED:
                assert pending is not None
                self.do(CountRestart(pending))
                self.go(State.STOPPED, f"process {desc}; restarting ({pending.value})")
                self.launch(f"restart ({pending.value})")
                return
            if self.m.then_start:
                self.go(State.STOPPED, f"process {desc}")
                self.launch("start requested during the stop")
                return
            reason = pending  # a stop for a cause, or what an exit left behind (its policy)
        elif self.m.fail_after is not None:  # refused by its container runtime
            self.fail(self.m.fail_after)
            return
        else:
            reason = self.exit_reason(code)  # it ended by itself while starting or ready
            self.do(Note(f"process {desc}"))
        if reason is None:
            if self.r.policy == "never" and code != 0:
                self.fail(f"{desc}; restart policy is never")
            else:
                self.set(wanted=False)
                self.go(State.STOPPED, f"{desc}; restart policy {self.r.policy}")
            return
        self.after_exit(reason)

    def bring_up(self, why: str) -> None:
        """Launch if it is meant to run and nothing is running or scheduled."""
        if not self.m.up:
            return
        s = self.m.state
        if s is State.FAILED:
            self.set(budget=self.m.budget.reset())
        if s in (State.STOPPED, State.FAILED, State.BACKOFF):
            self.launch(why if s is not State.BACKOFF else f"{why} during backoff")
        elif s is State.STOPPING:
            self.set(then_start=True)  # once this stop is over

    def come_back(self, hold: str, reason: RestartReason) -> None:
        """The last hold that kept it down (cooling, a lost GPU) is released: that is a
        restart, and it spends the restart budget like a crash. The first comes back at once;
        one that keeps coming back (a GPU that drops off the bus every few seconds) waits the
        backoff, and after `max_restarts` within `window_s` it is failed."""
        r, b = self.r, self.m.budget
        if b.exhausted(self.now, r.max_restarts, r.window_s):
            self.do(CancelTimer())
            self.fail(f"{r.max_restarts} restarts within {r.window_s:g} s; last: {hold} hold "
                      "released")
            return
        first = b.streak == 0
        budget, delay = b.next_delay(self.now, None, self.rand, r.backoff_initial_s,
                                     r.backoff_max_s, r.window_s)
        self.set(budget=budget)
        if first or delay <= 0:
            self.launch(f"{hold} hold released")
            self.do(CountRestart(reason))
            return
        self.set(backoff_until=self.now + delay)
        self.do(CountRestart(reason))
        self.go(State.BACKOFF, f"{hold} hold released; {reason.value} restart in {delay:.2f} s")
        self.do(SetTimer("backoff", delay))

    def bring_down(self, why: str) -> None:
        s = self.m.state
        if s in LIVE:
            self.set(pending=None, then_start=False)
            self.begin_stop(why)
        elif s is State.STOPPING:
            self.set(pending=None, then_start=False)  # nothing starts after this stop
        elif s in (State.BACKOFF, State.FAILED):
            self.do(CancelTimer())
            self.go(State.STOPPED, why)


def decide(model: Model, event: Event, rules: Rules, now: float, rand: float) -> Decision:
    """The next model and the actions, for one event. `now` is monotonic seconds; `rand` a
    number in [0, 1) for the backoff's jitter."""
    st = _Step(model, rules, now, rand)
    m = model
    if isinstance(event, Start):
        st.set(wanted=True, holds=m.holds - {"operator"})
        st.bring_up("start")
    elif isinstance(event, Stop):
        if event.hold is None:
            st.set(wanted=False)
            why = "stop requested"
        else:
            st.set(holds=m.holds | {event.hold})
            why = "stop requested" if event.hold == "operator" else f"held: {event.hold}"
        st.bring_down(why)
    elif isinstance(event, Release):
        if event.hold in m.holds:
            st.set(holds=m.holds - {event.hold})
            reason = HOLD_REASONS.get(event.hold)
            if event.hold == "powered_down" and m.state is State.STOPPED and st.m.up:
                # the power is back: not a fault of the service, and the power policy paces
                # it (a grace on battery before each power-down); no budget spent, no backoff
                st.launch("powered_down hold released")
                st.do(CountRestart(RestartReason.POWER))
            elif reason is not None and m.state is State.STOPPED and st.m.up:
                st.come_back(event.hold, reason)
            elif m.state in (State.STOPPED, State.STOPPING):
                st.bring_up(f"{event.hold} hold released")
                if reason is not None and st.m.state is State.STARTING:
                    st.do(CountRestart(reason))
    elif isinstance(event, StopFailed):
        if m.state in LIVE or m.state is State.STOPPING:
            st.set(fail_after=event.why)
            st.bring_down(f"stopping: {event.why}")
        elif m.state is State.BACKOFF:  # about to start again on that GPU: it does not
            st.do(CancelTimer())
            st.fail(event.why)
    elif isinstance(event, Restart):
        if event.reason is RestartReason.MANUAL:
            st.set(wanted=True, holds=m.holds - {"operator"})
        if not st.m.up:
            pass
        elif m.state in LIVE:
            st.set(pending=event.reason)
            st.begin_stop(f"restart requested ({event.reason.value})")
        elif m.state is State.STOPPING:
            st.set(pending=event.reason)
        else:
            st.bring_up(f"restart requested ({event.reason.value})")
    elif isinstance(event, Reset):
        st.set(budget=m.budget.reset(), failed_reason=None)
        if m.state is State.FAILED:
            st.set(wanted=True, holds=m.holds - {"operator"})
            if st.m.up:
                st.launch("reset")
            else:
                st.go(State.STOPPED, "reset (held: " + ", ".join(sorted(st.m.holds)) + ")")
    elif isinstance(event, Drain):
        if m.state is State.READY:
            st.go(State.DRAINING, "gate draining")
    elif isinstance(event, Resume):
        if m.state is State.DRAINING:
            st.go(State.READY, "gate reopened")
    elif isinstance(event, Kill):
        st.set(killing=True)
        if not event.keep_wanted:
            st.set(wanted=False)
        if m.running:
            st.do(SignalGroup(signal.SIGKILL), SignalEscapees(signal.SIGKILL))
        st.bring_down("killed (fast stop)")
    elif isinstance(event, Launched):
        if event.gen == m.gen and m.state is State.STARTING:
            _launched(st, event)
    elif isinstance(event, Adopted):
        if m.state is State.STOPPED and not m.running:
            st.set(wanted=True, holds=m.holds - {"idle", "operator"}, gen=event.gen,
                   running=True, exited=False, killing=False, failures=0, pending=None,
                   then_start=False, fail_after=None, backoff_until=None, failed_reason=None,
                   launched_at=now)
            st.go(State.STARTING, "adopted: it kept running while no supervisor was there")
            _launched(st, Launched(event.gen))
    elif isinstance(event, Exited):
        if event.gen == m.gen and m.running and not m.exited:
            _exited(st, event)
    elif isinstance(event, Reaped):
        if event.gen == m.gen and m.running and m.exited:
            _reaped(st, event)
    elif isinstance(event, Probed):
        if event.gen == m.gen and not m.exited and m.state in LIVE:
            _probed(st, event)
    elif isinstance(event, TimerFired):
        _timer(st, event.kind)
    return Decision(st.m, tuple(st.actions))


def _launched(st: _Step, ev: Launched) -> None:
    if ev.error is not None:
        st.set(running=False, last_exit=f"launch failed: {ev.error}")
        st.do(Note(f"launch failed: {ev.error}"))
        if ev.refused:
            st.fail(f"launch failed: {ev.error}")
        else:
            st.after_exit(RestartReason.EXIT)
        return
    if st.r.health:
        st.do(SetTimer("startup", st.r.startup_timeout_s), StartHealth(st.m.gen))
    else:
        st.ready("launched (no health check)")


def _exited(st: _Step, ev: Exited) -> None:
    desc = describe_exit(ev.code)
    st.set(exited=True, exit_code=ev.code, last_exit=desc)
    st.do(StopHealth())
    if ev.refused is not None and st.m.state is State.STARTING:
        st.set(fail_after=ev.refused, last_exit=f"{desc}: {ev.refused}")
    if st.m.state is not State.STOPPING:
        st.set(pending=st.exit_reason(ev.code))
        if ev.group_alive:  # it left children behind: stop them before anything else
            st.begin_stop(f"main process {desc}; stopping what it left behind")
    st.do(Reap(st.m.gen))


def _reaped(st: _Step, ev: Reaped) -> None:
    if ev.new_ours:
        if st.m.state is not State.STOPPING:
            st.begin_stop(f"main process {st.m.last_exit}; {ev.new_ours} process(es) "
                          "escaped its group")
        st.do(SignalEscapees(signal.SIGKILL if st.m.killing else signal.SIGTERM, only_new=True),
              SignalEscapees(signal.SIGCONT), Reap(st.m.gen))
        return
    st.finish()


def _probed(st: _Step, ev: Probed) -> None:
    if ev.ok:
        st.set(failures=0)
        if st.m.state is State.STARTING:
            st.ready(f"health {ev.detail}")
        return
    if st.m.state is State.STARTING and ev.not_yet:
        return  # still loading
    n = st.m.failures + 1
    st.set(failures=n)
    st.do(HealthFailed(n, st.r.failures, ev.detail))
    if n >= st.r.failures:
        hung = " (hung?)" if ev.timeout else ""
        st.set(pending=RestartReason.HEALTH)
        st.begin_stop(f"{n} health failures{hung}: {ev.detail}")


def _timer(st: _Step, kind: str) -> None:
    m = st.m
    if kind == "backoff" and m.state is State.BACKOFF:
        if m.up:
            st.launch("backoff elapsed")
        else:
            st.go(State.STOPPED, "not wanted up any more")
    elif kind == "startup" and m.state is State.STARTING and not m.exited:
        st.set(pending=RestartReason.HEALTH)
        st.begin_stop(f"not ready within startup_timeout_s ({st.r.startup_timeout_s:g} s)")
    elif kind == "stop_deadline" and m.state is State.STOPPING and m.running:
        st.set(killing=True)
        st.do(Note(f"still running {st.r.stop_timeout_s:g} s after the stop signal: SIGKILL"),
              SignalGroup(signal.SIGKILL), SignalEscapees(signal.SIGKILL))
    elif kind == "stable" and m.state is State.READY:
        st.set(budget=m.budget.mark_stable())
