"""The host's modes and their transition table. Standard library only: no asyncio, no I/O.

- `normal`: everything as configured;
- `throttled`: the thermal policy has capped power or admission somewhere;
- `on_battery`: the UPS is on battery (riding it out, or before the grace has passed);
- `powering_down`: draining, checkpointing and stopping for a power loss;
- `powered_down`: services stopped for the power loss, waiting for the power to return;
- `shutting_down`: the daemon is stopping (terminal).

The mode is derived (`derive`) from what its owners say: the host (stopping), the power
controller (its phase) and the GPU guard (a GPU throttled); only the host actor writes it,
through `check()`.
"""

from __future__ import annotations

import enum
from typing import Final


class Mode(enum.StrEnum):
    NORMAL = "normal"
    THROTTLED = "throttled"
    ON_BATTERY = "on_battery"
    POWERING_DOWN = "powering_down"
    POWERED_DOWN = "powered_down"
    SHUTTING_DOWN = "shutting_down"


TRANSITIONS: Final[dict[Mode, frozenset[Mode]]] = {
    Mode.NORMAL: frozenset({Mode.THROTTLED, Mode.ON_BATTERY, Mode.POWERING_DOWN,
                            Mode.SHUTTING_DOWN}),
    Mode.THROTTLED: frozenset({Mode.NORMAL, Mode.ON_BATTERY, Mode.POWERING_DOWN,
                               Mode.SHUTTING_DOWN}),
    # the power came back within the grace (-> normal/throttled), or it did not
    Mode.ON_BATTERY: frozenset({Mode.NORMAL, Mode.THROTTLED, Mode.POWERING_DOWN,
                                Mode.SHUTTING_DOWN}),
    # services being stopped; the power may come back meanwhile
    Mode.POWERING_DOWN: frozenset({Mode.POWERED_DOWN, Mode.NORMAL, Mode.THROTTLED,
                                   Mode.SHUTTING_DOWN}),
    Mode.POWERED_DOWN: frozenset({Mode.NORMAL, Mode.THROTTLED, Mode.SHUTTING_DOWN}),
    Mode.SHUTTING_DOWN: frozenset(),
}


class ModeError(Exception):
    pass


def check(old: Mode, new: Mode) -> Mode:
    """`new` if the table allows old -> new (or old == new); ModeError otherwise."""
    if new is not old and new not in TRANSITIONS[old]:
        raise ModeError(f"mode {old} cannot change to {new}")
    return new


POWER_MODES: Final = frozenset({Mode.ON_BATTERY, Mode.POWERING_DOWN, Mode.POWERED_DOWN})


def derive(stopping: bool, power: Mode | None, hot: bool) -> Mode:
    """The mode from its inputs: a stop wins, then the power's phase (`power`: one of
    POWER_MODES, or None when the power is on line), then the heat."""
    if stopping:
        return Mode.SHUTTING_DOWN
    if power is not None:
        return power
    return Mode.THROTTLED if hot else Mode.NORMAL
