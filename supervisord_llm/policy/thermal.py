"""Thermal policy for one GPU, pure: `decide(state, reading, limits, now)` returns the next
state and the actions. No asyncio, no sensors; the thermal controller feeds it the hub's
snapshots and carries the actions out through the host actor.

Levels, with hysteresis so that a reading jittering around a threshold cannot flap:

- `ok` -> `warm` at `warn_c`, -> `throttled` at `throttle_c`, -> `critical` at `critical_c`
  (from any level, on the first fresh reading at or above the threshold);
- a raised level only ever goes up, until the temperature has stayed below `resume_c` for a
  whole `step_interval_s` (no reading at or above `resume_c` in that time): then `ok`. A
  reading that swings between hot and cold therefore keeps the level up instead of flapping
  the gates and the power limit with every poll.

While the temperature is at or above `throttle_c` (throttled or critical), every
`step_interval_s` the power target drops by one step (`power_step` of the default limit),
never below the floor (`min_power_fraction` of the default, nor the board's minimum), and the
admission factor of the GPU's gates follows (1 - steps x power_step, never below
`min_power_fraction`). Between `resume_c` and `throttle_c` nothing moves. Once cool (below
`resume_c` for a whole `step_interval_s`) the steps are undone one by one, every
`step_interval_s`, up to the limit the board had before the policy touched it. Targets are
whole watts (no board takes a finer limit from us; the log, the board and STATUS= agree). A
board without power control still gets the admission steps.

Critical: `Critical` once on entering, `Cooled` once cool again; if it stays critical
for `pause_timeout_s` with nothing in flight on its gated services, `Escalate` once
(something else heats it: the paused services are restarted after all).

A reading that is not fresh (failed, unresponsive, stale, or a temperature outside
PLAUSIBLE_C, which no working sensor reports) never causes an action: the state
holds as it is (the limits stay lowered, a pause stays) until fresh readings return, and
`TelemetryLost` is reported once for a GPU that was above `warn_c`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Final

LEVELS: Final = ("ok", "warm", "throttled", "critical")
PLAUSIBLE_C: Final = (-40.0, 150.0)
_RANK: Final = {lvl: i for i, lvl in enumerate(LEVELS)}


@dataclass(frozen=True)
class Limits:
    """One GPU's thresholds (resolved to Celsius) and power figures."""

    warn_c: float
    throttle_c: float
    critical_c: float
    resume_c: float
    power_step: float  # fraction of the default limit per step
    min_power_fraction: float
    step_interval_s: float
    pause_timeout_s: float
    default_w: float | None  # None: no power control on this board
    board_min_w: float | None = None
    # a ceiling from elsewhere (on battery: a fraction of the default), whatever the heat
    ceiling_w: float | None = None

    @property
    def step_w(self) -> float:
        return self.power_step * (self.default_w or 0.0)

    @property
    def floor_w(self) -> float:
        """Whole watts, never below the fraction nor the board minimum."""
        floor = self.min_power_fraction * (self.default_w or 0.0)
        return float(math.ceil(max(floor, self.board_min_w or 0.0) - 1e-9))


@dataclass(frozen=True)
class Reading:
    temperature_c: float | None
    fresh: bool  # a good reading of this poll (not failed, unresponsive or stale)
    # the board's own limit: what it has now, or what it had before the supervisor changed it
    # (the policy takes it as the limit to come back to when it starts stepping)
    limit_w: float | None
    inflight: int = 0  # requests in flight on this GPU's gated services


@dataclass(frozen=True)
class State:
    level: str = "ok"
    steps: int = 0  # power/admission steps applied now
    original_w: float | None = None  # the board's limit before the policy touched it
    last_step: float | None = None  # when the last step (down or up) was taken
    critical_since: float | None = None
    escalated: bool = False
    telemetry_lost: bool = False  # reported for this outage already
    last_hot: float | None = None  # the last fresh reading at or above resume_c
    applied_w: float | None = None  # the limit last asked of the board; None: its own

    def target_w(self, limits: Limits) -> float | None:
        """The power limit the policy wants now; None: what the board had (untouched). The
        thermal steps, and below them the ceiling (never under the board's minimum)."""
        if self.original_w is None or limits.default_w is None:
            return None
        # never above what the board had (an operator's limit below the floor stays)
        target = self.original_w
        if self.steps:
            stepped = float(round(self.original_w - self.steps * limits.step_w))
            target = min(target, max(limits.floor_w, stepped))
        if limits.ceiling_w is not None:
            ceiling = float(math.ceil(max(limits.ceiling_w, limits.board_min_w or 0.0) - 1e-9))
            target = min(target, ceiling)
        return None if target == self.original_w else target

    def factor(self, limits: Limits) -> float:
        return max(limits.min_power_fraction, 1.0 - self.steps * limits.power_step)


# --- actions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LevelChanged:
    old: str
    new: str
    temperature_c: float


@dataclass(frozen=True)
class SetPowerLimit:
    watts: float  # the target; `restore` when it is the original again
    restore: bool = False


@dataclass(frozen=True)
class SetFactor:
    factor: float


@dataclass(frozen=True)
class Critical:
    temperature_c: float


@dataclass(frozen=True)
class Escalate:
    critical_for_s: float


@dataclass(frozen=True)
class Cooled:
    temperature_c: float


@dataclass(frozen=True)
class TelemetryLost:
    level: str


Action = LevelChanged | SetPowerLimit | SetFactor | Critical | Escalate | Cooled | TelemetryLost


def ordered(warn: float, throttle: float, critical: float, resume: float
            ) -> tuple[float, float, float, float]:
    """The thresholds in the order the policy needs (resume <= warn <= throttle <= critical),
    the protective way where a config got them wrong on some GPU (relative thresholds on two
    bases, which the config check cannot compare): critical stands, the others come down to
    it; a resume at or above critical falls to one degree below it."""
    throttle = min(throttle, critical)
    warn = min(warn, throttle)
    resume = min(resume, warn)
    if resume >= critical:
        resume = critical - 1.0
    return warn, throttle, critical, resume


def _level_for(t: float, lim: Limits) -> str:
    if t >= lim.critical_c:
        return "critical"
    if t >= lim.throttle_c:
        return "throttled"
    if t >= lim.warn_c:
        return "warm"
    return "ok"


def decide(state: State, reading: Reading, lim: Limits, now: float
           ) -> tuple[State, list[Action]]:
    actions: list[Action] = []
    t = reading.temperature_c
    if not reading.fresh or t is None or not math.isfinite(t) \
            or not PLAUSIBLE_C[0] <= t <= PLAUSIBLE_C[1]:
        if not state.telemetry_lost and _RANK[state.level] >= _RANK["warm"]:
            actions.append(TelemetryLost(state.level))
            state = replace(state, telemetry_lost=True)
        return _power(state, reading, lim, actions)  # a ceiling applies without a reading
    if state.telemetry_lost:
        state = replace(state, telemetry_lost=False)
    if t >= lim.resume_c:
        state = replace(state, last_hot=now)
    # cool: below resume_c, and nothing at or above it for a whole step interval
    cool = t < lim.resume_c and (state.last_hot is None
                                 or now - state.last_hot >= lim.step_interval_s)
    old = state.level
    # the level: up at once; down only when cool (resume_c is at most warn_c: see limits)
    higher = max(old, _level_for(t, lim), key=lambda lv: _RANK[lv])
    level = "ok" if cool else higher
    if level != old:
        actions.append(LevelChanged(old, level, t))
        state = replace(state, level=level)
        if level == "critical":
            actions.append(Critical(t))
            state = replace(state, critical_since=now, escalated=False)
        elif old == "critical":
            actions.append(Cooled(t))
            state = replace(state, critical_since=None, escalated=False)
    if state.level == "critical" and state.critical_since is not None and not state.escalated \
            and now - state.critical_since >= lim.pause_timeout_s and reading.inflight == 0:
        actions.append(Escalate(now - state.critical_since))
        state = replace(state, escalated=True)
    # the steps
    due = state.last_step is None or now - state.last_step >= lim.step_interval_s
    if t >= lim.throttle_c and due:
        before = state
        if state.original_w is None:
            state = replace(state, original_w=reading.limit_w or lim.default_w)
        state = replace(state, steps=state.steps + 1, last_step=now)
        if state.target_w(lim) == before.target_w(lim) and \
                state.factor(lim) == before.factor(lim):
            state = before  # the power and the admission both at their floors
        else:
            state, actions = _power(state, reading, lim, actions)
            actions += _factor(before, state, lim)
    elif cool and state.steps > 0 and due:
        before = state
        state = replace(state, steps=state.steps - 1, last_step=now)
        state, actions = _power(state, reading, lim, actions)
        actions += _factor(before, state, lim)
        if state.steps == 0:
            state = replace(state, last_step=None)
    return _power(state, reading, lim, actions)


def _power(state: State, reading: Reading, lim: Limits, actions: list[Action]
           ) -> tuple[State, list[Action]]:
    """Bring the board's limit to the target (the steps and the ceiling together): one
    SetPowerLimit when it differs from what was last asked; the limit the board had is taken
    as the one to come back to when something first lowers it."""
    if lim.default_w is None:
        return state, actions
    if state.original_w is None and lim.ceiling_w is not None:
        state = replace(state, original_w=reading.limit_w or lim.default_w)
    target = state.target_w(lim)
    if target != state.applied_w:
        if target is None:
            if state.original_w is not None:
                actions.append(SetPowerLimit(state.original_w, restore=True))
        else:
            actions.append(SetPowerLimit(target))
        state = replace(state, applied_w=target)
    if state.steps == 0 and lim.ceiling_w is None and state.applied_w is None:
        state = replace(state, original_w=None)
    return state, actions


def _factor(before: State, after: State, lim: Limits) -> list[Action]:
    fb, fa = before.factor(lim), after.factor(lim)
    return [SetFactor(fa)] if fa != fb else []
