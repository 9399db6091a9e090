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
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from . import lifecycle as L
from .config import ThermalSection
from .errors import ControlError, SensorError
from .host import Host
from .logs import LogLimiter
from .policy import protect as PR
from .policy import thermal as T
from .sensors.base import GpuInfo, SensorBusyError
from .sensors.events import Back, Lost
from .sensors.hub import GpuHub, GpuSnapshot
from .statefile import Damaged, read_json, write_json
from .supervisor import Supervisor

log = logging.getLogger(__name__)
LIMITS_FILE: Final = "power_limits.json"
THERMAL: Final = "thermal"  # the gates' drain reason
RESTORE_RETRY_S: Final = 30.0
ACTIONS: Final = ("power_down", "power_up", "admission_down", "admission_up", "pause",
                  "drain_restart", "stop", "escalate", "resume")


class LimitStore:
    """Per GPU UUID: the board's limit before the supervisor changed it (`before`), and the
    last limits the supervisor asked for (`set`, to tell them from a limit an operator set
    while the daemon was down). Kept in a file, written off the loop, atomically; an entry
    stays until its limit is restored, also across a restart and while its GPU is away."""

    def __init__(self, state_dir: str | None) -> None:
        self.path = Path(state_dir) / LIMITS_FILE if state_dir else None
        self.entries: dict[str, dict[str, Any]] = {}
        self._lock = asyncio.Lock()

    @property
    def originals(self) -> dict[str, float]:
        return {uuid: float(e["before"]) for uuid, e in self.entries.items()}

    def ours(self, uuid: str) -> list[float]:
        return [float(w) for w in self.entries.get(uuid, {}).get("set", [])]

    async def load(self) -> Loaded:
        """What an earlier run left (also the older format, a bare `uuid: watts`). Good
        entries are kept whatever else the file holds; a bad entry, or a record that cannot be
        read at all, is said in `Loaded` so that the GPUs it may concern go back to their
        board's default limit."""
        if self.path is None:
            return Loaded({}, None, [])
        path = self.path

        def read() -> Loaded:
            try:
                doc = read_json(path)
            except Damaged as exc:
                return Loaded({}, str(exc), [])
            if doc is None:
                return Loaded({}, None, [])
            if not isinstance(doc, dict):
                return Loaded({}, f"holds {type(doc).__name__}, not a table of GPUs", [])
            out: dict[str, dict[str, Any]] = {}
            bad: list[str] = []
            for uuid, v in list(doc.items())[:1024]:
                before = v.get("before") if isinstance(v, dict) else v
                raw = v.get("set", []) if isinstance(v, dict) else []
                if not _watts(before) or not isinstance(raw, list) \
                        or not all(_watts(w) for w in raw):
                    bad.append(str(uuid)[:200])
                    continue
                assert isinstance(before, (int, float))  # _watts says so
                out[str(uuid)[:200]] = {"before": float(before),
                                        "set": [float(w) for w in raw][-2:]}
            return Loaded(out, None, bad)

        return await asyncio.to_thread(read)

    async def remember(self, uuid: str, before: float, target: float) -> bool:
        """Before a limit is set: record it. False (nothing changed) when it cannot be
        written: then the limit must not be set, as nothing could restore it after a crash."""
        old = self.entries.get(uuid)
        entry = {"before": old["before"] if old else before,
                 "set": [*(old["set"] if old else []), target][-2:]}
        self.entries[uuid] = entry
        if await self.save():
            return True
        if old is None:
            self.entries.pop(uuid, None)
        else:
            self.entries[uuid] = old
        return False

    async def forget(self, uuid: str) -> None:
        if self.entries.pop(uuid, None) is not None:
            await self.save()

    async def save(self) -> bool:
        """Write the entries (False, and said once per failure, when they cannot be)."""
        if self.path is None:
            return True
        path, doc = self.path, dict(self.entries)
        async with self._lock:  # one writer at a time: the last state lands last
            try:
                await asyncio.to_thread(write_json, path, doc)
                return True
            except OSError as exc:
                log.error("cannot record the power limits in %s: %s", path, exc)
                return False

@dataclass(frozen=True)
class Loaded:
    entries: dict[str, dict[str, Any]]  # the good entries
    damaged: str | None  # why the record as a whole cannot be trusted
    bad: list[str]  # UUIDs whose own entry is not a limit


def _watts(v: object) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v) and 0 < v < 100_000
    except OverflowError:  # an integer too large for a float
        return False


class GpuGuard:
    """Two halves. Per GPU, after each poll, the pure policy decides the level, the power
    steps and the admission factor. Per service, `_reconcile` then brings the service in line
    with all of its GPUs at once: held down (`gpu_lost`) while any of them is lost; paused,
    drain-restarted or stopped (`on_critical`) while any of them is critical; resumed only
    when none is. It reads what is (holds, gate drain reasons, states), not what it did, so a
    reload that moves a service, a reset or a restart by the operator, or a service on two
    GPUs that heat one after the other, all end where they should."""

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
        self.factors: dict[str, float] = {}  # uuid -> the admission factor last applied
        self.lost: dict[str, str] = {}  # uuid -> why
        # GPUs back from lost, not read since (uuid -> when back): their heat is unknown, so
        # their services stay held as if they were still lost until a fresh reading
        self.unread: dict[str, float] = {}
        self.lost_hot: set[str] = set()  # lost while throttled or critical (the mode stays)
        self.temps: dict[str, float] = {}  # uuid -> the temperature that made it critical
        self.actions: dict[tuple[str, str], int] = {}  # (uuid, action) -> count
        self.limiter = LogLimiter(__name__)
        self._busy: set[str] = set()  # services with a converging task in flight
        self._bad_order: dict[str, tuple[float, ...]] = {}  # uuid -> thresholds logged
        self._restore_at: dict[str, float] = {}  # uuid -> next try at a recorded limit
        self._tasks: set[asyncio.Task[Any]] = set()
        self._running: asyncio.Task[None] | None = None
        self._again = False
        self._closed = False
        self.ceiling_fraction: float | None = None  # on battery: of each GPU's default limit

    def set_ceiling(self, fraction: float | None, why: str) -> None:
        """A power ceiling over every GPU (on battery, to stretch the runtime), on top of the
        thermal steps; None lifts it. Applied at the next evaluation (now)."""
        if fraction is not None and fraction >= 1.0:
            fraction = None
        if fraction != self.ceiling_fraction:
            self.ceiling_fraction = fraction
            log.info("GPU power ceiling %s (%s)", "lifted" if fraction is None else
                     f"{fraction:.0%} of each GPU's default limit", why)
            self.poke()

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
            uuid = snap.info.uuid
            if uuid in self.lost:
                continue
            reading = self._reading(snap, now)
            back_at = self.unread.get(uuid)
            if back_at is not None:
                if not (reading.fresh and snap.read_at is not None and snap.read_at > back_at):
                    continue  # not judged on a reading from before it came back
                del self.unread[uuid]  # read since it came back: its heat is known again
                self.lost_hot.discard(uuid)
            lim = self.limits(snap.info)
            if lim is None:
                continue
            state, actions = T.decide(self.states.get(uuid, T.State()), reading, lim, now)
            self.states[uuid] = state
            for action in actions:
                await self._act(snap, lim, state, action)
            if state.applied_w is None and uuid in self.store.entries \
                    and now >= self._restore_at.get(uuid, 0.0):
                # a limit recorded but not the policy's (a GPU back from lost, a restore
                # that failed): put it back while the policy is at rest, and retry later
                self._restore_at[uuid] = now + RESTORE_RETRY_S
                await self._restore(snap.info, "the GPU is cool")
        self._update_mode()
        self._reconcile()

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
        ordered = T.ordered(warn, throttle, critical, resume)
        if ordered != (warn, throttle, critical, resume):
            if self._bad_order.get(gpu.uuid) != (warn, throttle, critical, resume):
                self._bad_order[gpu.uuid] = (warn, throttle, critical, resume)
                log.error("GPU%d: [thermal] resolves to warn %g, throttle %g, critical %g, "
                          "resume %g C on this GPU (slowdown %s, shutdown %s C): out of order "
                          "(resume <= warn <= throttle <= critical); using warn %g, throttle "
                          "%g, critical %g, resume %g C until the config is fixed", gpu.index,
                          warn, throttle, critical, resume, gpu.slowdown_c, gpu.shutdown_c,
                          *ordered)
            warn, throttle, critical, resume = ordered
        else:
            self._bad_order.pop(gpu.uuid, None)
        default = gpu.default_power_limit_w
        ceiling = (self.ceiling_fraction * default
                   if self.ceiling_fraction is not None and default else None)
        return T.Limits(warn, throttle, critical, resume, c.power_step, c.min_power_fraction,
                        c.step_interval_s, c.pause_timeout_s, default, gpu.min_power_limit_w,
                        ceiling)

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
        # the limit to come back to: the recorded one, if an earlier change is not undone yet
        limit = self.store.originals.get(snap.info.uuid, snap.power_limit_w)
        return T.Reading(temp, fresh, limit, inflight)

    def services_on(self, uuid: str) -> list[str]:
        return [name for name, a in self.sup.actors.items()
                if any(g.uuid == uuid for g in a.plan.gpus)]

    def _count(self, uuid: str, action: str) -> None:
        self.actions[(uuid, action)] = self.actions.get((uuid, action), 0) + 1

    def _critical(self, uuid: str) -> bool:
        st = self.states.get(uuid)
        return st is not None and st.level == "critical"

    def _escalated(self, uuid: str) -> bool:
        st = self.states.get(uuid)
        return st is not None and st.level == "critical" and st.escalated

    # --- the policy's actions, per GPU ----------------------------------------------------------

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
            before = self.factors.get(uuid, 1.0)
            self.factors[uuid] = action.factor
            self._count(uuid, "admission_down" if action.factor < before else "admission_up")
        elif isinstance(action, T.Critical):
            self.temps[uuid] = action.temperature_c
            log.error("%s critical at %.0f C (critical %g C): %s", label, action.temperature_c,
                      lim.critical_c, ", ".join(
                          f"{n}: {self.cfg.critical_action(self.sup.gate_of(n) is not None)}"
                          for n in self.services_on(uuid)) or "no service on it")
        elif isinstance(action, T.Escalate):
            self._escalate(gpu, action.critical_for_s)
        elif isinstance(action, T.Cooled):
            self.temps.pop(uuid, None)
            log.info("%s cooled to %.0f C", label, action.temperature_c)
        elif isinstance(action, T.TelemetryLost):
            log.warning("%s: telemetry lost while %s: the limits and pauses stay as they are "
                        "until readings come back", label, action.level)

    async def _set_limit(self, gpu: GpuInfo, state: T.State,
                         action: T.SetPowerLimit) -> None:
        uuid = gpu.uuid
        if not action.restore and state.original_w is not None \
                and not await self.store.remember(uuid, state.original_w, action.watts):
            self.limiter.error(f"record-{uuid}", "GPU%d: power limit left at its value: the "
                               "limit to restore could not be recorded (see above); only the "
                               "admission is lowered", gpu.index)
            return
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
        """A service's admission factor: the lowest of its GPUs' (the policy's SetFactor)."""
        view = self.view(name)
        return PR.factor_of(view.gpus) if view is not None else 1.0

    def _escalate(self, gpu: GpuInfo, critical_for_s: float) -> None:
        """A GPU that stays critical with nothing in flight: something else heats it; its
        paused services are stopped (held `cooling`) after all. The policy's state says so
        for as long as it stays critical, so `_reconcile` carries it out even for a service
        whose earlier step is still running now (it is not skipped, only later)."""
        names = [name for name in self.services_on(gpu.uuid)
                 if (view := self.view(name)) is not None and view.paused
                 and PR.HOLD_COOLING not in view.holds]
        if not names:
            return
        log.error("GPU%d critical for %.0f s with nothing in flight: something else heats it; "
                  "stopping %s until it cools", gpu.index, critical_for_s, ", ".join(names))
        self._count(gpu.uuid, "escalate")

    # --- per service: in line with all of its GPUs ---------------------------------------

    def view(self, name: str) -> PR.ServiceView | None:
        """What `service_step` decides on for a service: its state and holds, its gate's
        thermal pause and admission factor, and each of its GPUs (lost, critical, factor)."""
        actor = self.sup.actors.get(name)
        if actor is None:
            return None
        gate = self.sup.gate_of(name)
        gpus = tuple(PR.GpuView(g.uuid, g.index,
                                lost=g.uuid in self.lost or g.uuid in self.unread,
                                critical=self._critical(g.uuid),
                                factor=self.factors.get(g.uuid, 1.0),
                                escalated=self._escalated(g.uuid))
                     for g in actor.plan.gpus)
        return PR.ServiceView(name, actor.state, frozenset(actor.holds), gpus,
                              gated=gate is not None,
                              paused=gate is not None and THERMAL in gate.drains,
                              factor=gate.factor if gate is not None else None)

    def throttled(self, name: str) -> bool:
        """Whether the heat holds the service back: one of its GPUs throttled or critical
        (its power capped, its admission lowered, its gate paused)."""
        view = self.view(name)
        return view is not None and (view.paused or PR.factor_of(view.gpus) < 1.0 or any(
            self.states.get(g.uuid, T.State()).level in ("throttled", "critical")
            for g in view.gpus if not g.lost))

    def step_of(self, name: str) -> PR.Step:
        view = self.view(name)
        if view is None:
            return PR.NOTHING
        return PR.service_step(view, self.cfg.critical_action(view.gated))

    def _reconcile(self) -> None:
        if self._closed:
            return
        for name in list(self.sup.actors):
            if name not in self._busy and self.step_of(name):
                self._start(name, self._converge(name))

    def _start(self, name: str, coro: Any) -> None:
        self._busy.add(name)

        async def run() -> None:
            try:
                await coro
            except ControlError as exc:
                self.limiter.warning(f"converge-{name}", "%s: GPU protection step not done: "
                                     "%s", name, exc.message)
            except Exception:
                self.limiter.exception(f"converge-{name}", "%s: GPU protection step failed",
                                       name)
            finally:
                self._busy.discard(name)

        task = asyncio.get_running_loop().create_task(run(), name=f"gpu-guard-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _converge(self, name: str) -> None:
        """Carry out the service's step (read again now: it is what is, not what was)."""
        step = self.step_of(name)
        lost = [f"GPU{g.index}" for g in self._gpus_of(name) if g.uuid in self.lost]
        # what holds goes first, what releases last: a service is never let start between
        if step.hold_lost:
            self.limiter.error(f"held-{name}", "%s held down: %s lost", name, ", ".join(lost))
            await self.host.hold([name], "gpu_lost")
        if step.critical is not None and step.critical_gpu is not None:
            await self._apply_critical(name, step.critical, step.critical_gpu)
        if step.release_lost:
            await self.host.release([name], "gpu_lost")
        if step.release_cooling or step.reopen:
            log.info("%s: its GPUs cooled: %s", name,
                     "starting again" if step.release_cooling else "gate reopened")
            self._count_on(name, "resume")
            if step.release_cooling:
                await self.host.release([name], "cooling")
            if step.reopen:
                await self.host.resume([name], THERMAL)
        if step.factor is not None and self.sup.gate_of(name) is not None:
            await self.host.set_limit_factor(name, step.factor)

    def _gpus_of(self, name: str) -> tuple[GpuInfo, ...]:
        actor = self.sup.actors.get(name)
        return actor.plan.gpus if actor is not None else ()

    async def _apply_critical(self, name: str, step: str, gpu: PR.GpuView) -> None:
        temp = self.temps.get(gpu.uuid)
        at = f"GPU{gpu.index} critical" + (f" ({temp:.0f} C)" if temp is not None else "")
        if step == "pause":
            log.warning("%s: paused (gate closed to new requests): %s", name, at)
            self._count(gpu.uuid, "pause")
            await self._drain(name, 0.0)
        elif step == "drain-restart":
            log.warning("%s: drained and held down until its GPUs cool: %s", name, at)
            self._count(gpu.uuid, "drain_restart")
            await self._drain_and_hold(name)
        else:
            self._count(gpu.uuid, "stop")
            log.error("%s: stopped (failed): %s", name, at)
            await self._drain_and_fail(name, f"{at} (once it has cooled)")

    async def _drain(self, name: str, timeout_s: float) -> None:
        if self.sup.gate_of(name) is None:
            return
        await self.host.drain([name], THERMAL, timeout_s)

    async def _drain_and_hold(self, name: str) -> None:
        actor = self.sup.actors.get(name)
        gate = actor.cfg.gate if actor is not None else None
        await self._drain(name, gate.drain_timeout_s if gate is not None else 0.0)
        await self.host.hold([name], "cooling")

    async def _drain_and_fail(self, name: str, why: str) -> None:
        actor = self.sup.actors.get(name)
        gate = actor.cfg.gate if actor is not None else None
        await self._drain(name, gate.drain_timeout_s if gate is not None else 0.0)
        try:
            await self.host.protect([name], L.StopFailed(why))
        finally:
            if gate is not None and self.sup.gate_of(name) is not None:
                await self.host.resume([name], THERMAL)  # closed anyway: it is failed now

    def _count_on(self, name: str, action: str) -> None:
        actor = self.sup.actors.get(name)
        if actor is not None and actor.plan.gpus:
            self._count(actor.plan.gpus[0].uuid, action)

    # --- lost GPUs ------------------------------------------------------------------------

    def on_gpu_event(self, event: Lost | Back) -> None:
        """From `GpuEvents` (NVML Xids, udev, the hub's reads, a re-probe), on the loop."""
        gpu = next((g for g in self.hub.gpus if g.uuid == event.uuid), None)
        if gpu is None or self._closed:
            return
        coro = self.gpu_lost(gpu, event.why) if isinstance(event, Lost) else \
            self.gpu_back(gpu, event.why)
        task = asyncio.get_running_loop().create_task(coro, name=f"gpu-event-{gpu.index}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
        self.unread.pop(gpu.uuid, None)
        st = self.states.get(gpu.uuid)
        if st is not None and st.level in ("throttled", "critical"):
            self.lost_hot.add(gpu.uuid)  # the mode stays throttled until it is read again
        # the policy starts afresh when it is back; the recorded limit stays (restored then)
        self.states.pop(gpu.uuid, None)
        self.targets.pop(gpu.uuid, None)
        self.factors.pop(gpu.uuid, None)
        self.temps.pop(gpu.uuid, None)
        names = self.services_on(gpu.uuid)
        self.limiter.error(f"lost-{gpu.uuid}", "GPU%d (%s) lost: %s; holding %s down until "
                           "it is back", gpu.index, gpu.uuid, why, ", ".join(names) or "nothing")
        self._update_mode()
        self._reconcile()

    async def gpu_back(self, gpu: GpuInfo, why: str) -> None:
        if gpu.uuid not in self.lost:
            return
        if gpu.uuid in self.store.entries:
            await self._restore(gpu, "after it was lost")
        if self.lost.pop(gpu.uuid, None) is None:
            return
        # its services are released once a fresh reading says it is not critical
        self.unread[gpu.uuid] = self._clock()
        names = self.services_on(gpu.uuid)
        self.limiter.warning(f"back-{gpu.uuid}", "GPU%d (%s) is back (%s): %s", gpu.index,
                             gpu.uuid, why,
                             f"releasing {', '.join(names)} once a reading says it is not "
                             "critical" if names else "no service on it")
        # evaluated at the next poll (a reading after the restore above, not one before)

    async def _restore(self, gpu: GpuInfo, when: str) -> bool:
        """Put the recorded limit back, unless the board shows a limit that the supervisor did
        not set (an operator changed it since: theirs stays). True when nothing is left to
        restore."""
        entry = self.store.entries.get(gpu.uuid)
        if entry is None:
            return True
        before, ours = float(entry["before"]), self.store.ours(gpu.uuid)
        now = await self._board_limit(gpu)  # None, not readable: restore all the same
        if now is not None and abs(now - before) < 1.0:
            log.info("GPU%d: power limit is %g W already (%s)", gpu.index, now, when)
        elif now is not None and ours and all(abs(now - w) >= 1.0 for w in ours):
            log.warning("GPU%d: power limit %g W %s is not one the supervisor set (%s W; the "
                        "board had %g W): left as it is", gpu.index, now, when,
                        "/".join(f"{w:g}" for w in ours), before)
        else:
            try:
                await self._set_when_free(gpu, before)
            except SensorError as exc:
                log.error("GPU%d: cannot restore the power limit %g W (%s): %s; kept for the "
                          "next try", gpu.index, before, when, exc)
                return False
            log.warning("GPU%d: power limit restored to %g W (%s)", gpu.index, before, when)
        st = self.states.get(gpu.uuid)
        if st is not None and st.applied_w is not None:
            return False  # the policy stepped meanwhile: its record stays
        self.targets.pop(gpu.uuid, None)
        await self.store.forget(gpu.uuid)
        return True

    # --- the mode, status, restoring -----------------------------------------------------

    def _update_mode(self) -> None:
        hot = bool(self.lost_hot) or any(st.level in ("throttled", "critical")
                                         for st in self.states.values())
        self.host.set_hot(hot, "a GPU is throttled" if hot else "no GPU is throttled")

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
            "admission_factor": round(self.factors.get(uuid, 1.0), 3),
            "lost": self.lost.get(uuid),
            "thresholds": None if lim is None else {
                "warn_c": lim.warn_c, "throttle_c": lim.throttle_c,
                "critical_c": lim.critical_c, "resume_c": lim.resume_c},
        }

    async def restore_leftovers(self, adopt: bool = False) -> None:
        """At start: limits an earlier run lowered and could not restore (it was killed). One
        whose GPU is not here now stays recorded for the run that finds it again. A record
        that cannot be trusted (damaged by a crash or a hand) sends every GPU it may concern
        back to the board's own default limit, and is said once, naming the file. With
        `adopt` (models the earlier run left were adopted: the heat that lowered the limits
        is still there), a limit the board still shows as the earlier run set it is taken
        over by the policy as it stands, not restored and lowered again."""
        loaded = await self.store.load()
        self.store.entries = dict(loaded.entries)
        by_uuid = {g.uuid: g for g in self.hub.gpus}
        changed = False
        if loaded.damaged is not None or loaded.bad:
            await self._distrust(loaded, by_uuid)
            changed = True
        for uuid, entry in list(self.store.entries.items()):
            gpu = by_uuid.get(uuid)
            if gpu is None:
                log.warning("power limit of %s (%g W) left lowered by an earlier run: that GPU "
                            "is not here; kept, to restore when it is", uuid, entry["before"])
                continue
            if adopt and await self._adopt_limit(gpu, entry):
                continue
            await self._restore(gpu, "left lowered by an earlier run")
            changed = True
        if changed:  # the policy must see the restored limits as the boards' own, not the
            await self.hub.poll_once()  # lowered ones the first poll read

    async def _adopt_limit(self, gpu: GpuInfo, entry: dict[str, Any]) -> bool:
        """The policy's state as the earlier run left it: the board's own limit to come back
        to, the steps that make the limit it shows, the admission factor they mean; it steps
        on from there (up, one step an interval, once the GPU is cool)."""
        lim = self.limits(gpu)
        ours = self.store.ours(gpu.uuid)
        now = await self._board_limit(gpu)
        if lim is None or now is None or not ours or abs(now - ours[-1]) >= 1.0 \
                or lim.step_w <= 0:
            return False
        before = float(entry["before"])
        steps = max(0, round((before - now) / lim.step_w))
        state = T.State(steps=steps, original_w=before, applied_w=now,
                        last_step=self._clock())
        self.states[gpu.uuid] = state
        self.targets[gpu.uuid] = now
        self.factors[gpu.uuid] = state.factor(lim)
        log.info("GPU%d: power limit %g W (the board's %g W) as the earlier supervisor left "
                 "it, with the models it ran: taken over, %d step(s) down", gpu.index, now,
                 before, steps)
        return True

    async def _distrust(self, loaded: Loaded, by_uuid: dict[str, GpuInfo]) -> None:
        """The GPUs whose record is damaged (all, when the file as a whole is) go back to the
        board's default limit where they are below it; the good entries stay."""
        if loaded.damaged is not None:
            what = f"cannot be trusted: it {loaded.damaged}"
            gpus = list(self.hub.gpus)
        else:
            what = f"has a damaged entry for {', '.join(loaded.bad[:8])}"
            gpus = [by_uuid[u] for u in loaded.bad if u in by_uuid]
        done: list[str] = []
        for gpu in gpus:
            done.append(await self._to_default(gpu))
        gone = [u for u in loaded.bad if u not in by_uuid][:8]
        log.warning("%s %s; the GPUs the supervisor may have lowered go back to their board's "
                    "default power limit: %s%s", self.store.path, what,
                    "; ".join(done) or "no GPU here",
                    f"; not here now (check their limit when they are back): {', '.join(gone)}"
                    if gone else "")
        await self.store.save()  # the good entries replace what was damaged

    async def _board_limit(self, gpu: GpuInfo) -> float | None:
        """The power limit the board has now (read on its own thread), or None."""
        try:
            return (await self.hub.call(gpu, lambda b, g: b.read(g))).power_limit_w
        except SensorError:
            return None

    async def _to_default(self, gpu: GpuInfo) -> str:
        default = gpu.default_power_limit_w
        if default is None:
            return f"GPU{gpu.index}: its default is unknown, left as it is"
        now = await self._board_limit(gpu)
        if now is not None and now >= default - 1.0:
            return f"GPU{gpu.index} at {now:g} W already"
        try:
            await self._set_when_free(gpu, default)
        except SensorError as exc:
            return f"GPU{gpu.index}: cannot set {default:g} W: {exc}"
        return f"GPU{gpu.index} {'?' if now is None else f'{now:g}'} -> {default:g} W"

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
            if gpu is None or uuid in self.lost:
                continue  # kept in the file: restored at a start that finds it
            try:
                await self._set_when_free(gpu, watts)
                log.info("GPU%d: power limit restored to %g W", gpu.index, watts)
                await self.store.forget(uuid)
            except SensorError as exc:
                log.error("GPU%d: cannot restore the power limit %g W: %s (it is restored at "
                          "the next start)", gpu.index, watts, exc)
