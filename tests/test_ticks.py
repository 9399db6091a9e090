"""Shared ticks: the periodic work of the daemon wakes its loop together."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from supervisord_llm.ticks import next_tick, sleep_to_tick


def test_next_tick_is_the_next_multiple_never_the_same_twice() -> None:
    assert next_tick(10.0, 2.0) == 12.0
    assert next_tick(10.5, 2.0) == 12.0
    assert next_tick(11.9, 2.0) == 12.0
    # a timer the loop fired a hair before its instant: that instant is done, the next one
    assert next_tick(12.0 - 1e-9, 2.0) == 14.0
    assert next_tick(12.0, 2.0) == 14.0
    # periods that divide each other meet: the same float, so the same timer
    assert next_tick(11.5, 1.0) == next_tick(11.5, 2.0) == next_tick(11.6, 0.5) == 12.0
    assert next_tick(0.25, 0.1) == 3 * 0.1


async def test_sleepers_of_a_period_share_one_timer_and_one_instant(
        monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    timers: list[float] = []
    call_at = loop.call_at

    def counting_call_at(when: float, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        timers.append(when)
        return call_at(when, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", counting_call_at)
    woke: list[tuple[float, float]] = []

    async def sleeper() -> None:
        when = await sleep_to_tick(0.05)
        woke.append((when, loop.time()))

    started = loop.time()
    await asyncio.gather(*(sleeper() for _ in range(10)))
    assert len(timers) == 1  # ten sleepers, one timer
    [when] = {w for w, _ in woke}
    assert when == timers[0] and started < when <= started + 0.05 + 1e-6
    assert all(t >= when - 1e-6 for _, t in woke)


async def test_a_cancelled_sleeper_leaves_the_others_alone() -> None:
    gone = asyncio.create_task(sleep_to_tick(0.05))
    stays = asyncio.create_task(sleep_to_tick(0.05))
    await asyncio.sleep(0)
    gone.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await gone
    when = await asyncio.wait_for(stays, 1)
    assert gone.cancelled() and when > 0
    # and a new sleep after that instant waits for the next one
    assert await asyncio.wait_for(sleep_to_tick(0.05), 1) > when
