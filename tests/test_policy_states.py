"""Pure parts: the transition table, backoff and the restart budget, topology parsing."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import toml_dumps
from supervisord_llm.config import parse_config
from supervisord_llm.plan import resolve_plan
from supervisord_llm.policy.backoff import FAST_RUN_S, FAST_RUNS, FLOOR_S, Budget
from supervisord_llm.sensors.base import GpuInfo
from supervisord_llm.states import SETTLED, TRANSITIONS, State, can_transition
from supervisord_llm.topology import Topology, format_cpulist, parse_cpulist


def test_transition_table_is_complete_and_matches_design() -> None:
    assert set(TRANSITIONS) == set(State)
    assert can_transition(State.STOPPED, State.STARTING)
    assert not can_transition(State.STOPPED, State.READY)
    assert can_transition(State.READY, State.DRAINING)
    assert can_transition(State.DRAINING, State.READY)
    assert can_transition(State.BACKOFF, State.FAILED)
    assert can_transition(State.FAILED, State.STARTING)
    assert not can_transition(State.FAILED, State.READY)
    # every state can eventually reach stopped
    for s in State:
        seen, todo = {s}, [s]
        while todo:
            for n in TRANSITIONS[todo.pop()]:
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        assert State.STOPPED in seen or s is State.STOPPED
    assert {State.STOPPED, State.READY, State.FAILED} == SETTLED


class RestartTracker:
    """The immutable Budget driven like a mutable tracker, to keep the tests short."""

    def __init__(self, initial: float, max_s: float, max_restarts: int, window: float,
                 rng: random.Random | None = None) -> None:
        self.args = (initial, max_s, window)
        self.max_restarts = max_restarts
        self.rng = rng or random.Random()
        self.b = Budget()

    @property
    def fast_runs(self) -> int:
        return self.b.fast_runs

    def next_delay(self, now: float, ran_s: float | None = None) -> float:
        self.b, delay = self.b.next_delay(now, ran_s, self.rng.random(), *self.args)
        return delay

    def mark_stable(self) -> None:
        self.b = self.b.mark_stable()

    def reset(self) -> None:
        self.b = self.b.reset()

    def exhausted(self, now: float) -> bool:
        return self.b.exhausted(now, self.max_restarts, self.args[2])

    def restarts_in_window(self, now: float) -> int:
        return len(self.b.in_window(now, self.args[2]))


def test_backoff_grows_is_capped_and_jittered() -> None:
    t = RestartTracker(1.0, 8.0, 100, 600, random.Random(1))
    delays = [t.next_delay(float(i)) for i in range(6)]
    for d, base in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert 0.75 * base <= d <= base
    t.mark_stable()
    assert t.next_delay(10.0) <= 1.0


def test_zero_initial_backoff_is_immediate() -> None:
    t = RestartTracker(0.0, 5.0, 100, 600)
    assert all(t.next_delay(float(i)) == 0.0 for i in range(10))


def test_fast_failures_put_a_floor_under_the_delay() -> None:
    t = RestartTracker(0.0, 0.0, 1000, 600)
    # two fast runs: still immediate
    assert [t.next_delay(float(i), ran_s=0.01) for i in range(2)] == [0.0, 0.0]
    # the third run in a row that ended under a second: at least a second from now on
    assert t.next_delay(2.0, ran_s=0.99) == FLOOR_S
    assert t.next_delay(3.0, ran_s=0.0) == FLOOR_S
    # a run that lasted a second clears it
    assert t.next_delay(10.0, ran_s=FAST_RUN_S) == 0.0
    assert t.next_delay(11.0, ran_s=0.1) == 0.0
    assert t.next_delay(12.0, ran_s=0.1) == 0.0
    assert t.next_delay(13.0, ran_s=0.1) == FLOOR_S
    # an unknown duration changes nothing; reset clears the count
    assert t.next_delay(14.0) == FLOOR_S
    t.reset()
    assert t.next_delay(15.0, ran_s=0.1) == 0.0


def test_floor_does_not_shorten_a_longer_backoff() -> None:
    t = RestartTracker(4.0, 8.0, 1000, 600, random.Random(3))
    delays = [t.next_delay(float(i), ran_s=0.1) for i in range(FAST_RUNS + 2)]
    assert all(d >= 0.75 * 4.0 for d in delays)
    assert t.fast_runs == FAST_RUNS + 2


def test_restart_budget_per_window() -> None:
    t = RestartTracker(0.0, 0.0, 3, 10.0)
    for now in (0.0, 1.0, 2.0):
        assert not t.exhausted(now)
        t.next_delay(now)
    assert t.exhausted(5.0)
    assert not t.exhausted(10.5)  # the first restart left the window
    t.reset()
    assert t.restarts_in_window(11.0) == 0


@given(st.sets(st.integers(0, 300), max_size=60))
def test_cpulist_round_trip(cpus: set[int]) -> None:
    assert parse_cpulist(format_cpulist(cpus)) == cpus


def test_cpulist_junk() -> None:
    with pytest.raises(ValueError):
        parse_cpulist("3-1")
    with pytest.raises(ValueError):
        parse_cpulist("a")


def make_sysfs(root: Path, nodes: dict[int, str], memory: str, pci: dict[str, str]) -> None:
    base = root / "devices/system/node"
    base.mkdir(parents=True)
    (base / "online").write_text(format_cpulist(set(nodes)) + "\n")
    (base / "has_memory").write_text(memory + "\n")
    for n, cpus in nodes.items():
        (base / f"node{n}").mkdir()
        (base / f"node{n}/cpulist").write_text(cpus + "\n")
    for bus, node in pci.items():
        d = root / "bus/pci/devices" / bus
        d.mkdir(parents=True)
        (d / "numa_node").write_text(node + "\n")


def gpu(i: int, node: int, vendor: str = "nvidia") -> GpuInfo:
    return GpuInfo(i, f"GPU-{i:08d}", f"g{i}", f"00000000:{0x41 + i:02x}:00.0", vendor, node,
                   1, 300.0, 100.0, 300.0, 89.0, 95.0)


def test_plan_numa_and_pinning(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {0: "0-7", 1: "8-15", 2: "16-17"}, "0-1",
               {"0000:41:00.0": "1", "0000:42:00.0": "-1"})
    topo = Topology(tmp_path)
    assert topo.pci_numa_node("00000000:41:00.0") == 1
    assert topo.pci_numa_node("00000000:42:00.0") == -1
    assert topo.pci_numa_node("0000:99:00.0") == -1
    gpus = [gpu(0, 1), gpu(1, 0), gpu(2, -1), gpu(3, 2, "amd"), gpu(4, 2, "amd")]
    cfg = parse_config(toml_dumps({"service": [
        {"name": "a", "command": ["x"], "gpus": [0]},
        {"name": "b", "command": ["x"], "gpus": [0, 1]},
        {"name": "c", "command": ["x"], "gpus": ["GPU-00000002"]},
        {"name": "d", "command": ["x"], "gpus": ["0000:44:00.0", 4]},
        {"name": "e", "command": ["x"], "gpus": [0], "numa": "none"},
        {"name": "f", "command": ["x"], "numa": 0, "env": {"CUDA_VISIBLE_DEVICES": "0"}},
    ]}))
    plans = {p.name: p for p in resolve_plan(cfg, gpus, topo, allowed_cpus=set(range(12)))}
    a = plans["a"]
    assert a.numa_node == 1 and a.cpus == tuple(range(8, 12)) and a.bind_memory
    assert dict(a.env)["CUDA_VISIBLE_DEVICES"] == "GPU-00000000"
    assert dict(a.env)["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    b = plans["b"]
    assert b.numa_node is None and b.cpus is None
    assert dict(b.env)["CUDA_VISIBLE_DEVICES"] == "GPU-00000000,GPU-00000001"
    assert "span NUMA nodes" in b.notes[0]
    assert plans["c"].numa_node is None and "not reported" in plans["c"].notes[0]
    d = plans["d"]
    assert d.numa_node == 2 and not d.bind_memory and d.cpus is None  # node 2: no memory, CPUs
    assert dict(d.env)["ROCR_VISIBLE_DEVICES"] == "GPU-00000003,GPU-00000004"
    assert dict(d.env)["HIP_VISIBLE_DEVICES"] == "0,1"
    assert "CUDA_VISIBLE_DEVICES" not in dict(d.env)
    assert plans["e"].numa_node is None
    f = plans["f"]
    assert f.numa_node == 0 and f.cpus == tuple(range(8))
    assert dict(f.env)["CUDA_VISIBLE_DEVICES"] == "0"


def test_plan_errors_name_the_key(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {0: "0-1"}, "0", {})
    cfg = parse_config(toml_dumps({"service": [
        {"name": "a", "command": ["x"], "gpus": [7]},
        {"name": "b", "command": ["x"], "numa": 5},
        {"name": "c", "command": ["x"], "gpus": [0, 1]},
    ]}))
    from supervisord_llm.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        resolve_plan(cfg, [gpu(0, 0), gpu(1, 0, "amd")], Topology(tmp_path), {0, 1})
    text = "\n".join(info.value.problems)
    assert "service[0].gpus[0]: unknown GPU 7" in text
    assert "service[1].numa: NUMA node 5 does not exist" in text
    assert "service[2].gpus: mixes NVIDIA and AMD GPUs" in text


# --- the host's mode -----------------------------------------------------------------------


def test_the_mode_is_derived_from_its_owners() -> None:
    """A stop wins, then the power's phase, then the heat; every derived change is one the
    transition table allows."""
    from supervisord_llm.modes import POWER_MODES, Mode, check, derive

    assert derive(False, None, False) is Mode.NORMAL
    assert derive(False, None, True) is Mode.THROTTLED
    for power in POWER_MODES:
        assert derive(False, power, True) is power
        assert derive(True, power, True) is Mode.SHUTTING_DOWN
    inputs = [(s, p, h) for s in (False, True) for p in (None, *POWER_MODES)
              for h in (False, True)]
    for a in inputs:
        for b in inputs:
            if a[0] and not b[0]:
                continue  # a stop is never taken back
            if a[1] is not None and b[1] is not None and a[1] != b[1] and (
                    a[1], b[1]) not in {(Mode.ON_BATTERY, Mode.POWERING_DOWN),
                                        (Mode.POWERING_DOWN, Mode.POWERED_DOWN)}:
                continue  # the power controller moves only forward through its phases
            if a[1] is None and b[1] is Mode.POWERED_DOWN:
                continue  # it goes through powering_down first
            check(derive(*a), derive(*b))  # raises ModeError if the table forbids it
