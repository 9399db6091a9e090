"""The thermal policy, pure: levels with hysteresis, power and admission steps, the floor,
critical/escalate/cooled, stale telemetry; jitter around every threshold; and a replay of real
heat traces recorded on an H200 and an H100 (tests/fixtures/heat/)."""

from __future__ import annotations

import csv
import itertools
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from hypothesis import given, settings
from hypothesis import strategies as st

from supervisord_llm.policy import thermal as T

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "heat"
# a 300 W board (min 150 W), slowdown at 89 C: the defaults relative to it
LIM = T.Limits(warn_c=83, throttle_c=85, critical_c=88, resume_c=79, power_step=0.1,
               min_power_fraction=0.5, step_interval_s=5, pause_timeout_s=300,
               default_w=300, board_min_w=150)


def run(temps: Sequence[float | None], lim: T.Limits = LIM, dt: float = 1.0, limit_w: float = 300,
        inflight: int = 0) -> tuple[T.State, list[tuple[float, T.Action]]]:
    """Feed one reading per `dt` seconds; the board follows the limits set."""
    state = T.State()
    out: list[tuple[float, T.Action]] = []
    for i, t in enumerate(temps):
        now = i * dt
        state, actions = T.decide(state, T.Reading(t, t is not None, limit_w, inflight), lim,
                                  now)
        for a in actions:
            out.append((now, a))
            if isinstance(a, T.SetPowerLimit):
                limit_w = a.watts
    return state, out


A = TypeVar("A")


def of(kind: type[A], acts: list[tuple[float, T.Action]]) -> list[tuple[float, A]]:
    return [(t, a) for t, a in acts if isinstance(a, kind)]


def test_levels_go_up_at_once_and_down_only_below_resume() -> None:
    """Down only once below resume_c for a whole step interval (5 s): the last reading at or
    above resume_c was at 5 s (79.5 C), so `ok` comes at 10 s."""
    state, acts = run([70, 83, 84, 82, 80, 79.5, 78.9, 70, 70, 70, 70, 70])
    levels = [(t, a.new) for t, a in of(T.LevelChanged, acts)]
    assert levels == [(1, "warm"), (10, "ok")]
    assert state.level == "ok" and not of(T.SetPowerLimit, acts)


def test_throttle_steps_every_interval_down_to_the_floor_then_back() -> None:
    temps = [86.0] * 60 + [80.0] * 10 + [75.0] * 40
    state, acts = run(temps)
    limits = [(t, a.watts) for t, a in of(T.SetPowerLimit, acts)]
    down = [w for t, w in limits if t < 60]
    assert down == [270, 240, 210, 180, 150]  # 10% of 300 W every 5 s, floor 150 W
    assert [t for t, w in limits if t < 60] == [0, 5, 10, 15, 20]
    factors = [a.factor for _t, a in of(T.SetFactor, acts)]
    assert factors[:5] == [0.9, 0.8, 0.7, 0.6, 0.5]
    assert not [w for t, w in limits if 60 <= t < 70]  # between resume and throttle: hold
    up = [(t, w) for t, w in limits if t >= 70]
    assert [w for _t, w in up] == [180, 210, 240, 270, 300]
    assert all(b - a >= 5 for (a, _), (b, _) in itertools.pairwise(up))
    last = of(T.SetPowerLimit, acts)[-1][1]
    assert isinstance(last, T.SetPowerLimit) and last.restore
    assert state.steps == 0 and state.original_w is None and factors[-1] == 1.0


def test_the_floor_is_the_board_minimum_when_it_is_higher() -> None:
    lim = replace(LIM, board_min_w=240)
    _state, acts = run([90.0] * 40, lim)
    watts = [a.watts for _t, a in of(T.SetPowerLimit, acts)]
    assert watts == [270, 240]
    factors = [a.factor for _t, a in of(T.SetFactor, acts)]
    assert factors[-1] == 0.5  # the admission still steps down to its own floor


def test_a_board_without_power_control_gets_admission_steps() -> None:
    lim = replace(LIM, default_w=None, board_min_w=None)
    _state, acts = run([86.0] * 30, lim)
    assert not of(T.SetPowerLimit, acts)
    factors = [a.factor for _t, a in of(T.SetFactor, acts)]
    assert factors == [0.9, 0.8, 0.7, 0.6, 0.5]


def test_critical_pause_escalate_and_cooled() -> None:
    lim = replace(LIM, pause_timeout_s=20)
    temps = [89.0] * 40 + [70.0] * 6
    state, acts = run(temps, lim, inflight=1)
    assert [t for t, _a in of(T.Critical, acts)] == [0]
    assert not of(T.Escalate, acts)  # requests in flight: the pause is doing its job
    state, acts = run(temps, lim, inflight=0)
    assert [t for t, _a in of(T.Escalate, acts)] == [20]  # once, after pause_timeout_s
    assert [t for t, _a in of(T.Cooled, acts)] == [44]  # cool for a whole step interval
    assert state.level == "ok" and state.critical_since is None


def test_stale_readings_never_act_and_the_state_holds() -> None:
    temps: list[float | None] = [86.0] * 12 + [None] * 30 + [70.0]
    _state, acts = run(temps)
    stale = [a for t, a in acts if 12 <= t < 42]
    assert stale == [T.TelemetryLost("throttled")]  # reported once, nothing else done
    assert any(isinstance(a, T.SetPowerLimit) for t, a in acts if t == 42)  # fresh: moves


def test_a_limit_already_below_the_floor_is_never_raised() -> None:
    """An RX 9070 XT whose owner set 120 W (default 304 W, floor 152 W): throttling never
    raises the limit; only the admission steps down."""
    lim = replace(LIM, default_w=304, board_min_w=None)
    _state, acts = run([86.0] * 30 + [70.0] * 30, lim, limit_w=120)
    assert not of(T.SetPowerLimit, acts)
    assert [a.factor for _t, a in of(T.SetFactor, acts)][:5] == [0.9, 0.8, 0.7, 0.6, 0.5]


def test_initial_limit_set_by_the_operator_is_what_is_restored() -> None:
    _state, acts = run([86.0] * 6 + [70.0] * 20, limit_w=250)
    watts = [a.watts for _t, a in of(T.SetPowerLimit, acts)]
    assert watts[0] == 220 and watts[-1] == 250


def test_readings_swinging_hot_and_cold_keep_the_level_up() -> None:
    """20/100 C alternating (a broken sensor or cable): critical once, no Cooled while any
    reading in the last step interval was hot; the power only goes down."""
    _state, acts = run([20.0, 100.0] * 30, dt=0.1, lim=replace(LIM, step_interval_s=1))
    assert len(of(T.Critical, acts)) == 1 and not of(T.Cooled, acts)
    assert [a.new for _t, a in of(T.LevelChanged, acts)] == ["critical"]
    _state, acts = run([78.0, 86.0] * 40, dt=0.5)
    watts = [a.watts for _t, a in of(T.SetPowerLimit, acts)]
    assert watts == sorted(watts, reverse=True) and watts[-1] == 150
    assert all(a.factor <= 1.0 for _t, a in of(T.SetFactor, acts))
    factors = [a.factor for _t, a in of(T.SetFactor, acts)]
    assert factors == sorted(factors, reverse=True)


def test_implausible_temperatures_are_no_reading() -> None:
    for bad in (10000.0, 1e308, -273.0, 151.0):
        state, acts = run([86.0] * 3 + [bad] * 5)
        assert not of(T.Critical, acts)
        assert [a for t, a in acts if t >= 3] == [T.TelemetryLost("throttled")]
        assert state.level == "throttled"


def test_targets_are_whole_watts_and_the_floor_rounds_up() -> None:
    """An RX 9070 XT: default 304 W, steps of 30.4 W, floor 152 W."""
    lim = replace(LIM, default_w=304, board_min_w=None, min_power_fraction=0.505)
    _state, acts = run([86.0] * 40 + [70.0] * 60, lim, limit_w=304)
    watts = [a.watts for _t, a in of(T.SetPowerLimit, acts)]
    assert watts[:5] == [274, 243, 213, 182, 154]  # floor 153.52 W -> 154
    assert all(w == int(w) for w in watts) and watts[-1] == 304


def test_thresholds_out_of_order_are_put_in_order_protectively() -> None:
    assert T.ordered(83, 85, 88, 79) == (83, 85, 88, 79)
    # resume "shutdown-2" on a board with shutdown 95: 93 C, above critical 88
    assert T.ordered(83, 85, 88, 93) == (83, 85, 88, 83)
    assert T.ordered(90, 92, 88, 70) == (88, 88, 88, 70)
    assert T.ordered(90, 92, 88, 95) == (88, 88, 88, 87)


@settings(max_examples=200, deadline=None)
@given(center=st.sampled_from([LIM.warn_c, LIM.throttle_c, LIM.critical_c, LIM.resume_c]),
       noise=st.lists(st.floats(-1.5, 1.5), min_size=50, max_size=200))
def test_jitter_around_a_threshold_does_not_flap(center: float, noise: list[float]) -> None:
    """A reading that jitters by up to 1.5 C around any threshold changes the level at most
    twice (up once; down only if it crossed resume_c, 4+ C below) and steps the power at
    most once per interval."""
    _state, acts = run([center + n for n in noise])
    assert len(of(T.LevelChanged, acts)) <= 2
    steps = [t for t, _a in of(T.SetPowerLimit, acts)]
    assert all(b - a >= LIM.step_interval_s for a, b in itertools.pairwise(steps))
    assert len(of(T.Critical, acts)) <= 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(20, 110)), max_size=120))
def test_any_sequence_stays_within_the_bounds(temps: list[float | None]) -> None:
    state = T.State()
    for i, t in enumerate(temps):
        state, acts = T.decide(state, T.Reading(t, t is not None, 300, 0), LIM, float(i))
        for a in acts:
            if isinstance(a, T.SetPowerLimit):
                assert LIM.floor_w <= a.watts <= 300
            if isinstance(a, T.SetFactor):
                assert LIM.min_power_fraction <= a.factor <= 1.0
        target = state.target_w(LIM)
        assert target is None or LIM.floor_w <= target <= 300


def trace(name: str) -> list[tuple[float, float]]:
    with (FIXTURES / name).open() as fh:
        return [(float(r["t_s"]), float(r["temp_c"])) for r in csv.DictReader(fh)]


def test_replay_of_real_heat_traces() -> None:
    """The H200 trace (idle 25 C, a minute of bf16 matmul at the 700 W cap, 48-49 C, then
    idle) and the H100 trace (41 -> 65 C), with thresholds lowered into their range: the
    policy throttles while hot, never flaps, steps at most once per interval, and gives the
    limit back once the board has cooled."""
    cases = {
        "h200_heat_trace.csv": (T.Limits(warn_c=44, throttle_c=46, critical_c=60, resume_c=38,
                                         power_step=0.1, min_power_fraction=0.5,
                                         step_interval_s=5, pause_timeout_s=300,
                                         default_w=700, board_min_w=200), 700.0),
        "h100_heat_trace.csv": (T.Limits(warn_c=55, throttle_c=58, critical_c=64, resume_c=50,
                                         power_step=0.1, min_power_fraction=0.5,
                                         step_interval_s=2, pause_timeout_s=300,
                                         default_w=700, board_min_w=200), 700.0),
    }
    for name, (lim, start_w) in cases.items():
        limit_w = start_w
        state = T.State()
        acts: list[tuple[float, T.Action]] = []
        samples = trace(name)
        end, last = samples[-1]
        samples += [(end + k * 0.25, last) for k in range(1, 160)]  # 40 s more at rest
        for t_s, temp in samples:
            state, new = T.decide(state, T.Reading(temp, True, limit_w, 0), lim, t_s)
            for a in new:
                acts.append((t_s, a))
                if isinstance(a, T.SetPowerLimit):
                    limit_w = a.watts
        levels = [a.new for _t, a in of(T.LevelChanged, acts)]
        assert "throttled" in levels, name
        assert len(levels) <= 4, (name, levels)  # up (warm, throttled...), then ok: no flap
        steps = [t for t, _a in of(T.SetPowerLimit, acts)]
        assert all(b - a >= lim.step_interval_s - 1e-9 for a, b in itertools.pairwise(steps))
        if name.startswith("h200"):  # it cooled to 25 C: every step undone, 700 W again
            assert state.steps == 0 and limit_w == 700, (name, state)
        if name.startswith("h100"):
            assert any(isinstance(a, T.Critical) for _t, a in acts)


def test_a_ceiling_lowers_the_limit_at_once_and_the_steps_go_under_it() -> None:
    """On battery: a ceiling (60 % of the default) applies at once, with or without a fresh
    reading; thermal steps below it still apply; lifting it restores what the steps allow."""
    from dataclasses import replace

    capped = replace(LIM, ceiling_w=180.0)
    state, acts = T.decide(T.State(), T.Reading(None, False, 300, 0), capped, 0.0)
    assert acts == [T.SetPowerLimit(180.0)] and state.original_w == 300
    state, acts = T.decide(state, T.Reading(60, True, 180, 0), capped, 1.0)
    assert acts == []  # cool: nothing more
    # hot: steps of 30 W from 300: 270, 240, 210 are above the ceiling: no change until 150
    limit = 180.0
    sets = []
    for i in range(2, 40):
        state, acts = T.decide(state, T.Reading(90, True, limit, 0), capped, float(i * 5))
        sets += [a.watts for a in acts if isinstance(a, T.SetPowerLimit)]
    assert sets == [150.0] and state.steps >= 5
    # the ceiling lifted while still hot: the steps' own target (the floor) stays
    state, acts = T.decide(state, T.Reading(90, True, 150, 0), LIM, 500.0)
    assert [a for a in acts if isinstance(a, T.SetPowerLimit)] == []
    # cooled all the way: back to 300, the limit the board had
    out = []
    for i in range(101, 200):
        state, acts = T.decide(state, T.Reading(60, True, 150, 0), LIM, float(i * 5))
        out += [a for a in acts if isinstance(a, T.SetPowerLimit)]
    assert out[-1] == T.SetPowerLimit(300.0, restore=True) and state.original_w is None


def test_a_ceiling_alone_is_restored_when_lifted_and_never_under_the_board_minimum() -> None:
    from dataclasses import replace

    state, acts = T.decide(T.State(), T.Reading(50, True, 300, 0),
                           replace(LIM, ceiling_w=90.0), 0.0)
    assert acts == [T.SetPowerLimit(150.0)]  # the board's minimum
    state, acts = T.decide(state, T.Reading(50, True, 150, 0), LIM, 1.0)
    assert acts == [T.SetPowerLimit(300.0, restore=True)]
    assert state.original_w is None and state.applied_w is None
