"""The host actor: the one owner of host-wide operations and of the host's mode.

Control commands, signals (and, later, the thermal and power policies) reach it as commands
on one queue. A long operation (reload, hot swap, drain, shutdown) runs as a task of its own,
so the queue keeps moving; `shutdown` pre-empts them: the operations in progress are
cancelled (each stops what it had started), then the gates are drained and the services
stopped in reverse order. Operations on the same service are refused while one runs ("swap of
chat already in progress"); a reload excludes everything else. Only this actor changes the
registry and the mode; it talks to the services only through events.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from . import lifecycle as L
from . import protocol as P
from . import rollout
from .config import Config
from .errors import ControlError
from .modes import POWER_MODES, Mode, ModeError, check, derive
from .plan import ServicePlan
from .states import RestartReason
from .supervisor import SETTLE_GRACE_S, Supervisor

log = logging.getLogger(__name__)

Loader = Callable[[], Awaitable[tuple[Config, list[ServicePlan]]]]
ALL = "*"  # the key of an operation that involves every service (reload, shutdown)
ACTOR_REPLY_S = 60.0  # an actor takes an event within this (its launch may look up a user)


@dataclass
class Op:
    kind: str  # reload | swap | shutdown
    key: str  # a service name, or ALL
    task: asyncio.Task[Any]
    started: float = field(default_factory=time.monotonic)

    def describe(self) -> str:
        what = self.kind if self.key == ALL else f"{self.kind} of {self.key}"
        return f"{what} (running for {time.monotonic() - self.started:.0f} s)"


@dataclass
class _Cmd:
    fn: Callable[[], Awaitable[Any]]
    reply: asyncio.Future[Any]


def _settle(reply: asyncio.Future[Any], task: asyncio.Task[Any]) -> None:
    """Hand a task's outcome to whoever waits on `reply`."""
    if reply.done():
        return
    if task.cancelled():
        reply.set_exception(ControlError(P.FAILED, "cancelled: a power-down or a stop of "
                                         "llm-supervisor came first"))
    elif (exc := task.exception()) is not None:
        reply.set_exception(exc)
    else:
        reply.set_result(task.result())


async def _taken(names: list[str], handled: list[Awaitable[Any]]) -> None:
    """Wait (ACTOR_REPLY_S at most) until the services have taken an event."""
    try:
        async with asyncio.timeout(ACTOR_REPLY_S):
            await asyncio.gather(*handled)
    except TimeoutError:
        raise ControlError(P.TIMEOUT, f"the service(s) {', '.join(names)} did not take the "
                           f"command within {ACTOR_REPLY_S:g} s (a launch hanging in a "
                           "user lookup?); see `llmctl status`") from None


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class Host:
    def __init__(self, sup: Supervisor, load: Loader | None = None,
                 on_reload: Callable[[bool], None] | None = None) -> None:
        self.sup = sup
        self._load = load
        self._on_reload = on_reload or (lambda started: None)
        self.mode = Mode.NORMAL  # derived from the three below; written only here
        self._power_mode: Mode | None = None  # the power controller's phase
        self._hot = False  # the GPU guard: a GPU is throttled or critical
        self.ops: dict[str, Op] = {}
        self._queue: asyncio.Queue[_Cmd] = asyncio.Queue()
        self._shutdown: asyncio.Task[None] | None = None
        self.stopped = asyncio.Event()
        self.handing_over = False  # `llmctl handover`: exit, leaving the models running
        self.under_systemd = False  # a unit: `systemctl restart` hands over, not llmctl
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    # --- the queue ---------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            cmd = await self._queue.get()
            if cmd.reply.done():
                continue
            try:
                await cmd.fn()  # quick: checks, state changes, starting tasks
            except BaseException as exc:
                if not cmd.reply.done():
                    cmd.reply.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise

    async def _submit(self, fn: Callable[[asyncio.Future[Any]], Awaitable[None]]) -> Any:
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Cmd(lambda: fn(reply), reply))
        return await reply

    def _refuse_if_busy(self, keys: list[str], what: str) -> None:
        if self._shutdown is not None:
            raise ControlError(P.FAILED, f"cannot {what}: llm-supervisor is shutting down")
        for key in keys:
            op = self.ops.get(key) or self.ops.get(ALL)
            if op is not None:
                raise ControlError(P.FAILED, f"cannot {what}: {op.describe()} is in "
                                   "progress; wait for it to finish")
        if ALL in keys and self.ops:
            op = next(iter(self.ops.values()))
            raise ControlError(P.FAILED, f"cannot {what}: {op.describe()} is in progress; "
                               "wait for it to finish")

    def _start_op(self, kind: str, key: str, coro: Awaitable[Any],
                  reply: asyncio.Future[Any]) -> None:
        async def body() -> Any:
            return await coro

        task = asyncio.get_running_loop().create_task(body(), name=f"op-{kind}-{key}")
        op = Op(kind, key, task)
        self.ops[key] = op

        def done(t: asyncio.Task[Any]) -> None:
            if self.ops.get(key) is op:
                del self.ops[key]
                self.changed()  # what waited for it looks again
            if t.cancelled() and not reply.done():
                reply.set_exception(ControlError(
                    P.FAILED, f"{op.describe()} was cancelled: a power-down or a stop of "
                    "llm-supervisor came first"))
            _settle(reply, t)

        task.add_done_callback(done)

    # --- the mode ------------------------------------------------------------------------------

    def set_power_mode(self, mode: Mode | None, why: str) -> None:
        """The power controller's phase: on battery, powering down, powered down; None when
        the power is on line."""
        if mode is not None and mode not in POWER_MODES:
            raise ValueError(f"not a power mode: {mode}")
        self._power_mode = mode
        self._set_mode(derive(self._shutdown is not None, mode, self._hot), why)

    def set_hot(self, hot: bool, why: str) -> None:
        """The GPU guard: whether a GPU is throttled (or critical)."""
        if hot != self._hot:
            self._hot = hot
            self._set_mode(derive(self._shutdown is not None, self._power_mode, hot), why)

    def _set_mode(self, new: Mode, why: str) -> None:
        try:
            check(self.mode, new)
        except ModeError as exc:
            log.error("%s (%s)", exc, why)
            return
        if new is not self.mode:
            log.info("mode %s -> %s (%s)", self.mode, new, why)
            self.mode = new
            self.changed()

    # --- service commands ---------------------------------------------------------------------

    async def command(self, names: list[str], event: L.Event, *,
                      internal: bool = False) -> dict[str, int]:
        """Send an event to services (start, stop, restart, reset, holds); refused while a
        swap or reload of one of them runs (unless `internal`: from the operation that runs,
        such as the power-down). Returns each one's generation before it, once they have
        handled it (the host's queue does not wait for them)."""

        async def fn(reply: asyncio.Future[Any]) -> None:
            if not internal:
                self._refuse_if_busy(names, f"{type(event).__name__.lower()} "
                                     f"{', '.join(names)}")
            actors = [self.sup.actor(n) for n in names]
            before = {a.name: a.gen for a in actors}
            reply.set_result((before, [a.queue(event) for a in actors]))

        before, handled = await self._submit(fn)
        await _taken(names, handled)
        result: dict[str, int] = before
        return result

    async def hold(self, names: list[str], reason: str) -> None:
        """Hold services down for `reason` (gpu_lost, cooling, powered_down): protective."""
        await self.protect(names, L.Stop(reason))

    async def protect(self, names: list[str], event: L.Event) -> None:
        """A protective command (a hold for a lost or critical GPU or for the power, a stop
        for heat): never refused as busy. A hot swap of one of these services is pre-empted
        (cancelled: it stops the replacement it started); a reload in progress goes on, and
        the hold reaches the services now (a reload keeps a service's holds)."""

        async def fn(reply: asyncio.Future[Any]) -> None:
            if self._shutdown is not None:
                raise ControlError(P.FAILED, "llm-supervisor is shutting down")
            for name in names:
                op = self.ops.get(name)
                if op is not None and op.kind == "swap" and not op.task.done():
                    why = getattr(event, "hold", None) or "heat"
                    log.warning("%s: %s pre-empted (held: %s)", name, op.describe(), why)
                    op.task.cancel()
            actors = [self.sup.actor(n) for n in names]
            reply.set_result([a.queue(event) for a in actors])

        await _taken(names, await self._submit(fn))

    async def release(self, names: list[str], reason: str) -> None:
        await self.command(names, L.Release(reason))

    async def restart(self, names: list[str], reason: RestartReason) -> dict[str, int]:
        return await self.command(names, L.Restart(reason))

    # --- gates ------------------------------------------------------------------------------

    def _gates(self, names: list[str]) -> list[tuple[str, Any]]:
        out = []
        for name in names:
            self.sup.actor(name)
            gate = self.sup.gate_of(name)
            if gate is None:
                raise ControlError(P.FAILED, f"{name} has no gate ([service.gate] in the config)")
            out.append((name, gate))
        return out

    async def drain(self, names: list[str], reason: str, timeout_s: float) -> dict[str, int]:
        """Close the gates for `reason`; wait until nothing is in flight. Returns what is still
        in flight per service when the time is up (empty: all drained)."""

        async def fn(reply: asyncio.Future[Any]) -> None:
            gates = self._gates(names)
            await self._close_gates(gates, reason)
            task = asyncio.get_running_loop().create_task(self._wait_idle(gates, timeout_s))
            task.add_done_callback(lambda t: _settle(reply, t))

        result: dict[str, int] = await self._submit(fn)
        return result

    async def drain_now(self, names: list[str], reason: str,
                        timeout_s: float) -> dict[str, int]:
        """`drain`, for the operation that runs (the power-down): not queued behind it.
        Returns what is still in flight per service when the time is up."""
        gates = self._gates(names)
        await self._close_gates(gates, reason)
        return await self._wait_idle(gates, timeout_s)

    async def resume(self, names: list[str], reason: str) -> None:
        """Remove `reason` from the gates' drain reasons (the others stay)."""

        async def fn(reply: asyncio.Future[Any]) -> None:
            gates = self._gates(names)
            assert self.sup.gates is not None
            for _name, gate in gates:
                await self.sup.gates.run(gate.resume, reason)
            self.sup.changed()
            await self.sup.gates_settled()
            reply.set_result(None)

        await self._submit(fn)

    async def set_limit_factor(self, name: str, factor: float) -> None:
        gate = self.sup.gate_of(name)
        if gate is not None and self.sup.gates is not None:
            await self.sup.gates.run(gate.set_limit_factor, factor)

    async def _close_gates(self, gates: list[tuple[str, Any]], reason: str) -> None:
        assert self.sup.gates is not None
        for _name, gate in gates:
            await self.sup.gates.run(gate.drain, reason)
        self.sup.changed()  # the services follow their gates (ready <-> draining)

    async def _wait_idle(self, gates: list[tuple[str, Any]], timeout_s: float) -> dict[str, int]:
        assert self.sup.gates is not None
        waits = {name: asyncio.ensure_future(gate.wait_idle(timeout_s=timeout_s))
                 for name, gate in gates}
        if waits:
            await asyncio.wait(waits.values(), timeout=timeout_s + 1)
        left = [(name, gate) for name, gate in gates
                if not (waits[name].done() and not waits[name].cancelled()
                        and waits[name].exception() is None and waits[name].result())]
        for fut in waits.values():
            fut.cancel()
        if left:
            await self.sup.gates.refresh()
        return {name: gate.inflight for name, gate in left if gate.inflight}

    # --- long operations -------------------------------------------------------------------

    async def swap(self, name: str, timeout_s: float | None) -> dict[str, Any]:
        async def fn(reply: asyncio.Future[Any]) -> None:
            self.sup.actor(name)
            self._refuse_if_busy([name], f"swap {name}")
            self._start_op("swap", name, rollout.swap(self.sup, name, None, timeout_s), reply)

        result: dict[str, Any] = await self._submit(fn)
        return result

    async def reload(self) -> dict[str, Any]:
        """Reloads wait for the operation in progress (a swap, another reload) and read the
        file when they start."""

        async def fn(reply: asyncio.Future[Any]) -> None:
            running = next(iter(self.ops.values()), None)
            if running is not None and self._shutdown is None:
                # after what runs (a swap, another reload), and reading the file then
                log.info("reload: waiting for %s", running.describe())
                running.task.add_done_callback(
                    lambda _t: self._queue.put_nowait(_Cmd(lambda: fn(reply), reply)))
                return
            self._refuse_if_busy([ALL], "reload")
            self._start_op("reload", ALL, self._reload(), reply)

        result: dict[str, Any] = await self._submit(fn)
        return result

    async def _reload(self) -> dict[str, Any]:
        assert self._load is not None
        self._on_reload(True)
        try:
            cfg, plans = await self._load()  # raises ControlError, the running config stays
            try:
                res = await rollout.reload(self.sup, cfg, plans)
            except ControlError as exc:
                log.error("reload: %s", exc.message)
                raise
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                why = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                log.error("reload: failed while applying the new configuration (%s); the "
                          "daemon keeps running, see `llmctl status`", why)
                log.debug("reload failure", exc_info=True)
                raise ControlError(P.FAILED, f"reload failed while applying the new "
                                   f"configuration ({why}); see `llmctl status`") from None
            for w in res.warnings:
                log.warning("reload: %s", w)
            for name, state in res.not_ready.items():
                log.warning("reload: %s is not ready: %s", name, state)
            log.info("reloaded: %s", res.summary())
            return res.as_dict()
        finally:
            self._on_reload(False)

    async def power_down(self, body: Callable[[], Awaitable[None]]) -> asyncio.Task[Any]:
        """Start the power-down sequence as the host's operation: a reload or swap in progress
        is cancelled first (the power wins; each stops what it had started), and no other
        operation starts while it runs. Returns its task (cancelled if the power returns in
        time, or by a daemon stop)."""

        async def fn(reply: asyncio.Future[Any]) -> None:
            if self._shutdown is not None:
                raise ControlError(P.FAILED, "llm-supervisor is shutting down")
            running = [op.task for op in self.ops.values()]
            for task in running:
                log.warning("power-down: cancelling %s", task.get_name())
                task.cancel()

            async def run() -> None:
                if running:
                    await asyncio.wait(running, timeout=30.0)
                await body()

            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            done.add_done_callback(_retrieve)
            self._start_op("power-down", ALL, run(), done)
            reply.set_result(self.ops[ALL].task)

        task: asyncio.Task[Any] = await self._submit(fn)
        return task

    def changed(self) -> None:
        """Something shown in STATUS= changed (a power-down step)."""
        for fn in self._listeners:
            fn()

    # --- stopping ------------------------------------------------------------------------------

    def handover(self) -> dict[str, Any]:
        """`llmctl handover`: the daemon exits and leaves every model running under its
        keeper for the next daemon (an upgrade without systemd), which adopts them within
        `adopt_grace_s`. Refused while something else is under way (a stop, a reload, a
        swap, a power-down): what it does would be cut in half."""
        if self._shutdown is not None or self.handing_over:
            raise ControlError(P.FAILED, "the daemon is stopping already")
        if self.under_systemd:
            raise ControlError(P.FAILED, "running under systemd: `systemctl restart "
                               "llm-supervisor` leaves the models to the next start (an exit "
                               "now would stop the unit, and with it the models)")
        busy = [op.describe() for op in self.ops.values() if not op.task.done()]
        if busy:
            raise ControlError(P.FAILED, f"{', '.join(busy)} in progress: hand over once it "
                               "is done")
        if self._power_mode is not None:
            raise ControlError(P.FAILED, f"power: {self._power_mode.value}: hand over once "
                               "the power is back on line")
        self.handing_over = True
        running = sorted(a.name for a in self.sup.all_actors() if a.proc is not None)
        log.warning("handing over: exiting and leaving %d model(s) to the next supervisor "
                    "(%s); they stop unless one starts within adopt_grace_s", len(running),
                    ", ".join(running) or "none")
        # the answer goes out first; then the main loop ends, stopping nothing
        asyncio.get_running_loop().call_later(0.2, self.stopped.set)
        return {"handover": True, "models": running}

    def shutdown(self, fast: bool = False) -> None:
        """From the signal loop: a graceful stop, or (again, or `fast`) SIGKILL everything."""
        if self._shutdown is None:
            self._shutdown = asyncio.get_running_loop().create_task(self._stop_all(),
                                                                     name="shutdown")
            self._set_mode(derive(True, self._power_mode, self._hot), "stop requested")
            self._shutdown.add_done_callback(lambda _t: self.stopped.set())
            if not fast:
                return
        log.warning("stop signal again: killing every service now")
        self.sup.kill_all()

    async def _stop_all(self) -> None:
        ops = [op.task for op in self.ops.values()]
        for task in ops:
            task.cancel()  # each stops what it had started
        if ops:
            longest = max((a.cfg.stop.timeout_s for a in self.sup.all_actors()), default=10.0)
            _done, pending = await asyncio.wait(ops, timeout=longest + 2 * SETTLE_GRACE_S)
            if pending:
                log.error("operations still running after their stop: %s",
                          ", ".join(t.get_name() for t in pending))
        sup = self.sup
        gated = [n for n in sup.actors if sup.gate_of(n) is not None]
        if gated:
            timeout = max(a.cfg.gate.drain_timeout_s for n, a in sup.actors.items()
                          if n in gated and a.cfg.gate is not None)
            left = await self.drain_now(gated, "shutdown", timeout)
            if left:
                log.warning("stopping with requests still in flight after %g s: %s", timeout,
                            ", ".join(f"{n} {c}" for n, c in left.items()))
        for actor in reversed(list(sup.actors.values())):
            await sup.stop_actor(actor)
