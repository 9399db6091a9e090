"""Shared wake-up instants for the daemon's periodic work.

A periodic task that sleeps `period` after its work drifts by the time its work took, and
periodic tasks spread over the interval: 16 services probed every 2 s and 8 GPUs read every
1 s woke the loop about 30 times a second. On a small machine a wake-up of the loop, not the
work it does, is most of the daemon's CPU (a cold cache after another process ran: 100 to
250 us of CPU for an `asyncio.sleep` that wakes to do nothing).

`sleep_to_tick(period)` sleeps until the next multiple of `period` on the loop's clock; every
task with the same period (or one that divides it: 0.5 and 2, 1 and 2) wakes on the same timer
and runs in the same pass of the loop. The interval between two runs stays `period`: a task
on the ticks starts its work `period` apart (not `period` plus the time its work took).
"""

from __future__ import annotations

import asyncio
import math
import weakref


class _Ticks:
    """The pending instants of one loop: one timer per instant, however many wait for it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._at: dict[float, list[asyncio.Future[None]]] = {}

    def wait_until(self, when: float) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self._loop.create_future()
        waiters = self._at.get(when)
        if waiters is None:
            waiters = self._at[when] = []
            self._loop.call_at(when, self._fire, when)
        waiters.append(fut)
        return fut

    def _fire(self, when: float) -> None:
        for fut in self._at.pop(when, ()):
            if not fut.done():  # not a waiter that was cancelled meanwhile
                fut.set_result(None)


_TICKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Ticks] = \
    weakref.WeakKeyDictionary()


def next_tick(now: float, period: float) -> float:
    """The first multiple of `period` after `now`. A timer fired a hair early (the loop runs
    those due within its clock's resolution) still counts as its own instant: never the same
    one twice."""
    return (math.floor(now / period + 1e-6) + 1) * period


async def sleep_to_tick(period: float) -> float:
    """Sleep until the next multiple of `period` (> 0) on the running loop's clock: at most
    `period`. Returns that instant (`loop.time()` minus it is how late the loop woke)."""
    loop = asyncio.get_running_loop()
    ticks = _TICKS.get(loop)
    if ticks is None:
        ticks = _TICKS[loop] = _Ticks(loop)
    when = next_tick(loop.time(), period)
    await ticks.wait_until(when)
    return when
