"""Who wants which model: the one owner of "service X is wanted".

A demand is made by a request that found an on-demand service not loaded (its gate asks, from
the gate loop), by an operator's `llmctl start` (pinned), or by a reload that made an
on-demand service `always` (forced). Each gate also says how many of its requests wait for its
service to load. The swapper serves the demands; whatever it decides, it reads who still waits
here, not in another thread's counters. Every change wakes the swapper (no polling).

Runs on the daemon's loop; the `*_threadsafe` entry points are for the gate loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

log = logging.getLogger(__name__)

# a demand whose requests all gave up ends this long after the last one asked (a request on
# its way into the gate has asked already, but is not counted as waiting yet)
WANTED_GRACE_S: Final = 1.0


@dataclass
class Pending:
    """A demand not served yet."""

    since: float
    last: float  # the last request that asked (its deadline runs from here)
    model: str | None
    pin: bool = False
    force: bool = False  # not an on-demand service (one a reload made `always`)
    waiters: list[asyncio.Future[str | None]] = field(default_factory=list)


class Wants:
    def __init__(self, accepts: Callable[[str, bool], bool],
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`accepts(name, force)`: whether `name` may be demanded (an on-demand service, or
        any service with `force`)."""
        self._accepts = accepts
        self._clock = clock
        self.pending: dict[str, Pending] = {}
        self.waiting: dict[str, int] = {}  # service -> requests waiting in its gate for it
        self.woken = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        with contextlib.suppress(RuntimeError):  # built outside a loop (tests)
            self._loop = asyncio.get_running_loop()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def poke(self) -> None:
        self.woken.set()

    # --- from the gate loop -----------------------------------------------------------------

    def ask_threadsafe(self, name: str, model: str | None) -> None:
        """A request found `name` not loaded."""
        self._call(self.ask, name, model)

    def waiting_threadsafe(self, name: str, count: int) -> None:
        """`count` requests now wait in `name`'s gate for it to load."""
        self._call(self.set_waiting, name, count)

    def _call(self, fn: Callable[..., object], *args: object) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(fn, *args)

    def set_waiting(self, name: str, count: int) -> None:
        """`count` requests now wait in `name`'s gate for it to load."""
        if count:
            self.waiting[name] = count
        else:
            self.waiting.pop(name, None)
        self.poke()

    # --- on the loop ----------------------------------------------------------------------

    def ask(self, name: str, model: str | None, pin: bool = False,
            force: bool = False) -> Pending | None:
        """Want `name` loaded (held `idle` until there is room); None if it cannot be asked
        for (not an on-demand service, unless `force`)."""
        if not self._accepts(name, force):
            return None
        now = self._clock()
        p = self.pending.get(name)
        if p is None:
            p = self.pending[name] = Pending(now, now, model, pin, force)
            log.info("%s: requested%s; loading it", name, f" (model {model})" if model else "")
        else:
            p.last = now
            p.pin = p.pin or pin
            p.force = p.force or force
        self.poke()
        return p

    def wanted(self, name: str, now: float | None = None) -> bool:
        """Whether somebody still waits for `name`: an operator's start, or a request in its
        gate (or one that asked within WANTED_GRACE_S). A client that gives up cancels nothing
        by itself, but when the last one has gone, the demand ends: no model is loaded, and
        none drained, for nobody."""
        p = self.pending.get(name)
        if p is None:
            return False
        if p.pin or p.force or p.waiters or self.waiting.get(name, 0) > 0:
            return True
        return (self._clock() if now is None else now) - p.last < WANTED_GRACE_S

    def waits(self, name: str) -> bool:
        """Requests wait in the gate for `name` to load."""
        return self.waiting.get(name, 0) > 0

    def settle(self, name: str, why: str | None) -> None:
        """The demand for `name` is over: loaded (None), or why not."""
        p = self.pending.pop(name, None)
        if p is not None:
            settle(p, why)

    def settle_all(self, why: str) -> None:
        for name in list(self.pending):
            self.settle(name, why)


def settle(p: Pending, why: str | None) -> None:
    for fut in p.waiters:
        if not fut.done():
            fut.set_result(why)
    p.waiters.clear()
