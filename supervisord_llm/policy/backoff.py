"""Restart policy: exponential backoff with jitter and a restart budget per window.

Pure: time comes in as arguments (monotonic seconds), randomness from an injected source.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

# A service that stays ready this long has its backoff streak cleared (capped by window_s).
STABLE_S = 60.0
# The floor on the restart rate: once FAST_RUNS runs in a row ended less than FAST_RUN_S after
# their launch, the delay before the next one is at least FLOOR_S, whatever the configured
# backoff (a zero backoff would otherwise relaunch a crashing server dozens of times a second).
# A run that lasts FAST_RUN_S or longer clears it.
FAST_RUN_S = 1.0
FAST_RUNS = 3
FLOOR_S = 1.0


@dataclass
class RestartTracker:
    backoff_initial_s: float
    backoff_max_s: float
    max_restarts: int
    window_s: float
    rng: random.Random = field(default_factory=random.Random)
    streak: int = 0
    fast_runs: int = 0  # consecutive runs that ended less than FAST_RUN_S after launch
    _times: deque[float] = field(default_factory=deque)

    @property
    def stable_s(self) -> float:
        return min(STABLE_S, self.window_s)

    def restarts_in_window(self, now: float) -> int:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        return len(self._times)

    def exhausted(self, now: float) -> bool:
        """True when one more restart would exceed `max_restarts` within `window_s`."""
        return self.restarts_in_window(now) >= self.max_restarts

    def next_delay(self, now: float, ran_s: float | None = None) -> float:
        """Record a restart at `now` of a run that lasted `ran_s` (None: unknown) and return
        how long to wait before it.

        delay = min(max, initial * 2**streak), then jittered by -25%..+0% so that services
        that fail together do not restart in lock-step; never above backoff_max_s, except
        for the floor: after FAST_RUNS consecutive runs shorter than FAST_RUN_S the delay is
        at least FLOOR_S.
        """
        self._times.append(now)
        if ran_s is not None:
            self.fast_runs = self.fast_runs + 1 if ran_s < FAST_RUN_S else 0
        base = min(self.backoff_max_s, self.backoff_initial_s * (2.0 ** min(self.streak, 60)))
        self.streak += 1
        delay = base * (0.75 + 0.25 * self.rng.random()) if base > 0 else 0.0
        if self.fast_runs >= FAST_RUNS:
            delay = max(delay, FLOOR_S)
        return delay

    def mark_stable(self) -> None:
        """The service has been ready for `stable_s`: the next failure starts from scratch."""
        self.streak = 0

    def reset(self) -> None:
        self.streak = 0
        self.fast_runs = 0
        self._times.clear()
