"""GPU protection per service (`policy.protect.service_step`), pure: a table, then properties
over random views (hypothesis): one step brings any service in line."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisord_llm.policy.protect import (
    NOTHING,
    GpuView,
    ServiceView,
    Step,
    factor_of,
    service_step,
)
from supervisord_llm.states import State

OK0, OK1 = GpuView("G0", 0), GpuView("G1", 1)
HOT0, HOT1 = GpuView("G0", 0, critical=True), GpuView("G1", 1, critical=True)
LOST0 = GpuView("G0", 0, lost=True)
ESC0, ESC1 = replace(HOT0, escalated=True), replace(HOT1, escalated=True)


def svc(*gpus: GpuView, state: State = State.READY, holds: frozenset[str] = frozenset(),
        gated: bool = True, paused: bool = False, factor: float | None = 1.0) -> ServiceView:
    return ServiceView("chat", state, holds, gpus, gated=gated, paused=paused,
                       factor=factor if gated else None)


CASES = [
    ("all well", svc(OK0, OK1), "pause", NOTHING),
    ("a GPU lost: held down", svc(LOST0, OK1), "pause", Step(hold_lost=True)),
    ("held for it already", svc(LOST0, holds=frozenset({"gpu_lost"})), "pause", NOTHING),
    ("back: released", svc(OK0, holds=frozenset({"gpu_lost"})), "pause",
     Step(release_lost=True)),
    ("critical, gated and running: paused", svc(OK0, HOT1), "pause",
     Step(critical="pause", critical_gpu=HOT1)),
    ("paused already", svc(HOT0, paused=True), "pause", NOTHING),
    ("paused, and the pause did not cool it (escalated): drained and held down",
     svc(ESC0, paused=True), "pause", Step(critical="drain-restart", critical_gpu=ESC0)),
    ("escalated, held cooling already", svc(ESC0, state=State.STOPPED, paused=True,
                                             holds=frozenset({"cooling"})), "pause", NOTHING),
    ("escalated while still running unpaused: no pause first, held down",
     svc(OK0, ESC1), "pause", Step(critical="drain-restart", critical_gpu=ESC1)),
    ("escalated changes nothing for stop", svc(ESC0), "stop",
     Step(critical="stop", critical_gpu=ESC0)),
    ("a pause of a service that is not running: held down instead",
     svc(HOT0, state=State.STOPPED), "pause", Step(critical="drain-restart",
                                                   critical_gpu=HOT0)),
    ("a pause without a gate: held down", svc(HOT0, gated=False), "pause",
     Step(critical="drain-restart", critical_gpu=HOT0)),
    ("drain-restart", svc(HOT0), "drain-restart",
     Step(critical="drain-restart", critical_gpu=HOT0)),
    ("held cooling already", svc(HOT0, state=State.STOPPED, holds=frozenset({"cooling"})),
     "drain-restart", NOTHING),
    ("stop while live", svc(HOT0, state=State.STARTING), "stop",
     Step(critical="stop", critical_gpu=HOT0)),
    ("stop in backoff", svc(HOT0, state=State.BACKOFF), "stop",
     Step(critical="stop", critical_gpu=HOT0)),
    ("stopped (failed) already", svc(HOT0, state=State.FAILED), "stop", NOTHING),
    ("stop, not running (an unloaded on-demand model): held down, not failed",
     svc(HOT0, state=State.STOPPED, holds=frozenset({"idle"})), "stop",
     Step(critical="drain-restart", critical_gpu=HOT0)),
    ("stop, held for a lost GPU and the other critical: held cooling, not started",
     svc(LOST0, HOT1, state=State.STOPPED, holds=frozenset({"gpu_lost"})), "stop",
     Step(critical="drain-restart", critical_gpu=HOT1)),
    ("while a GPU is lost its heat is unknown: nothing lifted",
     svc(LOST0, state=State.STOPPED, holds=frozenset({"gpu_lost", "cooling"}), paused=True),
     "pause", NOTHING),
    ("on_critical none", svc(HOT0), "none", NOTHING),
    ("cooled: released and reopened",
     svc(OK0, state=State.STOPPED, holds=frozenset({"cooling"}), paused=True), "pause",
     Step(release_cooling=True, reopen=True)),
    ("a lost GPU is not hot (its reading is gone)", svc(replace(LOST0, critical=True)),
     "pause", Step(hold_lost=True)),
    ("lost and the other critical: held for both (not to start hot when it is back)",
     svc(LOST0, HOT1), "pause", Step(hold_lost=True, critical="drain-restart",
                                     critical_gpu=HOT1)),
    ("while one is still critical, nothing reopens",
     svc(HOT0, state=State.STOPPED, holds=frozenset({"cooling"}), paused=True), "pause",
     NOTHING),
    ("admission: the lowest of its GPUs'",
     svc(replace(OK0, factor=0.7), replace(OK1, factor=0.5)), "pause", Step(factor=0.5)),
    ("admission: a lost GPU's factor does not count",
     svc(replace(LOST0, factor=0.2), holds=frozenset({"gpu_lost"}), factor=0.2), "pause",
     Step(factor=1.0)),
    ("no gate: no admission", svc(replace(OK0, factor=0.5), gated=False), "pause", NOTHING),
]


@pytest.mark.parametrize(("what", "view", "on_critical", "step"), CASES,
                         ids=[c[0] for c in CASES])
def test_service_step(what: str, view: ServiceView, on_critical: str, step: Step) -> None:
    assert service_step(view, on_critical) == step, what
    assert bool(service_step(view, on_critical)) == (step != NOTHING)


def test_factor_of() -> None:
    assert factor_of(()) == 1.0
    assert factor_of((replace(OK0, factor=0.8), replace(LOST0, factor=0.1))) == 0.8


# --- properties ----------------------------------------------------------------------------


def apply(view: ServiceView, step: Step) -> ServiceView:
    """What the guard's execution of `step` does to the service (through the host)."""
    holds, state, paused, factor = set(view.holds), view.state, view.paused, view.factor
    if step.hold_lost:
        holds.add("gpu_lost")
        state = State.STOPPED if state is not State.FAILED else state
    if step.release_lost:
        holds.discard("gpu_lost")
    if step.critical == "pause":
        paused = True
    elif step.critical == "drain-restart":
        holds.add("cooling")
        state = State.STOPPED if state is not State.FAILED else state
    elif step.critical == "stop":
        state = State.FAILED
    if step.release_cooling:
        holds.discard("cooling")
    if step.reopen:
        paused = False
    if step.factor is not None:
        factor = step.factor
    return replace(view, holds=frozenset(holds), state=state, paused=paused, factor=factor)


gpu_st = st.builds(GpuView, st.sampled_from(["G0", "G1", "G2"]), st.integers(0, 2),
                   lost=st.booleans(), critical=st.booleans(), escalated=st.booleans(),
                   factor=st.sampled_from([1.0, 0.9, 0.5]))


@st.composite
def view_st(draw: st.DrawFn) -> ServiceView:
    gpus = draw(st.lists(gpu_st, min_size=0, max_size=3, unique_by=lambda g: g.uuid))
    gated = draw(st.booleans())
    return ServiceView("svc", draw(st.sampled_from(list(State))),
                       frozenset(draw(st.sets(st.sampled_from(
                           ["gpu_lost", "cooling", "operator", "idle", "powered_down"])))),
                       tuple(gpus), gated=gated, paused=gated and draw(st.booleans()),
                       factor=draw(st.sampled_from([1.0, 0.5, 0.9])) if gated else None)


@settings(max_examples=500, deadline=None)
@given(view=view_st(), on_critical=st.sampled_from(["pause", "drain-restart", "stop", "none"]))
def test_one_step_brings_it_in_line(view: ServiceView, on_critical: str) -> None:
    step = service_step(view, on_critical)
    assert not (step.hold_lost and step.release_lost)
    assert not (step.critical and (step.release_cooling or step.reopen))
    assert (step.critical is None) == (step.critical_gpu is None)
    after = apply(view, step)
    assert service_step(after, on_critical) == NOTHING, (step, after)
    # what it decides follows from what is: a lost GPU means held, none means not
    assert ("gpu_lost" in after.holds) == any(g.lost for g in view.gpus)
    if not any(g.critical or g.lost for g in view.gpus):
        assert "cooling" not in after.holds and not after.paused
    about_to_start = on_critical == "stop" and view.state in (State.STOPPED, State.STOPPING) \
        and not view.holds and not any(g.lost for g in view.gpus)  # failed once it runs
    if any(g.critical and not g.lost for g in view.gpus) and on_critical != "none" \
            and not about_to_start:
        # never left to run (or start) on a critical GPU: paused, held or failed
        assert after.paused or "cooling" in after.holds or after.state is State.FAILED
    if on_critical in ("pause", "drain-restart") \
            and any(g.critical and g.escalated and not g.lost for g in view.gpus):
        # a pause that did not cool it: held down, not merely paused
        assert "cooling" in after.holds
    if after.gated:
        assert after.factor == factor_of(view.gpus)
