"""Runs every gate on one event loop in a thread of its own, so that a flood of requests never
delays the supervisor's loop (watchdog, sensor polls, health checks) by more than the
interpreter's thread switch interval. The supervisor drives the gates only through these
methods, which hop onto the gate loop; it reads their counters directly (ints and locked
histograms, consistent under the GIL)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar

from ..config import GateSection, RouterSection
from ..logs import LogLimiter
from .door import Door
from .proxy import Gate, GateEntry
from .router import Router
from .server import Listener, open_listener
from .upstream import UpstreamPool

T = TypeVar("T")
REMOVE_GRACE_S: Final = 10.0  # requests in progress on a gate being removed
CLOSE_GRACE_S: Final = 2.0  # at exit (the gates were drained before)


async def finish_gate(gate: Gate | None, listener: Listener | None, grace_s: float) -> None:
    """A gate being closed: its listener stops accepting and what it serves finishes (or, a
    gate behind the router only, its requests), for at most `grace_s`."""
    if listener is not None:
        await listener.close(grace_s)
    elif gate is not None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                await gate.wait_idle(gate.is_idle)


class GateHost:
    def __init__(self) -> None:
        self.gates: dict[str, Gate] = {}
        self._listeners: dict[str, Listener] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pool: UpstreamPool | None = None
        self._ready = threading.Event()
        self.limiter = LogLimiter("supervisord_llm.gate")
        self.router: Router | None = None
        self._router_listener: Listener | None = None
        self.door = Door()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="gate-loop", daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._ready.set()
        loop.run_forever()
        loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Run a coroutine on the gate loop; await the result from the supervisor's loop."""
        cfut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return asyncio.wrap_future(cfut)

    def call(self, fn: Callable[..., None], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    async def run(self, fn: Callable[..., None], *args: Any) -> None:
        """Like `call`, and wait until it has run on the gate loop."""

        async def step() -> None:
            fn(*args)

        await self.submit(step())

    async def add(self, name: str, cfg: GateSection) -> Gate:
        self.start()
        return await self.submit(self._add(name, cfg))

    async def _add(self, name: str, cfg: GateSection) -> Gate:
        if self._pool is None:
            self._pool = UpstreamPool()
        gate = Gate(name, cfg, self._pool, self.limiter, self.door)
        if cfg.listen is not None:  # else reachable through the router only
            self._listeners[name] = open_listener(GateEntry(gate), cfg.listen.host, cfg.listen.port,
                                                  f"{name}'s gate {cfg.listen}")
        self.gates[name] = gate
        return gate

    async def rebind(self, name: str, cfg: GateSection) -> None:
        """Move a gate to a new listen address: the new one is bound first (StartupError, and
        nothing changes, if it cannot be), then the old one stops accepting and finishes what
        it serves; the gate keeps its state, drain reasons, limit factor and counters."""
        await self.submit(self._rebind(name, cfg))

    async def _rebind(self, name: str, cfg: GateSection) -> None:
        gate = self.gates[name]
        old = self._listeners.pop(name, None)
        if cfg.listen is not None:
            was = gate.cfg.listen or "the router only"
            try:
                self._listeners[name] = open_listener(
                    GateEntry(gate), cfg.listen.host, cfg.listen.port,
                    f"{name}'s gate {cfg.listen} (it stays on {was})")
            except BaseException:
                if old is not None:
                    self._listeners[name] = old
                raise
        gate.reconfigure(cfg)
        if old is not None:
            await old.close(REMOVE_GRACE_S)

    async def set_router(self, cfg: RouterSection | None,
                         catalog: tuple[dict[str, str], list[dict[str, object]]] | None = None
                         ) -> None:
        """Start, move, reconfigure or close the router (StartupError if its new address
        cannot be bound: the old one stays); `catalog`: its models, before it listens."""
        self.start()
        await self.submit(self._set_router(cfg, catalog))

    async def _set_router(self, cfg: RouterSection | None,
                          catalog: tuple[dict[str, str], list[dict[str, object]]] | None
                          ) -> None:
        old = self._router_listener
        if cfg is None:
            self.router = None
            self._router_listener = None
            if old is not None:
                await old.close(REMOVE_GRACE_S)
            return
        if self.router is None:
            self.router = Router(cfg, self.gates, self.limiter, self.door)
        if catalog is not None:
            self.router.set_catalog(*catalog)
        if old is not None and self.router.cfg.listen == cfg.listen:
            self.router.reconfigure(cfg)
            return
        was = self.router.cfg.listen
        self._router_listener = open_listener(
            self.router, cfg.listen.host, cfg.listen.port,
            f"router.listen {cfg.listen}" + (f" (it stays on {was})" if old else ""))
        self.router.reconfigure(cfg)
        if old is not None:
            await old.close(REMOVE_GRACE_S)

    async def remove(self, name: str) -> None:
        await self.submit(self._remove(name, REMOVE_GRACE_S))

    async def _remove(self, name: str, grace_s: float) -> None:
        await finish_gate(self.gates.pop(name, None), self._listeners.pop(name, None), grace_s)

    async def close(self) -> None:
        if self._loop is None:
            return
        await self.submit(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5)
        self._loop = None
        self._thread = None

    async def _close(self) -> None:
        listener = self._router_listener
        if listener is not None:
            self._router_listener = None
            await listener.close(CLOSE_GRACE_S)
        await asyncio.gather(*(self._remove(n, CLOSE_GRACE_S) for n in list(self.gates)))
        if self._pool is not None:
            self._pool.close()
            self._pool = None
