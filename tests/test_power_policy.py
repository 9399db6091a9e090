"""The power policy as a table of cases: pure, no UPS."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from supervisord_llm.policy import power as P

LIM = P.Limits(grace_s=20, low_runtime_s=300, low_charge_pct=20, deadtime_s=15)


Step = tuple[float, str] | tuple[float, str, float | None, float | None]


def run(steps: Sequence[Step],
        lim: P.Limits = LIM, state: P.State | None = None
        ) -> tuple[P.State, list[tuple[float, str]]]:
    st = state or P.State()
    out: list[tuple[float, str]] = []
    for step in steps:
        now, ups = step[0], step[1]
        charge = step[2] if len(step) > 2 else 100.0
        runtime = step[3] if len(step) > 3 else 1200.0
        st, actions = P.decide(st, P.Observation(ups, charge, runtime), lim, now)
        out += [(now, type(a).__name__) for a in actions]
    return st, out


@pytest.mark.parametrize(("raw", "state"), [
    ("OL", "online"), ("OL CHRG", "online"), ("OB DISCHRG", "on_battery"),
    ("OB LB", "low_battery"), ("OB DISCHRG LB", "low_battery"), ("FSD OB LB", "fsd"),
    ("FSD OL", "fsd"), ("WAIT", "unknown"), ("", "unknown"), ("OFF", "unknown"),
    ("ol rb", "online"), ("OL BYPASS OVER", "online"), ("OL LB", "online"),
])
def test_status_flags(raw: str, state: str) -> None:
    assert P.classify(P.parse_status(raw)) == state


def test_on_battery_past_the_grace_powers_down_once() -> None:
    st, acts = run([(0, "online"), (1, "on_battery"), (10, "on_battery"), (20.9, "on_battery"),
                    (21, "on_battery"), (25, "on_battery")])
    assert acts == [(1, "OnBattery"), (21, "PowerDown")]
    assert st.phase == "powering_down"


def test_power_back_within_the_grace_does_nothing_more() -> None:
    st, acts = run([(0, "on_battery"), (10, "online"), (40, "online")])
    assert acts == [(0, "OnBattery"), (10, "PowerBack")]
    assert st.phase == "online"


def test_flapping_faster_than_the_grace_never_powers_down() -> None:
    steps: list[Step] = []
    for i in range(50):  # 15 s on battery, 1 s on line, for 800 s
        steps += [(i * 16.0, "on_battery"), (i * 16.0 + 14.9, "on_battery"),
                  (i * 16.0 + 15, "online")]
    _st, acts = run(steps)
    assert "PowerDown" not in {a for _t, a in acts}


@pytest.mark.parametrize(("ups", "charge", "runtime"), [
    ("low_battery", 90.0, 1000.0), ("fsd", 90.0, 1000.0), ("on_battery", 90.0, 299.0),
    ("on_battery", 19.0, 1000.0),
])
def test_low_battery_powers_down_at_once(ups: str, charge: float, runtime: float) -> None:
    st, acts = run([(0, "online"), (1, ups, charge, runtime)])
    assert acts[-1] == (1, "PowerDown")
    assert st.phase == "powering_down"


def test_low_marks_while_on_line_do_nothing_but_fsd_does() -> None:
    _st, acts = run([(0, "online", 5.0, 10.0), (1, "online", 5.0, 10.0)])
    assert acts == []
    _st, acts = run([(0, "online"), (1, "fsd")])
    assert acts == [(1, "PowerDown")]


def test_deadtime_while_on_battery_is_low_battery() -> None:
    st, acts = run([(0, "online"), (1, "on_battery"), (2, "unreachable"), (10, "unreachable"),
                    (16.9, "unreachable"), (17, "unreachable")],
                   lim=P.Limits(grace_s=100, low_runtime_s=300, low_charge_pct=20,
                                deadtime_s=15))
    assert acts == [(1, "OnBattery"), (2, "Alert"), (17, "PowerDown")]
    assert st.low_reason is not None and "deadtime" in st.low_reason


def test_unknown_counts_for_the_deadtime_too() -> None:
    _st, acts = run([(0, "on_battery"), (1, "unknown"), (16, "unknown")],
                    lim=P.Limits(grace_s=100, low_runtime_s=300, low_charge_pct=20,
                                 deadtime_s=15))
    assert acts == [(0, "OnBattery"), (1, "Alert"), (16, "PowerDown")]


@pytest.mark.parametrize("ups", ["unreachable", "unknown"])
def test_unreachable_or_unknown_while_on_line_alerts_only(ups: str) -> None:
    st, acts = run([(0, "online")] + [(float(t), ups) for t in range(1, 600, 5)]
                   + [(600, "online")])
    assert acts == [(1, "Alert"), (600, "Reachable")]
    assert st.phase == "online"


def test_never_reached_at_start_is_an_alert_not_a_power_down() -> None:
    _st, acts = run([(float(t), "unreachable") for t in range(0, 100, 2)])
    assert acts == [(0, "Alert")]


def test_unreachable_then_back_on_battery_keeps_the_episode() -> None:
    # the grace runs from the first on-battery reading, through the gap in between
    _st, acts = run([(0, "on_battery"), (5, "unreachable"), (10, "on_battery"),
                     (20, "on_battery")],
                    lim=P.Limits(grace_s=20, low_runtime_s=300, low_charge_pct=20,
                                 deadtime_s=60))
    assert acts == [(0, "OnBattery"), (5, "Alert"), (10, "Reachable"), (20, "PowerDown")]


def test_power_back_mid_drain_cancels_but_not_once_committed() -> None:
    st, acts = run([(0, "low_battery"), (1, "online")])
    assert acts == [(0, "OnBattery"), (0, "PowerDown"), (1, "PowerBack")]
    assert st.phase == "online"
    st, acts = run([(0, "low_battery")])
    st = P.commit(st)
    st, acts = run([(1, "online"), (2, "online")], state=st)
    assert acts == [] and st.phase == "powering_down"
    st = P.finished(st, 2.5)
    st, acts = run([(3, "online")], state=st)
    assert acts == [(3, "Restart")] and st.phase == "online"


def test_restart_waits_for_the_battery_above_the_low_marks() -> None:
    st = P.finished(P.commit(run([(0, "low_battery", 10.0, 100.0)])[0]), 0.5)
    st, acts = run([(1, "online", 10.0, 100.0), (2, "online", 15.0, 200.0),
                    (3, "online", 25.0, 400.0)], state=st)
    assert acts == [(1, "Waiting"), (3, "Restart")]


def test_no_restart_without_restart_on_return() -> None:
    lim = P.Limits(grace_s=20, low_runtime_s=300, low_charge_pct=20, deadtime_s=15,
                   restart_on_return=False)
    st = P.finished(P.commit(run([(0, "low_battery")], lim=lim)[0]), 0.5)
    st, acts = run([(1, "online"), (100, "online")], lim=lim, state=st)
    assert acts == [] and st.phase == "powered_down"


def test_zero_grace_powers_down_on_the_first_on_battery_reading() -> None:
    lim = P.Limits(grace_s=0, low_runtime_s=300, low_charge_pct=20, deadtime_s=15)
    _st, acts = run([(0, "on_battery")], lim=lim)
    assert acts == [(0, "OnBattery"), (0, "PowerDown")]


@pytest.mark.parametrize(("runtime", "expect"), [
    (None, (60.0, 0.0)), (1200.0, (60.0, 240.0)), (300.0, (60.0, 60.0)),
    (150.0, (30.0, 30.0)), (40.0, (0.0, 10.0)), (float("nan"), (60.0, 0.0)),
])
def test_drain_budget_fits_the_runtime(runtime: float | None,
                                       expect: tuple[float, float]) -> None:
    # checkpoints 60 s, stop 30 s
    assert P.drain_budget(runtime, 60.0, 60.0, 30.0) == pytest.approx(expect)


def test_an_fsd_event_keeps_the_services_down_until_an_on_line_event() -> None:
    st, acts = P.decide(P.State(), P.Observation("fsd", source="event"), LIM, 0)
    assert [type(a).__name__ for a in acts] == ["PowerDown"] and st.forced
    st = P.finished(P.commit(st), 0.5)
    st, acts = P.decide(st, P.Observation("online", 100, 1200), LIM, 1)  # upsd: OL
    assert [type(a).__name__ for a in acts] == ["Waiting"] and st.phase == "powered_down"
    st, acts = P.decide(st, P.Observation("online", 100, 1200), LIM, 2)
    assert acts == []
    st, acts = P.decide(st, P.Observation("online", 100, 1200, source="event"), LIM, 3)
    assert [type(a).__name__ for a in acts] == ["Restart"] and not st.forced


def test_an_fsd_reading_is_not_sticky() -> None:
    st = P.finished(P.commit(P.decide(P.State(), P.Observation("fsd"), LIM, 0)[0]), 0.5)
    st, acts = P.decide(st, P.Observation("online", 100, 1200), LIM, 1)
    assert [type(a).__name__ for a in acts] == ["Restart"]


def names(acts: Sequence[P.Action]) -> list[str]:
    return [type(a).__name__ for a in acts]


def test_the_grace_runs_out_on_the_clock_alone() -> None:
    st, acts = P.decide(P.State(), P.Observation("on_battery", source="event"), LIM, 0)
    assert names(acts) == ["OnBattery"]
    assert P.tick(st, LIM, 19.9) == (st, [])
    st, acts = P.tick(st, LIM, 20.0)
    assert names(acts) == ["PowerDown"] and st.phase == "powering_down"
    assert P.tick(st, LIM, 40.0) == (st, [])  # once
    # power back within the grace: the clock has nothing to do
    st, _ = P.decide(P.State(), P.Observation("on_battery", source="event"), LIM, 0)
    st, _ = P.decide(st, P.Observation("online", source="event"), LIM, 5)
    assert P.tick(st, LIM, 30.0) == (st, [])


def fsd(ol: bool = True) -> P.Observation:
    return P.Observation("fsd", 100, 1200, ol=ol, ob=not ol)


def powered_down_by_fsd(at: float = 0.0) -> P.State:
    st, acts = P.decide(P.State(), fsd(), LIM, at)
    assert names(acts) == ["PowerDown"]
    return P.finished(P.commit(st), at + 10)


def test_fsd_ol_long_after_the_sequence_is_an_aborted_shutdown() -> None:
    st = powered_down_by_fsd()
    st, acts = P.decide(st, fsd(), LIM, 300)  # 290 s after the end: still believed
    assert acts == [] and st.phase == "powered_down"
    st, acts = P.decide(st, fsd(), LIM, 310)
    assert names(acts) == ["FsdIgnored", "Restart"] and st.override and st.phase == "online"
    st, acts = P.decide(st, fsd(), LIM, 311)  # the flag stands: no new power-down
    assert acts == [] and st.phase == "online"
    # a new outage while the flag stands cannot be told from a real FSD: at once
    st, acts = P.decide(st, fsd(ol=False), LIM, 400)
    assert names(acts) == ["OnBattery", "PowerDown"]
    # upsd cleared its flag: the override ends, FSD is believed again
    st, _ = P.decide(P.finished(P.commit(st), 401), P.Observation("online", 100, 1200), LIM, 402)
    assert not st.override and st.phase == "online"
    st, acts = P.decide(st, fsd(), LIM, 403)
    assert names(acts) == ["PowerDown"]


def test_fsd_ob_is_never_taken_as_stale() -> None:
    st = powered_down_by_fsd()
    st, acts = P.decide(st, fsd(ol=False), LIM, 10_000)
    assert acts == [] and st.phase == "powered_down" and not st.override


def test_fsd_stale_s_zero_waits_for_the_operator() -> None:
    lim = P.Limits(grace_s=20, low_runtime_s=300, low_charge_pct=20, deadtime_s=15,
                   fsd_stale_s=0)
    st = powered_down_by_fsd()
    st, acts = P.decide(st, fsd(), lim, 100_000)
    assert acts == [] and st.phase == "powered_down"
    st = P.override(st)
    st, acts = P.decide(st, P.Observation("online", source="event"), lim, 100_001)
    assert names(acts) == ["Restart"]
    st, acts = P.decide(st, fsd(), lim, 100_002)
    assert acts == [] and st.phase == "online"


def test_an_fsd_event_latch_goes_when_upsd_says_ol_long_after() -> None:
    st, _ = P.decide(P.State(), P.Observation("fsd", source="event"), LIM, 0)
    st = P.finished(P.commit(st), 10)
    st, acts = P.decide(st, P.Observation("online", 100, 1200), LIM, 20)
    assert names(acts) == ["Waiting"]
    st, acts = P.decide(st, P.Observation("online", 100, 1200), LIM, 310)
    assert names(acts) == ["FsdIgnored", "Restart"] and not st.forced and not st.override


def test_the_operator_override_ignores_the_low_marks_it_is_given() -> None:
    st = P.finished(P.commit(run([(0, "low_battery", 10.0, 100.0)])[0]), 1)
    st = P.override(st)
    st, acts = P.decide(st, P.Observation("online", source="event"), LIM, 2)
    assert names(acts) == ["Restart"]


def test_a_bare_fsd_under_the_override_says_nothing_about_the_power() -> None:
    """upsd's standing FSD with the driver gone: neither OL nor OB. Under the override that is
    no data (an alert), never low battery."""
    st = P.override(powered_down_by_fsd())
    st, acts = P.decide(st, P.Observation("online", source="event"), LIM, 20)
    assert names(acts) == ["Restart"]
    st, acts = P.decide(st, P.Observation("fsd", ol=False, ob=False), LIM, 21)
    assert names(acts) == ["Alert"] and st.phase == "online" and st.override
    st, acts = P.decide(st, P.Observation("fsd", 100, 1200, ol=True), LIM, 22)
    assert names(acts) == ["Reachable"] and st.phase == "online"
    st, acts = P.decide(st, P.Observation("fsd", 100, 1200, ob=True), LIM, 23)
    assert names(acts) == ["OnBattery", "PowerDown"]
