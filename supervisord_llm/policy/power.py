"""Power policy, pure: `decide(state, observation, limits, now)` returns the next state and the
actions. No asyncio, no sockets; the power controller feeds it what the UPS source (NUT) and
`llmctl power-event` report, and carries the actions out through the host actor.

What the UPS says is one of the `UPS_STATES`:

- `online`, `on_battery`, `low_battery` (OB LB), `fsd` (forced shutdown, set by the primary
  upsmon: the machine is about to lose power whatever the status flags say);
- `unreachable` (upsd refused, timed out, or answered garbage) and `unknown` (upsd answers but
  has no data: `WAIT`, `ERR DRIVER-NOT-CONNECTED`, `ERR DATA-STALE`).

Phases: `online` -> `on_battery` -> `powering_down` -> `powered_down` -> `online`.

- On battery: `OnBattery` at once (the controller lowers the GPUs' power to stretch the
  battery); the power-down sequence (`PowerDown`) once the UPS has been on battery for
  `grace_s`, or at once on low battery: LB, FSD, `battery.runtime` under `low_runtime_s` or
  `battery.charge` under `low_charge_pct` while on battery.
- Each `online` observation ends the on-battery episode: a UPS that flaps OB/OL faster than the
  grace never powers the box down (the low marks still do).
- upsmon's DEADTIME rule: a UPS that has been unreachable or unknown for `deadtime_s` while the
  last known state was on battery is taken as low battery. While on line it is an `Alert`
  only, never a power-down: a dead upsd must not stop the services.
- Power back while powering down, before the services are being stopped (`commit`): `PowerBack`
  cancels the sequence. Once committed, the sequence runs to its end (`finished`); then, in
  `powered_down`, power back with the battery above the low marks gives `Restart` (with
  `restart_on_return`); below them the policy waits for the battery to charge (`Waiting`, once).
- FSD is a power-down from any phase but `powered_down`, even with OL in the flags. An FSD
  that came as an event (upsmon's primary is powering the machine off) also keeps the
  services down when a reading says on line again, until an on-line event.
- upsd keeps FSD once it is set, until NUT's server restarts: `FSD OL` long after the sequence
  ended, with the box still up, is an aborted shutdown. After `fsd_stale_s` of it the FSD flag
  is no longer believed (`override`) and the services start again; the operator's
  `llmctl power-event on-line --force` does the same at once (`override()`). While the flag is
  not believed, `FSD OL` reads as on line and `FSD OB` as low battery (a new outage powers
  down at once: it cannot be told from a real FSD); a reading without FSD ends the override.
- The grace also runs on the clock alone (`tick`): with `source = "none"` the next event may
  be LOWBATT, minutes later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Final

UPS_STATES: Final = ("online", "on_battery", "low_battery", "fsd", "unreachable", "unknown")
PHASES: Final = ("online", "on_battery", "powering_down", "powered_down")
KNOWN_FLAGS: Final = frozenset({
    "OL", "OB", "LB", "HB", "RB", "CHRG", "DISCHRG", "BYPASS", "CAL", "OFF", "OVER", "TRIM",
    "BOOST", "FSD", "ALARM", "TEST", "WAIT",
})


def parse_status(raw: str) -> frozenset[str]:
    """The flags of a `ups.status` value ("OB DISCHRG LB"); upper-cased, several at once."""
    return frozenset(f.upper() for f in raw.split() if f)


def classify(flags: frozenset[str]) -> str:
    """A UPS state from the status flags."""
    if "FSD" in flags:
        return "fsd"
    if "WAIT" in flags or not flags:
        return "unknown"
    if "OB" in flags:
        return "low_battery" if "LB" in flags else "on_battery"
    if "OL" in flags:
        return "online"
    return "unknown"  # neither OL nor OB (a driver that reports only "OFF" or "BYPASS")


@dataclass(frozen=True)
class Limits:
    grace_s: float
    low_runtime_s: float
    low_charge_pct: float
    deadtime_s: float
    restart_on_return: bool = True
    fsd_stale_s: float = 300.0  # FSD OL this long after the sequence ended: aborted (0: never)


@dataclass(frozen=True)
class Observation:
    state: str  # one of UPS_STATES
    charge_pct: float | None = None
    runtime_s: float | None = None
    source: str = "nut"  # nut | event (llmctl power-event)
    ol: bool = False  # OL among upsd's flags (tells `FSD OL` from `FSD OB`)
    ob: bool = False  # OB among them (a bare `FSD`, the driver gone, says neither)


@dataclass(frozen=True)
class State:
    phase: str = "online"
    on_battery_since: float | None = None
    believed: str = "online"  # the last reachable state: online | on_battery | low_battery
    unreachable_since: float | None = None  # unreachable or unknown since
    alerted: bool = False  # Alert given for this outage
    committed: bool = False  # the services are being stopped: no cancel any more
    waiting: bool = False  # Waiting given for this return
    low_reason: str | None = None
    # an FSD from `llmctl power-event` (upsmon's primary is powering the machine off): no
    # restart on an on-line reading; only an on-line event (someone who knows) clears it
    forced: bool = False
    # upsd's FSD flag is not believed (an operator's override, or an FSD left standing long
    # after the sequence ended with the box still up); ends with a reading without FSD
    override: bool = False
    finished_at: float | None = None  # when the sequence ended (powered_down since)


# --- actions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnBattery:
    charge_pct: float | None
    runtime_s: float | None


@dataclass(frozen=True)
class PowerBack:
    """The power is back before the services were stopped: cancel, reopen, restore."""


@dataclass(frozen=True)
class PowerDown:
    reason: str
    runtime_s: float | None  # what the UPS reports now, for the sequence's budget


@dataclass(frozen=True)
class Restart:
    """Powered down, and the power is back with the battery above the low marks."""


@dataclass(frozen=True)
class Waiting:
    reason: str  # the power is back, the battery below a low mark


@dataclass(frozen=True)
class Alert:
    message: str  # unreachable or unknown: said once per outage


@dataclass(frozen=True)
class Reachable:
    """The UPS answers again after an Alert."""


@dataclass(frozen=True)
class FsdIgnored:
    reason: str  # upsd's FSD flag is no longer believed: said once


Action = OnBattery | PowerBack | PowerDown | Restart | Waiting | Alert | Reachable | FsdIgnored


def _num(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def low_mark(obs: Observation, lim: Limits) -> str | None:
    """Why the battery is low (LB, FSD, runtime or charge under the marks), or None."""
    if obs.state == "fsd":
        return "forced shutdown (FSD) from the UPS"
    if obs.state == "low_battery":
        return "the UPS reports low battery (LB)"
    runtime, charge = _num(obs.runtime_s), _num(obs.charge_pct)
    if runtime is not None and runtime < lim.low_runtime_s:
        return f"battery runtime {runtime:.0f} s is under low_runtime_s ({lim.low_runtime_s:g} s)"
    if charge is not None and charge < lim.low_charge_pct:
        return f"battery charge {charge:.0f} % is under low_charge_pct ({lim.low_charge_pct:g} %)"
    return None


def _unbelieved_fsd(state: State, obs: Observation, lim: Limits, now: float
                    ) -> tuple[State, Observation, list[Action]]:
    """An FSD that is no longer believed: upsd's flag reads as on line with OL (as low battery
    with OB), and an FSD event's latch goes. That is so after the operator's override, or when
    the FSD still stands `fsd_stale_s` after the sequence ended, this machine still up and
    upsd saying OL: the shutdown it announced did not happen. A bare `FSD` (neither OL nor OB:
    the driver gone) then says nothing about the power."""
    if obs.source != "nut" or obs.state in ("unreachable", "unknown"):
        return state, obs, []
    fsd = obs.state == "fsd"
    if not fsd and state.override:  # upsd cleared its flag: the override has done its work
        state = replace(state, override=False)
    actions: list[Action] = []
    on_line = obs.ol if fsd else obs.state == "online"
    standing = (fsd and not state.override) or state.forced
    if on_line and standing and state.phase == "powered_down" \
            and state.finished_at is not None and lim.fsd_stale_s > 0 \
            and now - state.finished_at >= lim.fsd_stale_s:
        what = "upsd still says FSD OL" if fsd else \
            "the FSD from upsmon still holds the services and upsd says OL"
        actions.append(FsdIgnored(
            f"{what} {now - state.finished_at:.0f} s after the power-down ended, and this "
            f"machine is still up (fsd_stale_s {lim.fsd_stale_s:g} s): the shutdown did not "
            "happen; the FSD is no longer believed" + (" until upsd clears its flag"
                                                       if fsd else "")))
        state = replace(state, override=state.override or fsd, forced=False, waiting=False)
    if fsd and state.override:
        obs = replace(obs, state=unbelieved(obs))
    return state, obs, actions


def unbelieved(obs: Observation) -> str:
    """What an FSD reading that is not believed says: on line with OL, low battery with OB
    (a new cut cannot be told from a real FSD), and nothing (`unknown`) with neither."""
    return "online" if obs.ol else "low_battery" if obs.ob else "unknown"


def decide(state: State, obs: Observation, lim: Limits, now: float
           ) -> tuple[State, list[Action]]:
    state, obs, actions = _unbelieved_fsd(state, obs, lim, now)
    phase = state.phase
    if obs.state in ("unreachable", "unknown"):
        since = state.unreachable_since if state.unreachable_since is not None else now
        state = replace(state, unreachable_since=since)
        if not state.alerted:
            what = ("unreachable" if obs.state == "unreachable"
                    else "without data (driver not connected, stale data, or starting)")
            battery = state.believed in ("on_battery", "low_battery")
            actions.append(Alert(f"UPS {what}; " + (
                f"it was on battery: taken as low battery after deadtime_s "
                f"({lim.deadtime_s:g} s)" if battery
                else "it was on line: no power-down for this")))
            state = replace(state, alerted=True)
        dead = now - since >= lim.deadtime_s
        if phase == "on_battery":
            if dead:
                why = (f"the UPS has been {obs.state} for {now - since:.0f} s while on battery "
                       f"(deadtime_s {lim.deadtime_s:g} s): taken as low battery")
                state = replace(state, phase="powering_down", low_reason=why, committed=False)
                actions.append(PowerDown(why, None))
            elif (ob := state.on_battery_since) is not None and now - ob >= lim.grace_s:
                why = f"on battery for {now - ob:.1f} s (grace " \
                      f"{lim.grace_s:g} s; the UPS {obs.state} since)"
                state = replace(state, phase="powering_down", low_reason=None, committed=False)
                actions.append(PowerDown(why, None))
        return state, actions
    if state.unreachable_since is not None:
        if state.alerted:
            actions.append(Reachable())
        state = replace(state, unreachable_since=None, alerted=False)
    state = replace(state, believed="online" if obs.state == "online" else
                    "low_battery" if obs.state in ("low_battery", "fsd") else "on_battery")
    low = low_mark(obs, lim)
    on_line = obs.state == "online"
    if obs.source == "event":
        if obs.state == "fsd":
            state = replace(state, forced=True)
        elif on_line:
            state = replace(state, forced=False)
    if phase == "online":
        if obs.state == "fsd":
            state = replace(state, phase="powering_down", low_reason=low, committed=False)
            actions.append(PowerDown(low or "FSD", _num(obs.runtime_s)))
        elif not on_line:
            state = replace(state, phase="on_battery", on_battery_since=now)
            actions.append(OnBattery(_num(obs.charge_pct), _num(obs.runtime_s)))
            if low is not None:
                state = replace(state, phase="powering_down", low_reason=low, committed=False)
                actions.append(PowerDown(low, _num(obs.runtime_s)))
            elif lim.grace_s <= 0:
                state = replace(state, phase="powering_down", low_reason=None, committed=False)
                actions.append(PowerDown("on battery (on_battery_grace_s = 0)",
                                         _num(obs.runtime_s)))
    elif phase == "on_battery":
        if on_line:
            state = replace(state, phase="online", on_battery_since=None)
            actions.append(PowerBack())
        elif low is not None:
            state = replace(state, phase="powering_down", low_reason=low, committed=False)
            actions.append(PowerDown(low, _num(obs.runtime_s)))
        elif (ob := state.on_battery_since) is not None and now - ob >= lim.grace_s:
            state = replace(state, phase="powering_down", low_reason=None, committed=False)
            actions.append(PowerDown(f"on battery for {now - ob:.1f} s "
                                     f"(grace {lim.grace_s:g} s)", _num(obs.runtime_s)))
    elif phase == "powering_down":
        if on_line and not state.committed:
            state = replace(state, phase="online", on_battery_since=None, low_reason=None)
            actions.append(PowerBack())
    elif phase == "powered_down":
        if on_line and lim.restart_on_return:
            if state.forced:
                if not state.waiting:
                    state = replace(state, waiting=True)
                    actions.append(Waiting("a forced shutdown (FSD) came from upsmon: the "
                                           "services stay down until `llmctl power-event "
                                           "on-line`"))
            elif low is None:
                state = replace(state, phase="online", on_battery_since=None, committed=False,
                                waiting=False, low_reason=None, finished_at=None)
                actions.append(Restart())
            elif not state.waiting:
                state = replace(state, waiting=True)
                actions.append(Waiting(low))
        elif not on_line and state.waiting:
            state = replace(state, waiting=False)
    return state, actions


def tick(state: State, lim: Limits, now: float) -> tuple[State, list[Action]]:
    """The clock alone, with no new reading: the on-battery grace runs out. Without a UPS to
    poll (`source = "none"`) the next event may be LOWBATT, minutes later."""
    ob = state.on_battery_since
    if state.phase != "on_battery" or ob is None or now - ob < lim.grace_s:
        return state, []
    state = replace(state, phase="powering_down", low_reason=None, committed=False)
    return state, [PowerDown(f"on battery for {now - ob:.1f} s (grace {lim.grace_s:g} s)", None)]


def override(state: State) -> State:
    """The operator says the power is back (`llmctl power-event on-line --force`), whatever
    upsd says: the FSD latches go, and upsd's FSD flag is not believed until it clears."""
    return replace(state, forced=False, waiting=False, override=True)


def release(state: State) -> State:
    """An on-line event that could not be applied (upsd still says OB) still releases the
    latch of an FSD event: upsd's own on-line reading then restarts the services."""
    return replace(state, forced=False, waiting=False)


def commit(state: State) -> State:
    """The services are being stopped: power back no longer cancels the sequence."""
    return replace(state, committed=True)


def finished(state: State, now: float) -> State:
    """The sequence has ended: the services are stopped and held."""
    return replace(state, phase="powered_down", committed=False, waiting=False, finished_at=now)


def cancelled(state: State) -> State:
    """The sequence was cut off (the daemon stops): back to the last phase a reading gives."""
    return replace(state, committed=False)


def drain_budget(runtime_s: float | None, drain_timeout_s: float, checkpoints_s: float,
                 stop_timeout_s: float) -> tuple[float, float]:
    """How long the drain may wait, and the margin left, so that the whole sequence fits in
    the runtime the UPS reports: drain + checkpoints + stop <= runtime - margin, the margin
    being 20 % of the runtime and at least 10 s (the runtime estimate is rough, and the
    shutdown command and the OS need some of it). Without a runtime, `drain_timeout_s`."""
    runtime = _num(runtime_s)
    if runtime is None:
        return drain_timeout_s, 0.0
    margin = max(10.0, 0.2 * runtime)
    room = runtime - margin - checkpoints_s - stop_timeout_s
    return max(0.0, min(drain_timeout_s, room)), margin
