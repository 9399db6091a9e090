"""The service's decisions, as a table: (model, event) -> (state, transitions, actions)."""

from __future__ import annotations

import signal
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisord_llm import lifecycle as L
from supervisord_llm.policy.backoff import Budget
from supervisord_llm.states import RestartReason, State, can_transition

R = L.Rules(name="svc", failures=2, startup_timeout_s=60, stop_timeout_s=5,
            backoff_initial_s=1, backoff_max_s=8, max_restarts=3, window_s=100)
NOW = 1000.0


def model(state: State, **kw: Any) -> L.Model:
    base: dict[str, Any] = {"state": state, "wanted": True, "gen": 1}
    if state in (State.STARTING, State.READY, State.DRAINING, State.STOPPING):
        base.update(running=True, launched_at=NOW - 10)
    base.update(kw)
    return L.Model(**base)


def kinds(d: L.Decision) -> list[str]:
    return [type(a).__name__ for a in d.actions if not isinstance(a, L.Transition)]


def states(d: L.Decision) -> list[State]:
    return [a.new for a in d.actions if isinstance(a, L.Transition)]


TERM, KILL, CONT = int(signal.SIGTERM), int(signal.SIGKILL), int(signal.SIGCONT)

# (name, model, event, rules, final state, transitions, action kinds (in order, transitions
#  left out), extra check on the model)
CASES: list[tuple[str, L.Model, L.Event, L.Rules, State, list[State], list[str]]] = [
    ("start a stopped service", L.Model(), L.Start(), R,
     State.STARTING, [State.STARTING], ["CancelTimer", "Launch"]),
    ("start held by cooling: stays down", L.Model(holds=frozenset({"cooling"})), L.Start(), R,
     State.STOPPED, [], []),
    ("start releases the operator's hold", L.Model(holds=frozenset({"operator"})), L.Start(),
     R, State.STARTING, [State.STARTING], ["CancelTimer", "Launch"]),
    ("start during backoff launches now", model(State.BACKOFF), L.Start(), R,
     State.STARTING, [State.STARTING], ["CancelTimer", "Launch"]),
    ("start while ready: nothing", model(State.READY), L.Start(), R, State.READY, [], []),
    ("launched, with a health check", model(State.STARTING), L.Launched(1), R,
     State.STARTING, [], ["SetTimer", "StartHealth"]),
    ("launched, no health check: ready", model(State.STARTING), L.Launched(1),
     replace(R, health=False), State.READY, [State.READY], ["SetTimer"]),
    ("launch failed: backoff", model(State.STARTING), L.Launched(1, "no such file"), R,
     State.BACKOFF, [State.BACKOFF], ["Note", "CountRestart", "SetTimer"]),
    ("launch refused (no container runtime): failed, no retry", model(State.STARTING),
     L.Launched(1, "container runtime not found: 'podman'", refused=True), R,
     State.FAILED, [State.FAILED], ["Note"]),
    ("a refusal of the runtime while starting: failed once the group is gone",
     model(State.STARTING, exited=True, exit_code=125, last_exit="exit 125",
           fail_after="podman refused to run the container: Error: x: image not known"),
     L.Reaped(1), R, State.FAILED, [State.FAILED], ["Finish", "CancelTimer"]),
    ("a launch of an older generation is ignored", model(State.STARTING, gen=2),
     L.Launched(1, "x"), R, State.STARTING, [], []),
    ("health ok while starting: ready", model(State.STARTING),
     L.Probed(1, True, False, False, "HTTP 200"), R, State.READY, [State.READY], ["SetTimer"]),
    ("503 while starting: still loading", model(State.STARTING),
     L.Probed(1, False, True, False, "HTTP 503"), R, State.STARTING, [], []),
    ("one failure of two: counted", model(State.READY),
     L.Probed(1, False, False, False, "HTTP 500"), R, State.READY, [], ["HealthFailed"]),
    ("second failure: stop for a restart", model(State.READY, failures=1),
     L.Probed(1, False, False, True, "timeout"), R, State.STOPPING, [State.STOPPING],
     ["HealthFailed", "StopHealth", "SetTimer", "SignalGroup", "SignalGroup"]),
    ("a probe of an old launch is ignored", model(State.READY, gen=3),
     L.Probed(2, False, False, False, "x"), R, State.READY, [], []),
    ("operator stop of a ready service", model(State.READY), L.Stop("operator"), R,
     State.STOPPING, [State.STOPPING],
     ["StopHealth", "SetTimer", "SignalGroup", "SignalGroup"]),
    ("stop during backoff", model(State.BACKOFF), L.Stop("operator"), R,
     State.STOPPED, [State.STOPPED], ["CancelTimer"]),
    ("stop of a failed service", model(State.FAILED), L.Stop(), R,
     State.STOPPED, [State.STOPPED], ["CancelTimer"]),
    ("exit while ready, group empty: reap first", model(State.READY),
     L.Exited(1, 1, False), R, State.READY, [], ["StopHealth", "Reap"]),
    ("exit leaving children: stop them", model(State.READY), L.Exited(1, -9, True), R,
     State.STOPPING, [State.STOPPING],
     ["StopHealth", "StopHealth", "SetTimer", "SignalGroup", "SignalGroup", "Reap"]),
    ("reaped after an exit 1: backoff", model(State.READY, exited=True, exit_code=1,
                                               last_exit="exit 1"), L.Reaped(1), R,
     State.BACKOFF, [State.BACKOFF], ["Finish", "CancelTimer", "Note", "CountRestart",
                                      "SetTimer"]),
    ("reaped after exit 0 under on-failure: stopped, not wanted",
     model(State.READY, exited=True, exit_code=0), L.Reaped(1), R,
     State.STOPPED, [State.STOPPED], ["Finish", "CancelTimer", "Note"]),
    ("reaped under policy never, exit 1: failed",
     model(State.READY, exited=True, exit_code=1), L.Reaped(1), replace(R, policy="never"),
     State.FAILED, [State.FAILED], ["Finish", "CancelTimer", "Note"]),
    ("reaped with escapees of ours: stop them first",
     model(State.READY, exited=True, exit_code=1), L.Reaped(1, new_ours=2), R,
     State.STOPPING, [State.STOPPING],
     ["StopHealth", "SetTimer", "SignalGroup", "SignalGroup", "SignalEscapees",
      "SignalEscapees", "Reap"]),
    ("reaped after an operator stop: stopped",
     model(State.STOPPING, exited=True, holds=frozenset({"operator"})), L.Reaped(1), R,
     State.STOPPED, [State.STOPPED], ["Finish", "CancelTimer"]),
    ("reaped after a manual restart: relaunched at once",
     model(State.STOPPING, exited=True, pending=RestartReason.MANUAL), L.Reaped(1), R,
     State.STARTING, [State.STOPPED, State.STARTING],
     ["Finish", "CancelTimer", "CountRestart", "CancelTimer", "Launch"]),
    ("reaped after a thermal restart: relaunched at once",
     model(State.STOPPING, exited=True, pending=RestartReason.THERMAL), L.Reaped(1), R,
     State.STARTING, [State.STOPPED, State.STARTING],
     ["Finish", "CancelTimer", "CountRestart", "CancelTimer", "Launch"]),
    ("reaped after a health stop: backoff",
     model(State.STOPPING, exited=True, pending=RestartReason.HEALTH, last_exit="exit 143"),
     L.Reaped(1), R, State.BACKOFF, [State.BACKOFF],
     ["Finish", "CancelTimer", "CountRestart", "SetTimer"]),
    ("budget spent: failed",
     model(State.READY, exited=True, exit_code=1,
           budget=Budget((NOW - 3, NOW - 2, NOW - 1), 3)), L.Reaped(1), R,
     State.FAILED, [State.FAILED], ["Finish", "CancelTimer", "Note"]),
    ("backoff elapsed: launch", model(State.BACKOFF), L.TimerFired("backoff"), R,
     State.STARTING, [State.STARTING], ["CancelTimer", "Launch"]),
    ("startup timeout: stop for a restart", model(State.STARTING), L.TimerFired("startup"), R,
     State.STOPPING, [State.STOPPING],
     ["StopHealth", "SetTimer", "SignalGroup", "SignalGroup"]),
    ("stop deadline: SIGKILL", model(State.STOPPING), L.TimerFired("stop_deadline"), R,
     State.STOPPING, [], ["Note", "SignalGroup", "SignalEscapees"]),
    ("restart of a ready service", model(State.READY), L.Restart(), R,
     State.STOPPING, [State.STOPPING],
     ["StopHealth", "SetTimer", "SignalGroup", "SignalGroup"]),
    ("restart of a failed service: budget reset, launch", model(State.FAILED, wanted=False),
     L.Restart(), R, State.STARTING, [State.STARTING], ["CancelTimer", "Launch"]),
    ("thermal restart of a held service: nothing", model(State.STOPPED,
                                                         holds=frozenset({"cooling"})),
     L.Restart(RestartReason.THERMAL), R, State.STOPPED, [], []),
    ("reset of a failed service", model(State.FAILED, wanted=False), L.Reset(), R,
     State.STARTING, [State.STARTING], ["CancelTimer", "Launch"]),
    ("reset of a failed, held service: stopped",
     model(State.FAILED, wanted=False, holds=frozenset({"gpu_lost"})), L.Reset(), R,
     State.STOPPED, [State.STOPPED], []),
    ("hold while ready: stop", model(State.READY), L.Stop("gpu_lost"), R,
     State.STOPPING, [State.STOPPING],
     ["StopHealth", "SetTimer", "SignalGroup", "SignalGroup"]),
    ("last hold released: start", model(State.STOPPED, holds=frozenset({"operator"})),
     L.Release("operator"), R, State.STARTING, [State.STARTING], ["CancelTimer", "Launch"]),
    ("one of two holds released: still down",
     model(State.STOPPED, holds=frozenset({"cooling", "powered_down"})),
     L.Release("cooling"), R, State.STOPPED, [], []),
    ("start during an operator's stop: launched once it is over",
     model(State.STOPPING, holds=frozenset({"operator"})), L.Start(), R, State.STOPPING, [], []),
    ("the stop is over, a start came meanwhile: relaunch",
     model(State.STOPPING, exited=True, exit_code=-9, then_start=True), L.Reaped(1), R,
     State.STARTING, [State.STOPPED, State.STARTING], ["Finish", "CancelTimer", "CancelTimer",
                                                        "Launch"]),
    ("the cooling hold released: started again, a thermal restart",
     model(State.STOPPED, holds=frozenset({"cooling"})), L.Release("cooling"), R,
     State.STARTING, [State.STARTING], ["CancelTimer", "Launch", "CountRestart"]),
    ("a hold released again soon after (no stable run since): the backoff first",
     model(State.STOPPED, holds=frozenset({"gpu_lost"}), budget=Budget((NOW - 5,), 1)),
     L.Release("gpu_lost"), R, State.BACKOFF, [State.BACKOFF], ["CountRestart", "SetTimer"]),
    ("a hold released with the restart budget spent: failed",
     model(State.STOPPED, holds=frozenset({"gpu_lost"}),
           budget=Budget((NOW - 30, NOW - 20, NOW - 10), 3)),
     L.Release("gpu_lost"), R, State.FAILED, [State.FAILED], ["CancelTimer"]),
    ("the power back after a power-down: started at once, the budget spent or not",
     model(State.STOPPED, holds=frozenset({"powered_down"}),
           budget=Budget((NOW - 30, NOW - 20, NOW - 10), 3)),
     L.Release("powered_down"), R, State.STARTING, [State.STARTING],
     ["CancelTimer", "Launch", "CountRestart"]),
    ("the operator's hold released: no restart budget spent",
     model(State.STOPPED, holds=frozenset({"operator"}),
           budget=Budget((NOW - 30, NOW - 20, NOW - 10), 3)),
     L.Release("operator"), R, State.STARTING, [State.STARTING], ["CancelTimer", "Launch"]),
    ("overheated with on_critical stop: stopped, then failed",
     model(State.READY), L.StopFailed("GPU0 at 94 C"), R, State.STOPPING, [State.STOPPING],
     ["StopHealth", "SetTimer", "SignalGroup", "SignalGroup"]),
    ("... and once it is gone", model(State.STOPPING, exited=True, fail_after="GPU0 at 94 C"),
     L.Reaped(1), R, State.FAILED, [State.FAILED], ["Finish", "CancelTimer"]),
    ("drain and resume", model(State.READY), L.Drain(), R, State.DRAINING,
     [State.DRAINING], []),
    ("kill: SIGKILL and stop", model(State.READY), L.Kill(), R, State.STOPPING,
     [State.STOPPING], ["SignalGroup", "SignalEscapees", "StopHealth", "SetTimer",
                        "SignalGroup", "SignalGroup"]),
    ("the power-down's kill of a held service while it stops: SIGKILL, still wanted",
     model(State.STOPPING, holds=frozenset({"powered_down"})), L.Kill(keep_wanted=True), R,
     State.STOPPING, [], ["SignalGroup", "SignalEscapees"]),
]


def test_the_power_downs_kill_keeps_the_service_wanted() -> None:
    m = model(State.STOPPING, holds=frozenset({"powered_down"}))
    assert L.decide(m, L.Kill(keep_wanted=True), R, NOW, 0.5).model.wanted
    assert not L.decide(m, L.Kill(), R, NOW, 0.5).model.wanted


@pytest.mark.parametrize(("name", "m", "event", "rules", "final", "trans", "acts"), CASES,
                         ids=[c[0] for c in CASES])
def test_decision_table(name: str, m: L.Model, event: L.Event, rules: L.Rules,  # noqa: PLR0917
                        final: State,
                        trans: list[State], acts: list[str]) -> None:
    d = L.decide(m, event, rules, NOW, 0.5)
    assert d.model.state is final, name
    assert states(d) == trans, name
    assert kinds(d) == acts, name


def test_a_start_during_a_stop_is_not_lost() -> None:
    m = model(State.READY)
    for ev in (L.Stop("operator"), L.Start(), L.Exited(1, -9, False), L.Reaped(1)):
        m = L.decide(m, ev, R, NOW, 0.5).model
    assert m.state is State.STARTING and m.up and m.gen == 2
    # and a stop after the start wins again
    m = model(State.READY)
    for ev in (L.Stop("operator"), L.Start(), L.Stop("operator"), L.Exited(1, 0, False),
               L.Reaped(1)):
        m = L.decide(m, ev, R, NOW, 0.5).model
    assert m.state is State.STOPPED and m.holds == {"operator"}


def test_details_of_the_decisions() -> None:
    d = L.decide(model(State.READY), L.Stop("operator"), R, NOW, 0.5)
    assert L.SignalGroup(TERM) in d.actions and L.SignalGroup(CONT) in d.actions
    assert d.model.holds == {"operator"} and d.model.wanted and not d.model.up
    # a leftover's stop after the main process exited uses SIGTERM, whatever the stop signal
    d = L.decide(model(State.READY), L.Exited(1, 1, True), replace(R, stop_signal=2), NOW, 0.5)
    assert L.SignalGroup(TERM) in d.actions
    # backoff: the delay, the budget, the reason
    m = model(State.READY, exited=True, exit_code=1, last_exit="exit 1")
    d = L.decide(m, L.Reaped(1), R, NOW, 0.0)
    assert L.SetTimer("backoff", 0.75) in d.actions and L.CountRestart(RestartReason.EXIT) \
        in d.actions
    assert d.model.budget.times == (NOW,) and d.model.backoff_until == NOW + 0.75
    # killed: SIGKILL for what escaped, at once
    m = model(State.STOPPING, exited=True, killing=True)
    d = L.decide(m, L.Reaped(1, new_ours=1), R, NOW, 0.5)
    assert L.SignalEscapees(KILL, only_new=True) in d.actions
    # failed: the reason says how to get out of it
    m = model(State.READY, exited=True, exit_code=1, last_exit="exit 1",
              budget=Budget((NOW,) * 3, 3))
    d = L.decide(m, L.Reaped(1), R, NOW, 0.5)
    assert d.model.failed_reason == "3 restarts within 100 s; last: exit 1"
    assert "`llmctl reset svc`" in d.actions[-1].why  # type: ignore[union-attr]


EVENTS = st.one_of(
    st.just(L.Start()), st.sampled_from([L.Stop(), L.Stop("operator"), L.Stop("cooling")]),
    st.sampled_from([L.Release("operator"), L.Release("cooling"), L.StopFailed("hot")]),
    st.sampled_from([L.Restart(r) for r in RestartReason]), st.just(L.Reset()),
    st.just(L.Drain()), st.just(L.Resume()), st.just(L.Kill()),
    st.builds(L.Launched, st.integers(0, 4), st.sampled_from([None, "boom"])),
    st.builds(L.Exited, st.integers(0, 4), st.integers(-15, 3), st.booleans()),
    st.builds(L.Reaped, st.integers(0, 4), st.integers(0, 2)),
    st.builds(L.Probed, st.integers(0, 4), st.booleans(), st.booleans(), st.booleans(),
              st.just("x")),
    st.builds(L.TimerFired, st.sampled_from(["startup", "stop_deadline", "backoff", "stable"])),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(EVENTS, max_size=40), st.sampled_from(["always", "on-failure", "never"]),
       st.booleans())
def test_any_sequence_keeps_the_invariants(events: list[L.Event], policy: str,
                                           health: bool) -> None:
    """Whatever arrives in whatever order: only legal transitions, a running process only in
    the states that may have one, and a launch only when the service is meant to run."""
    rules = replace(R, policy=policy, health=health)
    m = L.Model()
    now = NOW
    for ev in events:
        now += 1.0
        d = L.decide(m, ev, rules, now, 0.5)
        for a in d.actions:
            if isinstance(a, L.Transition):
                assert can_transition(a.old, a.new)
            if isinstance(a, L.Launch):
                assert d.model.up
        m = d.model
        if m.state in (State.STOPPED, State.BACKOFF, State.FAILED):
            assert not m.running, (ev, m)


def test_a_runtime_refusal_while_starting_fails_and_once_ready_is_an_exit() -> None:
    why = "podman refused to run the container: Error: localhost/x:1: image not known"
    d = L.decide(model(State.STARTING), L.Exited(1, 125, False, why), R, NOW, 0.5)
    assert d.model.fail_after == why and "Reap" in kinds(d)
    d = L.decide(d.model, L.Reaped(1), R, NOW, 0.5)
    assert d.model.state is State.FAILED and d.model.failed_reason == why
    assert d.model.budget.streak == 0  # no restart was counted: not a crash loop
    # once ready, the same exit is the engine's: the restart policy decides
    d = L.decide(model(State.READY), L.Exited(1, 125, False, why), R, NOW, 0.5)
    assert d.model.fail_after is None
    d = L.decide(d.model, L.Reaped(1), R, NOW, 0.5)
    assert d.model.state is State.BACKOFF
