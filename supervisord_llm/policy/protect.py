"""GPU protection for one service, pure: `service_step(view, on_critical)` says what brings
the service in line with all of its GPUs at once. No asyncio, no actors: the GPU guard builds
the view (`ServiceView`) from what is (holds, the gate's drain reasons and admission factor,
the GPUs' levels) and carries the step out through the host actor.

- Held down (`gpu_lost`) while any of its GPUs is lost (or back but not read since: its heat
  is unknown); released when none is.
- While any of its (not lost) GPUs is critical (a service held for a lost GPU counts as not
  running), `on_critical` (the service's, or `pause` for
  a gated service and `drain-restart` otherwise):
  - `pause`: the gate closes to new requests (drain reason `thermal`), the service keeps
    running; a service that is not running (or has no gate) is held down instead; once the
    thermal policy escalates the GPU (critical for `pause_timeout_s` with nothing in flight:
    something else heats it), `drain-restart` after all, for as long as it stays critical;
  - `drain-restart`: drained, then held down (`cooling`) until its GPUs cool;
  - `stop`: drained and stopped as failed, while it is live or in backoff; one held down
    (for a lost GPU, or an on-demand service not loaded) is held `cooling` as well instead,
    so that it is not started on the GPU when released;
  - `none`: nothing.
- When none is critical and none is lost: released from `cooling` and its gate reopened
  (`thermal` only; an operator's or the power's drain stays).
- Its gate's admission factor is the lowest of its GPUs' (the thermal policy's own, per GPU;
  1 for a lost GPU).
Reading what is, not what was done, makes it converge: a reload that moves a service, an
operator's reset, a service on two GPUs that heat one after the other all end where they
should.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final

from ..lifecycle import LIVE
from ..states import State

HOLD_LOST: Final = "gpu_lost"
HOLD_COOLING: Final = "cooling"
CRITICAL_STEPS: Final = ("pause", "drain-restart", "stop")


@dataclass(frozen=True)
class GpuView:
    uuid: str
    index: int
    lost: bool = False
    critical: bool = False
    factor: float = 1.0  # the thermal policy's admission factor for this GPU
    escalated: bool = False  # critical with nothing in flight for too long (pause no help)


@dataclass(frozen=True)
class ServiceView:
    name: str
    state: State
    holds: frozenset[str]
    gpus: tuple[GpuView, ...]
    gated: bool = False
    paused: bool = False  # its gate is drained for the heat (`thermal`)
    factor: float | None = None  # its gate's admission factor now (None: no gate)


@dataclass(frozen=True)
class Step:
    hold_lost: bool = False
    release_lost: bool = False
    critical: str | None = None  # pause | drain-restart | stop
    critical_gpu: GpuView | None = None  # the (first) critical GPU it is for
    release_cooling: bool = False
    reopen: bool = False  # remove the `thermal` drain reason from its gate
    factor: float | None = None  # set its gate's admission factor to this

    def __bool__(self) -> bool:
        return self != NOTHING


NOTHING: Final = Step()


def factor_of(gpus: tuple[GpuView, ...]) -> float:
    """A service's admission factor: the lowest of its GPUs' (1 for a lost one)."""
    return min([1.0, *(g.factor for g in gpus if not g.lost)])


def critical_step(view: ServiceView, on_critical: str,
                  escalated: bool = False) -> str | None:
    """What `on_critical` still has to do to a service on a critical GPU, if anything
    (`escalated`: a pause did not cool it, so it is drained and held down after all)."""
    if on_critical == "pause" and escalated:
        on_critical = "drain-restart"
    if on_critical == "none":
        return None
    if on_critical == "stop":
        if view.state in LIVE or view.state is State.BACKOFF:
            return "stop"
        if view.state is State.FAILED or not view.holds:
            return None  # failed already, or about to start (a reset): failed once it runs
        # held down (a lost GPU, unloaded on demand): held cooling too, not started on it
    if on_critical == "pause" and view.gated and view.state in LIVE:
        return "pause" if not view.paused else None
    # drain-restart, or a pause of a service that is not running (it must not start on a
    # critical GPU): held down until it cools
    return "drain-restart" if HOLD_COOLING not in view.holds else None


def service_step(view: ServiceView, on_critical: str) -> Step:
    lost = any(g.lost for g in view.gpus)
    hot = [g for g in view.gpus if not g.lost and g.critical]
    held_lost = HOLD_LOST in view.holds
    step: dict[str, object] = {}
    if lost and not held_lost:
        step["hold_lost"] = True
    elif not lost and held_lost:
        step["release_lost"] = True
    if hot:
        # held down for a lost GPU, it is not running: it must not start on the hot one
        # either when the lost one comes back (held `cooling` too, in the same step)
        held = replace(view, state=State.STOPPED, holds=view.holds | {HOLD_LOST})
        action = critical_step(held if lost else view, on_critical,
                               escalated=any(g.escalated for g in hot))
        if action is not None:
            step["critical"] = action
            step["critical_gpu"] = hot[0]
    elif not lost:  # a lost GPU's heat is unknown: nothing is lifted until it is read again
        if HOLD_COOLING in view.holds:
            step["release_cooling"] = True
        if view.paused:
            step["reopen"] = True
    if view.gated and view.factor is not None:
        factor = factor_of(view.gpus)
        if view.factor != factor:
            step["factor"] = factor
    return Step(**step)  # type: ignore[arg-type]
