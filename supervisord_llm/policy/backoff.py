"""Restart policy: exponential backoff with jitter and a restart budget per window.

Pure and immutable: time comes in as arguments (monotonic seconds), randomness as a number in
[0, 1); every method returns a new `Budget`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final

# A service that stays ready this long has its backoff streak cleared (capped by window_s).
STABLE_S: Final = 60.0
# The floor on the restart rate: once FAST_RUNS runs in a row ended less than FAST_RUN_S after
# their launch, the delay before the next one is at least FLOOR_S, whatever the configured
# backoff (a zero backoff would otherwise relaunch a crashing server dozens of times a second).
# A run that lasts FAST_RUN_S or longer clears it.
FAST_RUN_S: Final = 1.0
FAST_RUNS: Final = 3
FLOOR_S: Final = 1.0


@dataclass(frozen=True)
class Budget:
    times: tuple[float, ...] = ()  # when the restarts within the window happened
    streak: int = 0  # restarts since the service was last stable
    fast_runs: int = 0  # consecutive runs that ended less than FAST_RUN_S after launch

    @staticmethod
    def stable_s(window_s: float) -> float:
        return min(STABLE_S, window_s)

    def in_window(self, now: float, window_s: float) -> tuple[float, ...]:
        return tuple(t for t in self.times if now - t <= window_s)

    def exhausted(self, now: float, max_restarts: int, window_s: float) -> bool:
        """True when one more restart would exceed `max_restarts` within `window_s`."""
        return len(self.in_window(now, window_s)) >= max_restarts

    def next_delay(self, now: float, ran_s: float | None, rand: float,  # noqa: PLR0917
                   initial_s: float, max_s: float, window_s: float) -> tuple[Budget, float]:
        """Record a restart at `now` of a run that lasted `ran_s` (None: unknown); the new
        budget and how long to wait before the restart.

        delay = min(max, initial * 2**streak), then jittered by -25%..+0% (`rand`) so that
        services that fail together do not restart in lock-step; never above max_s, except
        for the floor: after FAST_RUNS consecutive runs shorter than FAST_RUN_S the delay is
        at least FLOOR_S.
        """
        fast = self.fast_runs
        if ran_s is not None:
            fast = fast + 1 if ran_s < FAST_RUN_S else 0
        base = min(max_s, initial_s * (2.0 ** min(self.streak, 60)))
        delay = base * (0.75 + 0.25 * rand) if base > 0 else 0.0
        if fast >= FAST_RUNS:
            delay = max(delay, FLOOR_S)
        times = (*self.in_window(now, window_s), now)
        return Budget(times, self.streak + 1, fast), delay

    def mark_stable(self) -> Budget:
        """The service has been ready for `stable_s`: the next failure starts from scratch."""
        return replace(self, streak=0)

    def reset(self) -> Budget:
        return Budget()
