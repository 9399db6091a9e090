"""The room planner (`policy.room.plan_room`), pure: a table of cases, then properties over
random snapshots (hypothesis)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisord_llm.policy.room import GIB, Gpu, Holder, Want, plan_room

G0 = Gpu("GPU-0", 0, 24 * GIB)
G1 = Gpu("GPU-1", 1, 24 * GIB)


def want(need_gib: float = 10, gpus: tuple[Gpu, ...] = (G0,), exclusive: bool = False) -> Want:
    return Want("new", gpus, {g.uuid: int(need_gib * GIB) for g in gpus}, exclusive)


def holder(name: str, need_gib: float = 10, gpus: tuple[Gpu, ...] = (G0,), **kw: object
           ) -> Holder:
    return Holder(name, {g.uuid: int(need_gib * GIB) for g in gpus}, **kw)  # type: ignore[arg-type]


Case = tuple[str, Want, list[Holder], bool, list[str], bool, list[str], str]

CASES: list[Case] = [
    # (what, want, holders, ok, victims, wait, drain, in the message)
    ("no GPU: nothing to plan", Want("new", (), {}), [holder("a", 24)],
     True, [], False, [], ""),
    ("fits beside what runs", want(10), [holder("a", 10)], True, [], False, [], ""),
    ("the least recently used idle one goes, only as many as needed",
     want(10), [holder("old", 10, last_used=1.0), holder("new2", 10, last_used=2.0)],
     True, ["old"], False, [], ""),
    ("an always service is never stopped for it: told at once", want(20),
     [holder("base", 10, on_demand=False)], False, [], False, [], "held by base (always"),
    ("a pinned one is never a victim", want(20), [holder("p", 10, pinned=True)],
     False, [], False, [], "pinned by llmctl start"),
    ("exclusive: every other holder goes", want(1, exclusive=True), [holder("a", 1)],
     True, ["a"], False, [], ""),
    ("exclusive, beside an always service: reserved", want(1, exclusive=True),
     [holder("base", 1, on_demand=False)], False, [], False, [], "reserved by base"),
    ("an exclusive holder goes for any demand on its GPU", want(1),
     [holder("x", 1, exclusive=True)], True, ["x"], False, [], ""),
    ("one going down frees its memory: wait for it, stop nothing more", want(10),
     [holder("g", 10, state="stopping", going=True), holder("idle", 10, last_used=0.0)],
     False, [], True, [], "still held by"),
    ("busy and loaded long enough: drained", want(20),
     [holder("busy", 10, busy=True, in_flight=2)], False, [], True, ["busy"],
     "2 request(s) in flight"),
    ("two exclusive holders, one busy: it drains, the idle one goes at the next look "
     "(found by the property below)", want(0),
     [holder("x", 0, exclusive=True, busy=True), holder("y", 6, exclusive=True)],
     False, [], True, ["x"], "held by"),
    ("busy within min_residency_s: wait, no drain", want(20),
     [holder("busy", 10, busy=True, resident_left=30.0, min_residency_s=60.0)],
     False, [], True, [], "kept 30 s more by min_residency_s = 60"),
    ("idle within min_residency_s is no victim yet", want(20),
     [holder("fresh", 10, resident_left=5.0, min_residency_s=60.0)],
     False, [], True, [], "kept 5 s more"),
    ("a stranger's memory counts (the GPU's own reading)",
     Want("new", (replace(G0, used=20 * GIB),), {"GPU-0": 10 * GIB}), [],
     False, [], False, [], "4.0 GiB free of 24.0 GiB) held by no service"),
    ("a GPU of unknown size never lacks room",
     Want("new", (Gpu("GPU-0", 0, None),), {"GPU-0": 10**15}), [holder("a", 99)],
     True, [], False, [], ""),
    ("a hot swap's instance is not stopped for it", want(20),
     [holder("swap", 10, registered=False)], False, [], False, [], "held by swap"),
    ("one under our own start or stop is neither victim nor drained", want(20),
     [holder("a", 10, acting=True)], False, [], True, [], "held by a"),
    ("two GPUs: the victim must free the GPU that lacks", want(20, gpus=(G0, G1)),
     [holder("on1", 10, gpus=(G1,), last_used=0.0), holder("on0", 10, last_used=5.0)],
     True, ["on1", "on0"], False, [], ""),
    ("a busy exclusive holder is drained, its memory freed once (not twice)", want(21),
     [holder("base", 4, on_demand=False), holder("x", 1, exclusive=True, busy=True)],
     False, [], False, [], "held by base (always"),
    ("drain the least recently loaded first, only as many as needed", want(14),
     [holder("b1", 10, busy=True, loaded_at=5.0), holder("b2", 10, busy=True, loaded_at=1.0)],
     False, [], True, ["b2"], "held by"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_plan_room(case: Case) -> None:
    what, w, holders, ok, victims, wait, drain, says = case
    plan = plan_room(w, holders)
    assert (plan.ok, plan.victims, plan.wait, plan.drain) == (ok, victims, wait, drain), what
    assert says in plan.message, plan.message
    if not plan.ok:
        assert plan.message.startswith(f"no room for {w.name} (needs ")


def test_the_message_names_every_gpu_and_holder() -> None:
    plan = plan_room(want(20, gpus=(G0, G1)), [holder("base", 10, on_demand=False),
                                               holder("p", 10, gpus=(G1,), pinned=True)])
    assert plan.message == (
        "no room for new (needs 20.0 GiB): GPU0 (14.0 GiB free of 24.0 GiB) held by base "
        "(always, 10.0 GiB); GPU1 (14.0 GiB free of 24.0 GiB) held by p (pinned by llmctl "
        "start, 10.0 GiB)")


# --- properties ----------------------------------------------------------------------------

GPUS = (G0, G1, Gpu("GPU-2", 2, 16 * GIB))


@st.composite
def holders_st(draw: st.DrawFn) -> list[Holder]:
    out = []
    for i in range(draw(st.integers(0, 6))):
        gpus = draw(st.sets(st.sampled_from(GPUS), min_size=1, max_size=2))
        need = draw(st.integers(0, 24))
        state = draw(st.sampled_from(["ready", "ready", "starting", "stopping", "backoff"]))
        out.append(Holder(
            f"s{i}", {g.uuid: need * GIB for g in gpus},
            on_demand=draw(st.booleans()), exclusive=draw(st.integers(0, 5)) == 0,
            state=state, going=state == "stopping" and draw(st.booleans()),
            pinned=draw(st.integers(0, 4)) == 0, registered=draw(st.integers(0, 6)) > 0,
            busy=draw(st.booleans()), acting=draw(st.integers(0, 5)) == 0,
            resident_left=draw(st.sampled_from([0.0, 0.0, 12.0])),
            last_used=draw(st.floats(0, 100)), loaded_at=draw(st.floats(0, 100))))
    return out


@st.composite
def want_st(draw: st.DrawFn) -> Want:
    gpus = draw(st.sets(st.sampled_from(GPUS), min_size=0, max_size=2))
    used = {g.uuid: draw(st.sampled_from([None, 0, 8 * GIB, 20 * GIB])) for g in gpus}
    snap = tuple(replace(g, used=used[g.uuid]) for g in sorted(gpus, key=lambda g: g.index))
    return Want("want", snap, {g.uuid: draw(st.integers(0, 24)) * GIB for g in snap},
                exclusive=draw(st.integers(0, 5)) == 0)


def lacks(w: Want, holders: list[Holder], freed_by: list[Holder]) -> bool:
    gone = {h.name for h in freed_by}
    for g in w.gpus:
        if g.total is None:
            continue
        committed = sum(h.need.get(g.uuid, 0) for h in holders if h.name != w.name)
        freed = sum(h.need.get(g.uuid, 0) for h in holders if h.name in gone)
        if w.need.get(g.uuid, 0) > g.total - (max(committed, g.used or 0) - freed):
            return True
    return False


@settings(max_examples=400, deadline=None)
@given(w=want_st(), holders=holders_st())
def test_a_plan_is_safe_and_sufficient(w: Want, holders: list[Holder]) -> None:
    plan = plan_room(w, holders)
    by_name = {h.name: h for h in holders}
    on_gpus = [h for h in holders if any(g.uuid in h.need for g in w.gpus)]
    going = [h for h in on_gpus if h.going]
    # what is stopped for it is only ever an idle on-demand service, not pinned, ours,
    # loaded long enough; what is drained is busy but loaded long enough
    for name in plan.victims:
        h = by_name[name]
        assert h.evictable and h.victim_now and not h.going
    for name in plan.drain:
        assert by_name[name].evictable and by_name[name].drainable
    assert not (plan.ok and plan.drain)
    assert not (set(plan.victims) & set(plan.drain))
    if plan.ok:
        # it fits once the victims (and those going down) have gone
        freed = going + [by_name[n] for n in plan.victims]
        assert not lacks(w, holders, freed)
        if w.exclusive:
            assert all(h in freed for h in on_gpus)
    elif plan.drain:
        # once the drained ones are gone, what is idle is stopped at the next look (another
        # exclusive holder, say): it fits then
        idle = [h for h in on_gpus if h.evictable and h.victim_now and not h.going]
        assert plan.wait and not lacks(w, holders,
                                       going + [by_name[n] for n in plan.drain] + idle)
    if not plan.ok:
        assert plan.message.startswith("no room for want")
    # an always, pinned or swapping holder on a reserved GPU blocks it
    if any(not h.evictable and not h.going and (w.exclusive or h.exclusive) for h in on_gpus):
        assert not plan.ok and not plan.wait and "reserved by" in plan.message


@settings(max_examples=200, deadline=None)
@given(w=want_st(), holders=holders_st())
def test_no_victim_more_than_needed(w: Want, holders: list[Holder]) -> None:
    """Without exclusivity, each victim was needed: without the last one it would not fit."""
    plan = plan_room(w, holders)
    if not plan.ok or not plan.victims or w.exclusive or any(h.exclusive for h in holders):
        return
    by_name = {h.name: h for h in holders}
    going = [h for h in holders if h.going and any(g.uuid in h.need for g in w.gpus)]
    assert lacks(w, holders, going + [by_name[n] for n in plan.victims[:-1]])
