"""Owns the service actors and the GPU hub; host-wide mode, status, reload."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from .config import Config, GateSection
from .errors import ControlError
from .gate import Gate, GateHost
from .plan import ServicePlan
from .sensors.hub import GpuHub, GpuSnapshot
from .service import Prober, ServiceActor
from .spawn import Spawner
from .states import State

log = logging.getLogger(__name__)

MODES = ("normal", "on_battery", "draining", "shutting_down", "powered_down")


def _without_gate(plan: ServicePlan) -> ServicePlan:
    return dataclasses.replace(plan, config=dataclasses.replace(plan.config, gate=None))


def pick_free_port(exclude: set[int]) -> int:
    """A free loopback port below the ephemeral range (where a probe's connect() to a port
    nobody listens on yet could connect a socket to itself)."""
    import random
    import socket

    for _ in range(2000):
        port = random.randint(20000, 32000)
        if port in exclude:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise ControlError("failed", "no free port found for the replacement instance")


def thermal_state(snap: GpuSnapshot) -> str:
    """ok | lost | unresponsive (warm/throttled/critical come with the thermal policy)."""
    return {"lost": "lost", "unresponsive": "unresponsive",
            "error": "unresponsive"}.get(snap.status, "ok")


@dataclass
class LoopStats:
    lag_s: float = 0.0
    last_tick: float = 0.0
    watchdog_pings: int = 0


@dataclass
class ReloadResult:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    swapped: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return {"added": self.added, "removed": self.removed, "restarted": self.restarted,
                "swapped": self.swapped, "unchanged": self.unchanged,
                "warnings": self.warnings}


class Supervisor:
    def __init__(
        self,
        cfg: Config,
        plans: list[ServicePlan],
        hub: GpuHub,
        spawner: Spawner,
        prober: Prober,
        *,
        base_env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        gates: GateHost | None = None,
    ) -> None:
        self.cfg = cfg
        self.gates = gates
        self._pushed: dict[str, tuple[tuple[str, int] | None, tuple[str, int] | None]] = {}
        self.hub = hub
        self.spawner = spawner
        self.prober = prober
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._clock = clock
        self.mode = "normal"
        self.started_at = clock()
        self.loop = LoopStats(last_tick=clock())
        self.actors: dict[str, ServiceActor] = {}
        self._listeners: list[Callable[[], None]] = []
        for plan in plans:
            self.actors[plan.name] = self._make_actor(plan)

    def _make_actor(self, plan: ServicePlan) -> ServiceActor:
        return ServiceActor(plan, self.spawner, self.prober, base_env=self._base_env,
                            on_change=lambda _a: self._changed(), clock=self._clock)

    def on_change(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    def _changed(self) -> None:
        self._sync_gates()
        for fn in self._listeners:
            fn()

    # --- gates ---------------------------------------------------------------------------

    def gate_of(self, name: str) -> Gate | None:
        return None if self.gates is None else self.gates.gates.get(name)

    async def start_gates(self) -> None:
        """Bind every configured gate (closed until its service is ready)."""
        for actor in self.actors.values():
            if actor.cfg.gate is not None and self.gate_of(actor.name) is None:
                if self.gates is None:
                    self.gates = GateHost()
                await self.gates.add(actor.name, actor.cfg.gate)
        self._sync_gates()

    def _upstream(self, name: str | None) -> tuple[str, int] | None:
        actor = self.actors.get(name) if name else None
        if actor is None or actor.port is None:
            return None
        if actor.state in (State.READY, State.DRAINING):
            return ("127.0.0.1", actor.port)
        return None

    def _sync_gates(self) -> None:
        """Point each gate at its service while it is ready (and at its backup's)."""
        if self.gates is None:
            return
        for name, gate in self.gates.gates.items():
            actor = self.actors.get(name)
            if actor is None or actor.cfg.gate is None:
                continue
            wanted = (self._upstream(name), self._upstream(actor.cfg.gate.backup))
            if self._pushed.get(name) != wanted:
                self._pushed[name] = wanted
                self.gates.call(gate.set_upstreams, *wanted)

    async def drain(self, names: list[str], timeout_s: float) -> dict[str, int]:
        """Close the gates to new requests; wait until nothing is in flight. Returns what is
        still in flight per service when the time is up (empty: all drained)."""
        gates = []
        for name in names:
            gate = self.gate_of(name)
            if gate is None:
                raise ControlError("failed", f"{name} has no gate ([service.gate] in the config)")
            gates.append((name, gate))
        assert self.gates is not None
        for name, gate in gates:
            await self.gates.run(gate.drain)
            await self.actor(name).command("drain")
        waits = [self.gates.submit(gate.wait_idle(gate.is_idle)) for _name, gate in gates]
        _done, pending = await asyncio.wait(waits, timeout=timeout_s)
        for fut in pending:
            fut.cancel()
        return {name: gate.inflight for name, gate in gates if gate.inflight}

    async def swap(self, name: str, plan: ServicePlan | None = None,
                   timeout_s: float | None = None) -> dict[str, Any]:
        """Hot swap: start a second instance on the other port, switch the gate to it once it
        is ready, let the old one finish its requests, then stop it."""
        old = self.actor(name)
        gate = self.gate_of(name)
        if gate is None or self.gates is None or old.cfg.gate is None:
            raise ControlError("failed", f"{name} has no gate ([service.gate] in the config): "
                               "use `llmctl restart`")
        if old.state is not State.READY:
            raise ControlError("failed", f"{name} is {old.state}, not ready: nothing to swap "
                               "(use `llmctl restart`)")
        plan = plan or old.plan
        gcfg = old.cfg.gate
        ports = (plan.config.port, gcfg.swap_port)
        if old.port == ports[0] and ports[1] is not None:
            new_port = ports[1]
        elif old.port != ports[0] and ports[0] is not None:
            new_port = ports[0]
        else:
            new_port = pick_free_port(exclude={old.port or 0, gcfg.listen.port})
        log.info("%s: hot swap: second instance on port %d", name, new_port)
        new = self._make_actor(plan)
        new.port = new_port
        new.counters = old.counters
        new.restart_count = old.restart_count
        new.run()
        await new.command("start")
        limit = timeout_s or (plan.config.health.startup_timeout_s + 5.0)
        try:
            state = await new.wait_settled(0, limit)
        except TimeoutError:
            state = new.state
        if state is not State.READY:
            why = new.failed_reason or new.last_exit or f"not ready after {limit:g} s"
            await self._stop_actor(new)
            await new.shutdown()
            raise ControlError("failed", f"{name}: the replacement did not become ready "
                               f"({state}: {why}); the old instance keeps serving")
        old_up = ("127.0.0.1", old.port or 0)
        self.actors[name] = new  # the gate follows the service's actor: switched atomically
        self._changed()
        drain_s = self.cfg.power.drain_timeout_s
        try:
            await asyncio.wait_for(self.gates.submit(
                gate.wait_idle(lambda: gate.by_upstream.get(old_up, 0) == 0)), drain_s)
        except TimeoutError:
            log.warning("%s: hot swap: %d requests still on the old instance after %g s; "
                        "stopping it", name, gate.by_upstream.get(old_up, 0), drain_s)
        await self._stop_actor(old)
        await old.shutdown()
        log.info("%s: hot swap done: port %s -> %d", name, old.port, new_port)
        return {"service": name, "old_port": old.port, "port": new_port,
                "state": new.state.value}

    async def resume(self, names: list[str]) -> None:
        for name in names:
            gate = self.gate_of(name)
            if gate is None:
                raise ControlError("failed", f"{name} has no gate ([service.gate] in the config)")
            assert self.gates is not None
            await self.gates.run(gate.resume)
            await self.actor(name).command("resume")

    # --- lifecycle ---------------------------------------------------------------------------

    async def start_all(self) -> None:
        """Launch every service in config order (not waiting for the models to load)."""
        for actor in list(self.actors.values()):
            if not actor.alive:
                actor.run()
            await actor.command("start")

    async def stop_all(self) -> None:
        """Graceful: stop services in reverse config order, each within its stop timeout."""
        self.mode = "shutting_down"
        self._changed()
        gated = [a.name for a in self.actors.values() if self.gate_of(a.name) is not None]
        if gated:
            left = await self.drain(gated, self.cfg.power.drain_timeout_s)
            if left:
                log.warning("stopping with requests still in flight after %g s: %s",
                            self.cfg.power.drain_timeout_s,
                            ", ".join(f"{n} {c}" for n, c in left.items()))
        for actor in reversed(list(self.actors.values())):
            await self._stop_actor(actor)

    async def _stop_actor(self, actor: ServiceActor) -> None:
        if not actor.alive:
            return
        await actor.command("stop")
        try:
            await actor.wait_stopped(actor.cfg.stop.timeout_s + 5.0)
        except TimeoutError:
            log.error("%s: did not stop in time; killing its process group", actor.name)
            actor.kill_now()
            with contextlib.suppress(TimeoutError):
                await actor.wait_stopped(5.0)

    def kill_all(self) -> None:
        """Fast stop (second SIGTERM): SIGKILL every process group now."""
        self.mode = "shutting_down"
        for actor in self.actors.values():
            actor.kill_now()
        self.spawner.kill_all()

    async def close(self) -> None:
        for actor in self.actors.values():
            await actor.shutdown()
        if self.gates is not None:
            await self.gates.close()

    def tasks_alive(self) -> bool:
        return all(a.alive for a in self.actors.values())

    # --- queries -----------------------------------------------------------------------------

    def actor(self, name: str) -> ServiceActor:
        try:
            return self.actors[name]
        except KeyError:
            known = ", ".join(self.actors) or "none configured"
            raise ControlError("unknown_service",
                               f"no service named {name!r} (services: {known})") from None

    def any_failed(self) -> bool:
        return any(a.state is State.FAILED for a in self.actors.values())

    def gpu_status(self, snap: GpuSnapshot, now: float) -> dict[str, Any]:
        g, r = snap.info, snap.reading
        fresh = snap.status == "ok"
        thermal = thermal_state(snap)
        return {
            "index": g.index,
            "uuid": g.uuid,
            "name": g.name,
            "pci_bus_id": g.pci_bus_id,
            "numa_node": g.numa_node,
            "temperature_c": r.temperature_c if r and fresh else None,
            "memory_temperature_c": r.memory_temperature_c if r and fresh else None,
            "power_w": r.power_w if r and fresh else None,
            "power_limit_w": snap.power_limit_w,
            "default_power_limit_w": g.default_power_limit_w,
            "utilization_pct": r.utilization_pct if r and fresh else None,
            "memory_used_bytes": r.memory_used_bytes if r and fresh else None,
            "memory_total_bytes": g.memory_total_bytes,
            "thermal_state": thermal,
            "thresholds": {"slowdown_c": g.slowdown_c, "shutdown_c": g.shutdown_c},
            "reading_age_s": None if snap.read_at is None else round(now - snap.read_at, 3),
            "error": snap.error,
        }

    def status(self, service: str | None = None) -> dict[str, Any]:
        now = self._clock()
        actors = [self.actor(service)] if service is not None else list(self.actors.values())
        return {
            "supervisor": {
                "version": __version__,
                "pid": os.getpid(),
                "uptime_s": round(now - self.started_at, 3),
                "config_path": self.cfg.path,
                "mode": self.mode,
                "gpu_backend": self.hub.backend.name,
                "loop_lag_s": round(self.loop.lag_s, 6),
            },
            "services": [self._service_status(a, now) for a in actors],
            "gpus": [self.gpu_status(s, now) for s in self.hub.snapshots()],
            "power": {
                "source": "none",
                "ups": None,
                "status": None,
                "charge_pct": None,
                "runtime_s": None,
                "state": "unknown",
            },
        }

    def _service_status(self, actor: ServiceActor, now: float) -> dict[str, Any]:
        data = actor.status(now)
        gate = self.gate_of(actor.name)
        if gate is not None:
            data["inflight"] = gate.inflight
            data["gate"] = gate.state
            data["gate_listen"] = str(actor.cfg.gate.listen) if actor.cfg.gate else None
            data["queued"] = gate.queued
            data["max_concurrency"] = gate.limit
        return data

    def status_line(self) -> str:
        """The systemd STATUS= text: "3/4 services ready; GPU0 62C"."""
        ready = sum(1 for a in self.actors.values() if a.state is State.READY)
        parts = [f"{ready}/{len(self.actors)} services ready"]
        failed = [a.name for a in self.actors.values() if a.state is State.FAILED]
        if failed:
            parts.append("failed: " + ",".join(failed))
        for snap in self.hub.snapshots():
            r = snap.reading
            if snap.status != "ok":
                parts.append(f"GPU{snap.info.index} {snap.status}")
            elif r is not None and r.temperature_c is not None:
                parts.append(f"GPU{snap.info.index} {r.temperature_c:.0f}C")
        if self.mode != "normal":
            parts.append(self.mode)
        return "; ".join(parts)

    # --- reload ------------------------------------------------------------------------------

    async def reload(self, cfg: Config, plans: list[ServicePlan]) -> ReloadResult:
        """Apply a validated config: restart only what changed, keep the rest running."""
        res = ReloadResult()
        old = self.cfg
        for section in ("supervisor", "metrics", "gpu"):
            if getattr(old, section) != getattr(cfg, section):
                res.warnings.append(f"[{section}] changed: takes effect at the next restart "
                                    "of llm-supervisor")
        new_plans = {p.name: p for p in plans}
        old_gates = {name: a.cfg.gate for name, a in self.actors.items()}
        for name in [n for n in self.actors if n not in new_plans]:
            actor = self.actors.pop(name)
            await self._stop_actor(actor)
            await actor.shutdown()
            res.removed.append(name)
        actors: dict[str, ServiceActor] = {}
        to_start: list[ServiceActor] = []
        for name, plan in new_plans.items():
            current = self.actors.get(name)
            if current is None:
                actor = self._make_actor(plan)
                actor.run()
                to_start.append(actor)
                res.added.append(name)
            elif current.plan == plan:
                actor = current
                res.unchanged.append(name)
            elif _without_gate(current.plan) == _without_gate(plan):
                # only [service.gate] changed: the server keeps running, the gate is redone
                current.plan, current.cfg = plan, plan.config
                actor = current
                res.unchanged.append(name)
            elif (current.cfg.gate is not None and current.cfg.gate == plan.config.gate
                  and current.state is State.READY and self.gate_of(name) is not None):
                # behind an unchanged gate: hot swap, no request lost
                try:
                    await self.swap(name, plan)
                    res.swapped.append(name)
                except ControlError as exc:
                    res.warnings.append(f"{name}: hot swap failed ({exc.message}); the old "
                                        "instance keeps serving with the old configuration")
                actor = self.actors[name]
            else:
                wanted = current.desired_up
                await self._stop_actor(current)
                await current.shutdown()
                actor = self._make_actor(plan)
                actor.run()
                if wanted:
                    to_start.append(actor)
                res.restarted.append(name)
            actors[name] = actor
        self.actors = actors
        self.cfg = cfg
        await self._reconcile_gates(old_gates)
        for actor in to_start:
            await actor.command("start")
        self._changed()
        return res

    async def _reconcile_gates(self, old: dict[str, GateSection | None]) -> None:
        """After a reload: new gates bind, removed ones close, changed limits apply live; a
        gate whose listen address changed is closed and bound again."""
        for name, was in old.items():
            now = self.actors[name].cfg.gate if name in self.actors else None
            gate = self.gate_of(name)
            if gate is None or self.gates is None or was == now:
                continue
            if now is not None and was is not None and now.listen == was.listen:
                self.gates.call(gate.reconfigure, now)
            else:
                log.info("%s: gate %s closed%s", name, was.listen if was else "-",
                         f"; it moves to {now.listen}" if now else "")
                await self.gates.remove(name)
                self._pushed.pop(name, None)
        await self.start_gates()

    # --- the loop monitor --------------------------------------------------------------------

    async def monitor_loop(self, interval_s: float = 0.25) -> None:
        """Measure event-loop lag: how late a timer fires."""
        while True:
            before = self._clock()
            await asyncio.sleep(interval_s)
            now = self._clock()
            lag = max(0.0, now - before - interval_s)
            self.loop.lag_s = lag
            self.loop.last_tick = now
