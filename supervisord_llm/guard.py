"""GPU protection: the thermal policy for every GPU, the power limits it changes (and their
restoration), and lost GPUs. It reads the hub's snapshots after every poll, asks the pure
policy (`policy/thermal.py`) what to do, and does it through the host actor (drains with
reason `thermal`, holds `cooling` and `gpu_lost`, the admission factor) and the hub (power
limits on the GPU's own thread). Nothing here blocks the loop; a long step (a drain before a
stop) runs as a task of its own.

Every power limit the supervisor changes is remembered in `state_dir/power_limits.json` (the
board's limit before the first change; written off the loop, atomically) and restored when the
daemon stops, or at its next start if it was killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from . import lifecycle as L
from .config import ThermalSection
from .errors import ControlError, SensorError
from .host import Host
from .logs import LogLimiter
from .modes import Mode
from .policy import thermal as T
from .sensors.base import GpuInfo, SensorBusyError
from .sensors.events import Back, Lost
from .sensors.hub import GpuHub, GpuSnapshot
from .supervisor import Supervisor

log = logging.getLogger(__name__)
LIMITS_FILE: Final = "power_limits.json"
ACTIONS: Final = ("power_down", "power_up", "admission_down", "admission_up", "pause",
                  "drain_restart", "stop", "escalate", "resume")


class LimitStore:
    """The board limits before the supervisor changed them, by GPU UUID, in a file."""

    def __init__(self, state_dir: str | None) -> None:
        self.path = Path(state_dir) / LIMITS_FILE if state_dir else None
        self.originals: dict[str, float] = {}
        self._lock = asyncio.Lock()

    async def load(self) -> dict[str, float]:
        if self.path is None:
            return {}
        path = self.path

        def read() -> dict[str, float]:
            try:
                if not path.is_file() or path.stat().st_size > 1024 * 1024:
                    return {}
                doc = json.loads(path.read_text())
            except (OSError, ValueError, RecursionError) as exc:
                log.warning("ignoring %s: %s", path, str(exc)[:200])
                return {}
            if not isinstance(doc, dict):
                return {}
            return {str(k): float(v) for k, v in doc.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0}

        return await asyncio.to_thread(read)

    async def remember(self, uuid: str, watts: float) -> None:
        if uuid not in self.originals:
            self.originals[uuid] = watts
            await self._write()

    async def forget(self, uuid: str) -> None:
        if self.originals.pop(uuid, None) is not None:
            await self._write()

    async def _write(self) -> None:
        if self.path is None:
            return
        path, text = self.path, json.dumps(self.originals, sort_keys=True)

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)

        async with self._lock:  # one writer at a time: the last state lands last
            try:
                await asyncio.to_thread(write)
            except OSError as exc:
                log.error("cannot record the power limits in %s: %s", path, exc)


class GpuGuard:
    def __init__(self, sup: Supervisor, host: Host, hub: GpuHub, cfg: ThermalSection,
                 store: LimitStore, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.sup = sup
        self.host = host
        self.hub = hub
        self._cfg = cfg
        self.store = store
        self._clock = clock
        self.states: dict[str, T.State] = {}
        self.targets: dict[str, float] = {}  # the power limit the policy set, while it holds
        self.lost: dict[str, str] = {}  # uuid -> why
        self.paused: dict[str, set[str]] = {}  # uuid -> services paused (pause)
        self.actions: dict[tuple[str, str], int] = {}  # (uuid, action) -> count
        self.limiter = LogLimiter(__name__)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._running: asyncio.Task[None] | None = None
        self._again = False
        self._closed = False

    # --- entry points ----------------------------------------------------------------------

    def poke(self) -> None:
        """After each poll: evaluate (one evaluation at a time; a poke meanwhile runs one
        more afterwards)."""
        if self._closed:
            return
        if self._running is not None and not self._running.done():
            self._again = True
            return
        self._running = asyncio.get_running_loop().create_task(self._evaluate_all(),
                                                                 name="gpu-guard")

    async def _evaluate_all(self) -> None:
        while True:
            self._again = False
            try:
                await self.evaluate()
            except Exception:
                self.limiter.exception("evaluate", "GPU protection: evaluation failed")
            if not self._again or self._closed:
                return

    async def evaluate(self) -> None:
        now = self._clock()
        for snap in self.hub.snapshots():
            if snap.info.uuid in self.lost:
                continue
            lim = self.limits(snap.info)
            if lim is None:
                continue
            uuid = snap.info.uuid
            state, actions = T.decide(self.states.get(uuid, T.State()),
                                      self._reading(snap, now), lim, now)
            self.states[uuid] = state
            for action in actions:
                await self._act(snap, lim, state, action)
        self._update_mode()

    # --- what the policy needs ----------------------------------------------------------------

    @property
    def cfg(self) -> ThermalSection:
        """The running configuration's [thermal] (a reload changes it live)."""
        cfg = getattr(self.sup.cfg, "thermal", None)
        return cfg if isinstance(cfg, ThermalSection) else self._cfg

    def limits(self, gpu: GpuInfo) -> T.Limits | None:
        c = self.cfg
        values = [th.resolve(gpu.slowdown_c, gpu.shutdown_c)
                  for th in (c.warn_c, c.throttle_c, c.critical_c, c.resume_c)]
        if any(v is None for v in values):
            return None  # relative thresholds, and the board reports no slowdown temperature
        warn, throttle, critical, resume = (float(v) for v in values if v is not None)
        return T.Limits(warn, throttle, critical, resume, c.power_step, c.min_power_fraction,
                        c.step_interval_s, c.pause_timeout_s, gpu.default_power_limit_w,
                        gpu.min_power_limit_w)

    def _reading(self, snap: GpuSnapshot, now: float) -> T.Reading:
        r = snap.reading
        max_age = 2 * self.hub.poll_interval_s + self.hub.call_timeout_s
        fresh = (snap.status == "ok" and r is not None and snap.read_at is not None
                 and now - snap.read_at <= max_age)
        temp = r.policy_c if r is not None else None
        inflight = 0
        for name in self.services_on(snap.info.uuid):
            gate = self.sup.gate_of(name)
            if gate is not None:
                inflight += gate.inflight
        return T.Reading(temp, fresh, snap.power_limit_w, inflight)

    def services_on(self, uuid: str) -> list[str]:
        return [name for name, a in self.sup.actors.items()
                if any(g.uuid == uuid for g in a.plan.gpus)]

    def _count(self, uuid: str, action: str) -> None:
        self.actions[(uuid, action)] = self.actions.get((uuid, action), 0) + 1

    # --- the actions ----------------------------------------------------------------------

    async def _act(self, snap: GpuSnapshot, lim: T.Limits, state: T.State,
                   action: T.Action) -> None:
        gpu = snap.info
        uuid, label = gpu.uuid, f"GPU{gpu.index}"
        if isinstance(action, T.LevelChanged):
            level = logging.WARNING if action.new in ("throttled", "critical") else logging.INFO
            log.log(level, "%s thermal %s -> %s at %.0f C (warn %g, throttle %g, critical %g, "
                    "resume %g C)", label, action.old, action.new, action.temperature_c,
                    lim.warn_c, lim.throttle_c, lim.critical_c, lim.resume_c)
        elif isinstance(action, T.SetPowerLimit):
            await self._set_limit(gpu, state, action)
        elif isinstance(action, T.SetFactor):
            await self._set_factors(uuid, action.factor)
        elif isinstance(action, T.Critical):
            self._critical(gpu, action.temperature_c, lim)
        elif isinstance(action, T.Escalate):
            self._escalate(gpu, action.critical_for_s)
        elif isinstance(action, T.Cooled):
            self._cooled(gpu, action.temperature_c)
        elif isinstance(action, T.TelemetryLost):
            log.warning("%s: telemetry lost while %s: the limits and pauses stay as they are "
                        "until readings come back", label, action.level)

    async def _set_limit(self, gpu: GpuInfo, state: T.State,
                         action: T.SetPowerLimit) -> None:
        uuid = gpu.uuid
        if not action.restore and state.original_w is not None:
            await self.store.remember(uuid, state.original_w)
        try:
            await self.hub.set_power_limit(gpu, action.watts)
        except SensorError as exc:
            self.limiter.warning(f"limit-{uuid}", "GPU%d: power limit %g W not set: %s",
                                 gpu.index, action.watts, exc)
            return
        if action.restore:
            self.targets.pop(uuid, None)
            await self.store.forget(uuid)
            self._count(uuid, "power_up")
            log.info("GPU%d: power limit restored to %g W", gpu.index, action.watts)
        else:
            down = uuid not in self.targets or action.watts < self.targets[uuid]
            self.targets[uuid] = action.watts
            self._count(uuid, "power_down" if down else "power_up")
            log.info("GPU%d: power limit %g W (default %s W)", gpu.index, action.watts,
                     f"{gpu.default_power_limit_w:g}" if gpu.default_power_limit_w else "-")

    def factor_of(self, name: str) -> float:
        """A service's admission factor: the lowest of its GPUs'."""
        actor = self.sup.actors.get(name)
        if actor is None:
            return 1.0
        factors = [1.0]
        for g in actor.plan.gpus:
            st = self.states.get(g.uuid)
            lim = self.limits(g)
            if st is not None and lim is not None:
                factors.append(st.factor(lim))
        return min(factors)

    async def _set_factors(self, uuid: str, factor: float) -> None:
        for name in self.services_on(uuid):
            if self.sup.gate_of(name) is not None:
                await self.host.set_limit_factor(name, self.factor_of(name))
        self._count(uuid, "admission_down" if factor < 1.0 else "admission_up")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _critical(self, gpu: GpuInfo, temp: float, lim: T.Limits) -> None:
        for name in self.services_on(gpu.uuid):
            gated = self.sup.gate_of(name) is not None
            action = self.cfg.critical_action(gated)
            log.error("GPU%d critical at %.0f C (critical %g C): %s %s", gpu.index, temp,
                      lim.critical_c, action, name)
            if action == "pause" and gated:
                self.paused.setdefault(gpu.uuid, set()).add(name)
                self._count(gpu.uuid, "pause")
                self._spawn(self._drain(name, 0.0), f"pause-{name}")
            elif action in ("drain-restart", "pause"):
                self._count(gpu.uuid, "drain_restart")
                self._spawn(self._drain_and_hold(name), f"drain-restart-{name}")
            elif action == "stop":
                self._count(gpu.uuid, "stop")
                why = (f"GPU{gpu.index} reached {temp:.0f} C (critical {lim.critical_c:g} C); "
                       f"`llmctl reset {name}` once it has cooled")
                self._spawn(self._drain_and_fail(name, why), f"stop-{name}")

    def _escalate(self, gpu: GpuInfo, critical_for_s: float) -> None:
        names = sorted(self.paused.pop(gpu.uuid, set()))
        if not names:
            return
        log.error("GPU%d critical for %.0f s with nothing in flight: something else heats it; "
                  "stopping %s until it cools", gpu.index, critical_for_s, ", ".join(names))
        self._count(gpu.uuid, "escalate")
        for name in names:
            self._spawn(self._drain_and_hold(name), f"escalate-{name}")

    def _cooled(self, gpu: GpuInfo, temp: float) -> None:
        self.paused.pop(gpu.uuid, None)
        names = self.services_on(gpu.uuid)
        log.info("GPU%d cooled to %.0f C: resuming %s", gpu.index, temp,
                 ", ".join(names) or "nothing")
        self._count(gpu.uuid, "resume")
        self._spawn(self._resume(names), f"cooled-GPU{gpu.index}")

    async def _drain(self, name: str, timeout_s: float) -> None:
        if self.sup.gate_of(name) is None:
            return
        with contextlib.suppress(ControlError):
            await self.host.drain([name], "thermal", timeout_s)

    async def _drain_and_hold(self, name: str) -> None:
        actor = self.sup.actors.get(name)
        gate = actor.cfg.gate if actor is not None else None
        await self._drain(name, gate.drain_timeout_s if gate is not None else 0.0)
        try:
            await self.host.hold([name], "cooling")
        except ControlError as exc:
            log.warning("%s: not held for cooling: %s", name, exc.message)

    async def _drain_and_fail(self, name: str, why: str) -> None:
        actor = self.sup.actors.get(name)
        gate = actor.cfg.gate if actor is not None else None
        await self._drain(name, gate.drain_timeout_s if gate is not None else 0.0)
        try:
            await self.host.command([name], L.StopFailed(why))
        except ControlError as exc:
            log.warning("%s: not stopped: %s", name, exc.message)
        if gate is not None:
            with contextlib.suppress(ControlError):
                await self.host.resume([name], "thermal")  # closed: it is failed now

    async def _resume(self, names: list[str]) -> None:
        held = [n for n in names if n in self.sup.actors
                and "cooling" in self.sup.actors[n].holds]
        if held:
            try:
                await self.host.release(held, "cooling")
            except ControlError as exc:
                log.warning("cooling hold not released: %s", exc.message)
        gated = [n for n in names if self.sup.gate_of(n) is not None]
        if gated:
            with contextlib.suppress(ControlError):
                await self.host.resume(gated, "thermal")

    # --- lost GPUs ------------------------------------------------------------------------

    def on_gpu_event(self, event: Lost | Back) -> None:
        """From `GpuEvents` (NVML Xids, udev, the hub's reads, a re-probe), on the loop."""
        gpu = next((g for g in self.hub.gpus if g.uuid == event.uuid), None)
        if gpu is None or self._closed:
            return
        coro = self.gpu_lost(gpu, event.why) if isinstance(event, Lost) else \
            self.gpu_back(gpu, event.why)
        self._spawn(coro, f"gpu-event-{gpu.index}")

    async def reprobe(self, probe: Callable[[GpuInfo], Awaitable[bool]],
                      interval_s: float) -> None:
        """Every `interval_s`, ask each lost GPU whether it answers again (a GPU that came back
        without a udev `add`: a reset, a driver reload)."""
        while not self._closed:
            await asyncio.sleep(interval_s)
            for gpu in self.hub.gpus:
                if gpu.uuid in self.lost:
                    try:
                        back = await probe(gpu)
                    except (SensorError, OSError):
                        back = False
                    if back:
                        await self.gpu_back(gpu, "it answers a re-probe")

    async def gpu_lost(self, gpu: GpuInfo, why: str) -> None:
        if gpu.uuid in self.lost:
            return
        self.lost[gpu.uuid] = why
        self.states.pop(gpu.uuid, None)
        self.targets.pop(gpu.uuid, None)
        names = self.services_on(gpu.uuid)
        log.error("GPU%d (%s) lost: %s; holding %s down until it is back", gpu.index,
                  gpu.uuid, why, ", ".join(names) or "nothing")
        if names:
            try:
                await self.host.hold(names, "gpu_lost")
            except ControlError as exc:
                log.warning("not held for the lost GPU: %s", exc.message)

    async def gpu_back(self, gpu: GpuInfo, why: str) -> None:
        if self.lost.pop(gpu.uuid, None) is None:
            return
        names = self.services_on(gpu.uuid)
        log.warning("GPU%d (%s) is back (%s): starting %s", gpu.index, gpu.uuid, why,
                    ", ".join(names) or "nothing")
        if names:
            try:
                await self.host.release(names, "gpu_lost")
            except ControlError as exc:
                log.warning("gpu_lost hold not released: %s", exc.message)

    # --- the mode, status, restoring -----------------------------------------------------

    def _update_mode(self) -> None:
        hot = any(st.level in ("throttled", "critical") for st in self.states.values())
        if hot and self.host.mode is Mode.NORMAL:
            self.host.set_mode(Mode.THROTTLED, "a GPU is throttled")
        elif not hot and self.host.mode is Mode.THROTTLED:
            self.host.set_mode(Mode.NORMAL, "no GPU is throttled")

    def thermal_state(self, snap: GpuSnapshot) -> str:
        """ok | warm | throttled | critical | lost | unresponsive."""
        if snap.status == "lost" or snap.info.uuid in self.lost:
            return "lost"
        if snap.status in ("unresponsive", "error"):
            return "unresponsive"
        st = self.states.get(snap.info.uuid)
        return st.level if st is not None else "ok"

    def gpu_status(self, snap: GpuSnapshot) -> dict[str, Any]:
        uuid = snap.info.uuid
        st = self.states.get(uuid, T.State())
        lim = self.limits(snap.info)
        return {
            "thermal_state": self.thermal_state(snap),
            "power_target_w": self.targets.get(uuid),
            "power_limit_before_w": self.store.originals.get(uuid),
            "throttle_steps": st.steps,
            "admission_factor": round(st.factor(lim), 3) if lim is not None else 1.0,
            "lost": self.lost.get(uuid),
            "thresholds": None if lim is None else {
                "warn_c": lim.warn_c, "throttle_c": lim.throttle_c,
                "critical_c": lim.critical_c, "resume_c": lim.resume_c},
        }

    async def restore_leftovers(self) -> None:
        """At start: limits an earlier run lowered and could not restore (it was killed)."""
        left = await self.store.load()
        by_uuid = {g.uuid: g for g in self.hub.gpus}
        for uuid, watts in left.items():
            gpu = by_uuid.get(uuid)
            if gpu is None:
                log.warning("power limit of %s (%g W) left by an earlier run: that GPU is not "
                            "here; forgotten", uuid, watts)
                continue
            try:
                await self._set_when_free(gpu, watts)
                log.warning("GPU%d: power limit restored to %g W (left lowered by an earlier "
                            "run)", gpu.index, watts)
            except SensorError as exc:
                log.error("GPU%d: cannot restore the power limit %g W left by an earlier run: "
                          "%s", gpu.index, watts, exc)
        self.store.originals = {}
        if left:
            await self.store._write()

    async def _set_when_free(self, gpu: GpuInfo, watts: float) -> None:
        """A limit call that waits (within two call deadlines) for a call in progress on the
        same GPU (a step the policy was taking) to end, instead of being refused as busy."""
        deadline = self._clock() + 2 * self.hub.call_timeout_s
        while True:
            try:
                await self.hub.set_power_limit(gpu, watts)
                return
            except SensorBusyError:
                if self._clock() > deadline:
                    raise
                await asyncio.sleep(0.02)

    async def restore_all(self) -> None:
        """At stop: every limit the policy changed goes back to what it was."""
        self._closed = True
        running = [t for t in (self._running, *self._tasks) if t is not None and not t.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=2 * self.hub.call_timeout_s)
        by_uuid = {g.uuid: g for g in self.hub.gpus}
        for uuid, watts in list(self.store.originals.items()):
            gpu = by_uuid.get(uuid)
            if gpu is None:
                continue
            try:
                await self._set_when_free(gpu, watts)
                log.info("GPU%d: power limit restored to %g W", gpu.index, watts)
                await self.store.forget(uuid)
            except SensorError as exc:
                log.error("GPU%d: cannot restore the power limit %g W: %s (it is restored at "
                          "the next start)", gpu.index, watts, exc)
