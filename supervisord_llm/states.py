"""Service states and the transition table. Standard library only: no asyncio, no I/O."""

from __future__ import annotations

import enum
from typing import Final


class State(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    FAILED = "failed"


# from-state -> the states it may move to. `_transition()` refuses anything else.
TRANSITIONS: Final[dict[State, frozenset[State]]] = {
    # (backoff or failed: a hold released that spends the restart budget)
    State.STOPPED: frozenset({State.STARTING, State.BACKOFF, State.FAILED}),
    # launched, loading (503 from /health = loading)
    State.STARTING: frozenset(
        {State.READY, State.BACKOFF, State.STOPPING, State.STOPPED, State.FAILED}
    ),
    State.READY: frozenset(
        {State.STOPPING, State.BACKOFF, State.DRAINING, State.STOPPED, State.FAILED}
    ),
    # gate closed to new requests; drained or timed out -> stopping; resume -> ready
    State.DRAINING: frozenset({State.STOPPING, State.READY, State.BACKOFF, State.FAILED}),
    # stop signal sent to the group, SIGKILL at the deadline
    State.STOPPING: frozenset({State.STOPPED, State.BACKOFF, State.FAILED}),
    # waiting out the restart delay
    State.BACKOFF: frozenset({State.STARTING, State.FAILED, State.STOPPED}),
    # too many restarts: stays visible until reset / start (or stop)
    State.FAILED: frozenset({State.STARTING, State.STOPPED}),
}

# States in which a process of the service may be alive.
RUNNING: Final = frozenset({State.STARTING, State.READY, State.DRAINING, State.STOPPING})
# States a command waits for: nothing more will happen without a new event.
SETTLED: Final = frozenset({State.STOPPED, State.READY, State.FAILED})


class RestartReason(enum.StrEnum):
    EXIT = "exit"
    HEALTH = "health"
    THERMAL = "thermal"
    GPU_LOST = "gpu_lost"
    POWER = "power"
    MANUAL = "manual"
    HUNG = "hung"  # a generation probe failed past its limit


def can_transition(old: State, new: State) -> bool:
    return new in TRANSITIONS[old]
