"""Admission: at most `limit` requests in flight, then a FIFO queue with a deadline.

The limit is the configured `max_concurrency` times a factor (1.0 normally; the thermal
policy lowers it); a reload changes the configured part and keeps the factor. Slots are handed
over in order: a request leaving gives its slot to the oldest waiter, so `inflight` is exact
at every moment. Runs on the gate loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque


class Rejected(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _granted(fut: asyncio.Future[None]) -> bool:
    return fut.done() and not fut.cancelled() and fut.exception() is None


class Admission:
    def __init__(self, max_concurrency: int, max_queue: int, queue_timeout_s: float) -> None:
        self.configured = max_concurrency
        self.factor = 1.0
        self.limit = max(1, max_concurrency)  # configured x factor (kept: read per request)
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.inflight = 0
        self._queue: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def configure(self, max_concurrency: int, max_queue: int, queue_timeout_s: float) -> None:
        self.configured = max_concurrency
        self.limit = max(1, math.floor(self.configured * self.factor))
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self._hand_out()

    def set_factor(self, factor: float) -> None:
        self.factor = min(1.0, max(0.0, factor))
        self.limit = max(1, math.floor(self.configured * self.factor))
        self._hand_out()

    async def acquire(self) -> None:
        """Take a slot, waiting in the FIFO queue if need be; Rejected("queue_full" |
        "queue_timeout"), or whatever `reject_waiting` says."""
        if self.inflight < self.limit and not self._queue:
            self.inflight += 1
            return
        if len(self._queue) >= self.max_queue:
            raise Rejected("queue_full")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(fut)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await fut
        except TimeoutError:
            if _granted(fut):
                return  # the slot came just as the deadline passed: take it
            raise Rejected("queue_timeout") from None
        except asyncio.CancelledError:
            if _granted(fut):  # the client left after being given a slot: give it back
                self.release()
            raise
        finally:
            if not fut.done():
                fut.cancel()
            with contextlib.suppress(ValueError):
                self._queue.remove(fut)

    def release(self) -> None:
        self.inflight -= 1
        if self._queue:
            self._hand_out()

    def reject_waiting(self, reason: str) -> None:
        """Everyone in the queue re-decides now (the gate closed: backup, or 503)."""
        while self._queue:
            fut = self._queue.popleft()
            if not fut.done():
                fut.set_exception(Rejected(reason))

    def _hand_out(self) -> None:
        while self._queue and self.inflight < self.limit:
            fut = self._queue.popleft()
            if not fut.done():
                self.inflight += 1  # handed over: the waiter owns this slot
                fut.set_result(None)
