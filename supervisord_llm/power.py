"""The power controller: the UPS (NUT, and `llmctl power-event`) through the pure power policy,
its actions carried out through the host actor.

- On battery: the mode is `on_battery` and every GPU's power limit gets a ceiling of
  `on_battery_power_fraction` of its default (through the GPU guard, the thermal path), so the
  box draws less and the runtime stretches; lifted when the power returns.
- The power-down sequence, an operation of the host (it cancels a reload or swap in progress;
  a daemon stop cancels it), each step logged, timed, in `STATUS=`, the mode and metrics:
  1. `drain`: every gate closed (drain reason `power`; new requests get 503 + Retry-After),
     in-flight requests waited for up to `drain_timeout_s`, cut short so that the whole
     sequence fits in the runtime the UPS reports (`policy.power.drain_budget`);
  2. `checkpoint`: the `[[checkpoint]]` hooks in order, each with its timeout;
  3. `stop`: the services, in reverse order, held `powered_down`; whatever still runs after
     `stop_timeout_s` (one deadline for all) is SIGKILLed;
  4. `shutdown_command`, if set (60 s at most; the daemon stays up);
  then the mode `powered_down`. Power back before step 3 cancels the sequence: the `power`
  drain reason is removed from the gates (an operator's drain stays), the ceiling lifted.
- Power back after it (battery above the low marks, `restart_on_power_return`): the holds
  are released, the services start again, and each gate opens when its service is ready.
- At start, a UPS already on battery (a daemon restarted during an outage, a box booted on
  battery) keeps the services held `powered_down` until the power returns: models are not
  loaded onto the battery the sequence needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import lifecycle as L
from .checkpoints import CheckpointResult, CheckpointRunner, exit_text, run_argv
from .config import PowerSection
from .errors import ControlError
from .logs import LogLimiter
from .modes import Mode
from .policy import power as P
from .procs import read_boot_id
from .sensors.nut import NutSource, UpsReading
from .sensors.poll import SourcePoller
from .statefile import Damaged, read_json, write_json
from .states import State

if TYPE_CHECKING:
    from .host import Host
    from .supervisor import Supervisor

log = logging.getLogger(__name__)

HOLD = "powered_down"
DRAIN_REASON = "power"
SHUTDOWN_COMMAND_TIMEOUT_S = 60.0
EVENTS = {"on-battery": "on_battery", "on-line": "online", "low-battery": "low_battery",
          "fsd": "fsd"}
STATE_FILE = "power_state.json"
HELD_PHASES = ("on_battery", "powering_down", "powered_down")


@dataclass
class Step:
    name: str  # drain | checkpoint | stop | shutdown_command
    started: float
    duration_s: float | None = None
    detail: str = ""


class PowerController:
    def __init__(self, sup: Supervisor, host: Host, cfg: PowerSection,
                 checkpoints: CheckpointRunner, *,
                 set_ceiling: Callable[[float | None, str], None] = lambda _f, _w: None,
                 recheck: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`set_ceiling(fraction, why)`: a power ceiling over every GPU (the GPU guard's);
        `recheck()`: the guard looks at the GPUs again (once the power is back)."""
        self.sup = sup
        self.host = host
        self.checkpoints = checkpoints
        self._set_guard_ceiling = set_ceiling
        self._guard_recheck = recheck
        self._clock = clock
        self.start_cfg = cfg  # the connection (source, ups, login, poll) is the start's
        self._state = P.State()
        self.poller: SourcePoller[UpsReading] | None = None
        self.source: NutSource | None = None
        if cfg.source == "nut":
            name, addr, port = cfg.host_port
            timeout = min(5.0, max(0.5, cfg.poll_interval_s))
            self.source = NutSource(name, addr, port, timeout_s=timeout,
                                    poll_interval_s=cfg.poll_interval_s,
                                    username=cfg.username, password=cfg.password, clock=clock)
            self.poller = SourcePoller(self.source, cfg.poll_interval_s, timeout + 1.0,
                                       clock=clock, sensor="ups", label=f"UPS {cfg.ups}",
                                       errors_total=sup.hub.errors_total)
        self.reading: UpsReading | None = None  # the last the policy saw
        self.reading_at: float | None = None
        self.last_event: tuple[str, float] | None = None  # (llmctl power-event, when)
        self.events: dict[str, int] = {}  # power_events_total{event}
        self.sequence: list[Step] = []  # the last power-down's steps
        self.sequence_reason: str | None = None
        self.steps_done: list[str] = []  # of the power-down under way (recorded)
        self._recorded_steps: list[str] = []  # what an earlier run recorded done
        self._resumed_done: set[str] = set()  # steps not done again (a resumed power-down)
        self.ceiling: float | None = None
        self.limiter = LogLimiter(__name__)
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[Any] | None = None  # the power-down in progress
        self._warned: PowerSection | None = None  # a reloaded [power] said to need a restart
        self._timer: asyncio.Task[None] | None = None  # the grace, on the clock alone
        # the operator's override, or the stale-FSD rule's: (by whom, wall time)
        self.override_by: tuple[str, float] | None = None
        state_dir = sup.cfg.supervisor.state_dir
        self.record_path = Path(state_dir) / STATE_FILE if state_dir else None
        self._recorded: tuple[Any, ...] | None = None
        self._boot_id = read_boot_id()
        self._record_lock = asyncio.Lock()
        self._saving: set[asyncio.Task[None]] = set()

    @property
    def state(self) -> P.State:
        return self._state

    @state.setter
    def state(self, value: P.State) -> None:
        self._state = value
        # on battery, or (being) powered down: a service added now (a reload) is held down
        # too, and starts when the power is back
        if self.holding:
            self.sup.new_holds.add(HOLD)
        else:
            self.sup.new_holds.discard(HOLD)

    @property
    def holding(self) -> bool:
        return self._state.phase in HELD_PHASES

    # --- what it is fed --------------------------------------------------------------------

    @property
    def cfg(self) -> PowerSection:
        """The running [power]: a reload changes the grace, the marks, the timeouts and the
        cap at once; where the UPS is (source, ups, login, poll interval) needs a restart."""
        live = getattr(self.sup.cfg, "power", None)
        if not isinstance(live, PowerSection):
            return self.start_cfg
        s = self.start_cfg
        if (live.source, live.ups, live.username, live.password, live.poll_interval_s) != \
                (s.source, s.ups, s.username, s.password, s.poll_interval_s):
            if self._warned is not live:
                self._warned = live
                log.warning("power: a reload changed where or how often the UPS is read "
                            "([power] source, ups, username, password, poll_interval_s): that "
                            "takes a restart of llm-supervisor; the rest of [power] applies now")
            return dataclasses.replace(live, source=s.source, ups=s.ups, username=s.username,
                                       password=s.password, poll_interval_s=s.poll_interval_s)
        return live

    @property
    def limits(self) -> P.Limits:
        c = self.cfg
        return P.Limits(c.on_battery_grace_s, c.low_runtime_s, c.low_charge_pct,
                        c.deadtime_s, c.restart_on_power_return, c.fsd_stale_s)

    async def first_reading(self, adopting: bool = False) -> bool:
        """At start, before the services: what an earlier run of this boot recorded, then one
        poll. True when the services must start held `powered_down` (and come up when the
        power returns): the UPS is on battery (or low, or FSD) now, or, with no UPS to poll
        (`source = "none"`), the last run was on battery or powered down and no on-line event
        has come since."""
        recorded = await self._load_record()
        if adopting and recorded is not None and recorded.phase in ("on_battery",
                                                                    "powering_down"):
            # the models an earlier daemon left run: its sequence goes on (the grace over
            # again from now, or, if it was powering down, the power-down at once)
            await self._continue(recorded)
            return False
        if self.poller is None:
            if recorded is not None and recorded.phase in HELD_PHASES:
                why = (f"the last run of this boot recorded {recorded.phase.replace('_', ' ')}"
                       f" ({self.record_path}), and without a UPS to read only an on-line "
                       "event says the power is back (`llmctl power-event on-line`)")
                self._hold_at_start(recorded, why, on_line=False)
                return True
            return False
        await self.poller.poll_once()
        obs = self._observation()
        if obs is None:
            return False
        self.reading, self.reading_at = self.poller.snapshot.value, self._clock()
        if recorded is not None:  # an FSD latch or override outlives a restart of the daemon
            self.state = dataclasses.replace(self.state, forced=recorded.forced,
                                             override=recorded.override)
        if obs.state == "fsd" and self.state.override:
            obs = dataclasses.replace(obs, state=P.unbelieved(obs))
        if obs.state in ("on_battery", "low_battery", "fsd") or (
                self.state.forced and recorded is not None and recorded.phase in HELD_PHASES):
            # a daemon (re)started during an outage: loading models now would spend the
            # battery that the sequence needs; they start when the power returns
            why = P.low_mark(obs, self.limits) or f"the UPS is {obs.state} at start"
            log.warning("power: the UPS reports %s at start: the services stay down until the "
                        "power returns (%s)", self.reading.status if self.reading else obs.state,
                        why)
            self._hold_at_start(self.state, why, on_line=obs.ol)
            return True
        await self._save_record()
        return False

    async def _continue(self, was: P.State) -> None:
        """A power episode an earlier daemon was in the middle of, with its models adopted:
        on battery, the grace starts over (the earlier run's clock is not ours); powering
        down, the power-down goes on at once (drain, checkpoints, stop), from the start of
        its steps: what was done already (a drained gate, a checkpoint) is done again."""
        now = self._clock()
        since = now - self.cfg.on_battery_grace_s if was.phase == "powering_down" else now
        if was.phase == "powering_down":
            self._resumed_done = set(self._recorded_steps)
        self.state = P.State(phase="on_battery", believed=was.believed, on_battery_since=since,
                             alerted=True, forced=was.forced, override=was.override)
        log.warning("power: the last run of this boot was %s, and its models were adopted: %s",
                    was.phase.replace("_", " "), "the power-down goes on now"
                    if was.phase == "powering_down" else
                    f"on battery, the grace ({self.cfg.on_battery_grace_s:g} s) runs again")
        self._mode(Mode.ON_BATTERY, f"{was.phase.replace('_', ' ')} before the restart")
        self._set_ceiling(self.cfg.on_battery_power_fraction, "on battery")
        self._arm_grace()

    def _hold_at_start(self, was: P.State, why: str, *, on_line: bool) -> None:
        believed = "on_battery" if was.believed == "on_battery" else "low_battery"
        self.state = P.finished(P.commit(P.State(
            phase="powering_down", believed=believed, forced=was.forced,
            override=was.override)), self._clock())
        self.host.set_power_mode(Mode.POWERING_DOWN, why)  # nothing runs yet: nothing to do
        self.host.set_power_mode(Mode.POWERED_DOWN, why)
        if not on_line:  # `FSD OL`: on line, the GPUs need no cap
            self._set_ceiling(self.cfg.on_battery_power_fraction, "on battery at start")
        self._count("powered_down")
        if self.poller is None:
            log.warning("power: services held at start: %s", why)
        self._save_soon()

    # --- the record of the power state (state_dir/power_state.json) ------------------------

    async def _load_record(self) -> P.State | None:
        """The power state an earlier run of this boot left, or None (none, another boot, or
        damaged: said once, and taken as none)."""
        path = self.record_path
        if path is None:
            return None
        try:
            doc = await asyncio.to_thread(read_json, path)
        except Damaged as exc:
            log.warning("power: %s %s: ignored (no power state from the last run)", path, exc)
            return None
        if doc is None:
            return None
        record = _record_state(doc)
        if record is None:
            log.warning("power: %s is not a power state record: ignored", path)
            return None
        st, boot_id = record
        steps = doc.get("steps_done") if isinstance(doc, dict) else None
        self._recorded_steps = [x for x in steps if isinstance(x, str)][:16] \
            if isinstance(steps, list) else []
        if boot_id != self._boot_id or self._boot_id is None:
            if st.phase in HELD_PHASES:
                log.warning("power: the last run recorded %s, but the machine has restarted "
                            "since: taken as the power back", st.phase.replace("_", " "))
            return None
        if st.override and self.poller is None:
            st = dataclasses.replace(st, override=False)  # no upsd flag to disbelieve
        if st.override and self.override_by is None:
            self.override_by = ("recorded", time.time())
            log.warning("power: the override of the last run stands (upsd's FSD is not "
                        "believed until upsd clears it; %s)", path)
        return st

    def _save_soon(self) -> None:
        """Record the phase and the latches when they changed (off the loop, atomically)."""
        key = (self.state.phase, self.state.believed, self.state.forced, self.state.override,
               tuple(self.steps_done))
        if self.record_path is None or key == self._recorded:
            return
        self._recorded = key
        task = asyncio.get_running_loop().create_task(self._save_record(), name="power-record")
        self._saving.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(self._saving.discard)

    async def _save_record(self) -> None:
        path = self.record_path
        if path is None:
            return
        try:
            async with self._record_lock:  # the state as it is when its turn comes: the
                st = self.state             # last writer writes the latest, never an older one
                done = tuple(self.steps_done) if st.phase == "powering_down" else ()
                self._recorded = (st.phase, st.believed, st.forced, st.override, done)
                doc = {"boot_id": self._boot_id, "phase": st.phase, "believed": st.believed,
                       "forced": st.forced, "override": st.override,
                       "steps_done": list(done), "written": round(time.time(), 3)}
                await asyncio.to_thread(write_json, path, doc)
        except OSError as exc:
            self.limiter.error("record", "power: cannot record the power state in %s: %s",
                               path, exc)

    def _observation(self) -> P.Observation | None:
        assert self.poller is not None
        snap = self.poller.snapshot
        r = snap.value
        if snap.status == "ok" and r is not None:
            return P.Observation(r.state, r.charge_pct, r.runtime_s, ol="OL" in r.flags,
                                 ob="OB" in r.flags)
        if snap.status == "unknown":
            return None
        return P.Observation("unreachable")  # unresponsive (past the deadline) or an error

    async def run(self) -> None:
        """Poll the UPS every poll_interval_s and decide (only with `source = "nut"`)."""
        assert self.poller is not None
        while True:
            started = self._clock()
            await self.poller.poll_once()
            obs = self._observation()
            if obs is not None:
                self.reading, self.reading_at = self.poller.snapshot.value, self._clock()
                try:
                    await self.observe(obs)
                except Exception:  # never let the UPS watch die: the next poll decides again
                    self.limiter.exception("observe", "power: acting on the UPS failed")
            await asyncio.sleep(max(0.0, self.cfg.poll_interval_s - (self._clock() - started)))

    async def event(self, name: str, force: bool = False) -> dict[str, Any]:
        """`llmctl power-event` (upsmon's NOTIFYCMD): the same policy, a second source. An
        event that a fresh upsd reading contradicts (upssched's ONLINE or LOWBATT may be of
        another UPS, or old) is not applied; `fsd` always is (upsmon is powering off).
        `on-line` with `force` (the operator's override) is always applied: the FSD latches
        go, and upsd's FSD flag is not believed until upsd clears it."""
        state = EVENTS[name]
        if force:
            return await self._override()
        r = self._fresh_reading()
        now = self._clock()
        why = None
        if r is not None and state != "fsd":
            if state == "online" and r.state != "online":
                why = f"upsd says {r.status} (read {now - (self.reading_at or now):.1f} s ago)"
                if self.state.forced:  # someone says the power is back: the FSD latch goes,
                    self.state = P.release(self.state)  # and upsd's own OL restarts them
                    why += "; the services start when upsd says OL"
                why += "; `llmctl power-event on-line --force` overrides it"
            elif state in ("on_battery", "low_battery") and r.state == "online":
                why = f"upsd says {r.status} (read {now - (self.reading_at or now):.1f} s ago)"
        reply = self.status(now)
        if why is not None:
            self.limiter.warning(f"event-ignored-{name}", "power event from llmctl: %s not "
                                 "applied: %s", name, why)
            reply["event"] = {"name": name, "applied": False, "why": why}
            return reply
        self.last_event = (name, now)
        self.limiter.warning(f"event-{name}", "power event from llmctl: %s", name)
        last = self.reading
        await self.observe(P.Observation(
            state, last.charge_pct if last is not None else None,
            last.runtime_s if last is not None else None, source="event"))
        reply = self.status(self._clock())
        reply["event"] = {"name": name, "applied": True, "why": None}
        return reply

    async def _override(self) -> dict[str, Any]:
        """The operator's way back that always works: the power is taken as back now (the
        low marks too: the operator decides), whatever upsd or an FSD said."""
        r = self._fresh_reading()
        said = f"upsd says {r.status}" if r is not None else "no fresh UPS reading"
        log.warning("power: operator override (llmctl power-event on-line --force; %s): the "
                    "power is taken as back%s", said,
                    "; upsd's FSD flag is not believed until upsd clears it"
                    if self.poller is not None else "")
        self._count("override")
        async with self._lock:  # without upsd there is no FSD flag to disbelieve: the latches go
            self.state = P.override(self.state) if self.poller is not None \
                else P.release(self.state)
        if self.poller is not None:
            self.override_by = ("operator", time.time())
        self.last_event = ("on-line", self._clock())
        # the operator brings them back even with restart_on_power_return = false
        await self.observe(P.Observation("online", source="event"),
                           dataclasses.replace(self.limits, restart_on_return=True))
        reply = self.status(self._clock())
        reply["event"] = {"name": "on-line", "applied": True, "forced": True,
                          "why": f"operator override ({said})"}
        return reply

    def _fresh_reading(self) -> UpsReading | None:
        """The last NUT reading if it is fresh (within two polls) and good."""
        r, at = self.reading, self.reading_at
        if self.poller is None or r is None or at is None or r.state in ("unknown",
                                                                           "unreachable"):
            return None
        fresh = self._clock() - at <= 2 * self.cfg.poll_interval_s + self.poller.call_timeout_s
        return r if fresh and self.poller.snapshot.status == "ok" else None

    async def observe(self, obs: P.Observation, limits: P.Limits | None = None) -> None:
        async with self._lock:
            if self.host.mode is Mode.SHUTTING_DOWN:
                return
            if obs.state == "online" and self.state.phase == "powered_down" \
                    and self.ceiling is not None:
                self._set_ceiling(None, "on line again")  # even while the services wait
            before = self.state
            self.state, actions = P.decide(self.state, obs, limits or self.limits,
                                           self._clock())
            if before.override and not self.state.override:
                log.warning("power: upsd no longer says FSD: the override has ended")
                self.override_by = None
            for action in actions:
                await self._act(action)
            self._save_soon()

    async def _grace(self) -> None:
        """The grace on the clock alone: the next reading or event may come minutes later
        (with `source = "none"`, upssched's LOWBATT), or never. Checked at least every
        second, with the running grace: a reload that changes `on_battery_grace_s` during an
        episode applies to it, counted from the start of the cut."""
        while True:
            since = self.state.on_battery_since
            if self.state.phase != "on_battery" or since is None or self._stopping():
                return
            left = since + self.cfg.on_battery_grace_s - self._clock()
            await asyncio.sleep(min(1.0, max(0.0, left)))
            async with self._lock:
                if self._stopping():
                    return
                self.state, actions = P.tick(self.state, self.limits, self._clock())
                for action in actions:
                    await self._act(action)
                self._save_soon()

    def _stopping(self) -> bool:
        return self.host.mode is Mode.SHUTTING_DOWN

    def _arm_grace(self) -> None:
        if self._timer is None or self._timer.done():
            self._timer = asyncio.get_running_loop().create_task(self._grace(),
                                                                 name="power-grace")

    # --- the actions ------------------------------------------------------------------------

    def _count(self, event: str) -> None:
        self.events[event] = self.events.get(event, 0) + 1

    def _mode(self, mode: Mode | None, why: str) -> None:
        """The power's phase for the host's mode (None: on line)."""
        self.host.set_power_mode(mode, why)

    async def _act(self, action: P.Action) -> None:
        if isinstance(action, P.OnBattery):
            self._count("on_battery")
            low = P.low_mark(P.Observation("on_battery", action.charge_pct, action.runtime_s),
                             self.limits)
            log.warning("power: the UPS is on battery (charge %s, runtime %s)%s",
                        _pct(action.charge_pct), _secs(action.runtime_s),
                        "" if low is not None or self.state.phase != "on_battery" else
                        f"; riding it out for on_battery_grace_s ({self.cfg.on_battery_grace_s:g}"
                        " s)")
            self._mode(Mode.ON_BATTERY, "the UPS is on battery")
            self._set_ceiling(self.cfg.on_battery_power_fraction, "on battery")
            self._arm_grace()
        elif isinstance(action, P.PowerBack):
            self._count("power_back")
            await self._power_back()
        elif isinstance(action, P.PowerDown):
            self._count("power_down")
            await self._start_sequence(action)
        elif isinstance(action, P.Restart):
            self._count("restart")
            await self._restart()
        elif isinstance(action, P.Waiting):
            log.warning("power: the power is back; the services start again once the battery "
                        "is above the low marks (%s)", action.reason)
        elif isinstance(action, P.Alert):
            self._count("ups_unreachable")
            err = self.poller.snapshot.error if self.poller is not None else None
            r = self.reading
            log.error("power: %s%s", action.message,
                      f" ({err or (r.error if r is not None else '')})".replace(" ()", ""))
        elif isinstance(action, P.Reachable):
            self._count("ups_reachable")
            log.warning("power: the UPS answers again")
        elif isinstance(action, P.FsdIgnored):
            self._count("fsd_ignored")
            self.override_by = ("fsd_stale_s", time.time())
            log.warning("power: %s", action.reason)

    def _set_ceiling(self, fraction: float | None, why: str) -> None:
        self.ceiling = fraction if fraction is not None and fraction < 1.0 else None
        self._set_guard_ceiling(self.ceiling, why)

    async def _power_back(self) -> None:
        task = self._task
        if task is not None and not task.done():
            log.warning("power: the power is back before the services were stopped: "
                        "power-down cancelled")
            task.cancel()
            await asyncio.wait({task})
        else:
            log.warning("power: the power is back")
        self._set_ceiling(None, "the power is back")
        held = [n for n, a in self.sup.actors.items() if HOLD in a.holds]
        if held:  # added by a reload while on battery
            await self.host.command(held, L.Release(HOLD), internal=True)
        await self._reopen()
        self._mode(None, "the power is back")
        self._guard_recheck()  # its steps again if a GPU is still hot

    async def _reopen(self) -> None:
        gated = [n for n in self.sup.actors if self.sup.gate_of(n) is not None]
        if gated:
            await self.host.resume(gated, DRAIN_REASON)  # only ours: an operator's stays

    async def _restart(self) -> None:
        log.warning("power: the power is back and the battery above the low marks: starting "
                    "the services again")
        self._set_ceiling(None, "the power is back")
        names = [n for n, a in self.sup.actors.items() if HOLD in a.holds]
        if names:
            await self.host.command(names, L.Release(HOLD), internal=True)
        await self._reopen()
        self._mode(None, "the power is back")
        self._guard_recheck()

    # --- the power-down sequence --------------------------------------------------------------

    async def _start_sequence(self, action: P.PowerDown) -> None:
        if self._task is not None and not self._task.done():
            return
        runtime = action.runtime_s
        if runtime is None and self.reading is not None:
            runtime = self.reading.runtime_s
        log.error("power: powering down: %s", action.reason)
        self.sequence_reason = action.reason
        self.sequence = []
        self.steps_done = []
        self._mode(Mode.POWERING_DOWN, action.reason)
        try:
            self._task = await self.host.power_down(lambda: self._sequence(runtime))
        except ControlError as exc:  # the daemon is stopping: that stops everything anyway
            log.warning("power: power-down not started: %s", exc.message)

    async def _sequence(self, runtime_s: float | None) -> None:
        cfg = self.cfg
        sup = self.sup
        t0 = self._clock()
        try:
            # 1. drain
            budget, margin = P.drain_budget(runtime_s, cfg.drain_timeout_s,
                                            self.checkpoints.total_timeout_s(),
                                            cfg.stop_timeout_s)
            gated = [n for n in sup.actors if sup.gate_of(n) is not None]
            step = self._step("drain", f"{_count_of(len(gated), 'gate')}, up to {budget:.1f} s"
                              + (f" (runtime {runtime_s:.0f} s, margin {margin:.0f} s)"
                                 if runtime_s is not None else ""))
            if gated:
                left = await self.host.drain_now(gated, DRAIN_REASON, budget)
                if left:
                    step.detail += "; cut off: " + ", ".join(f"{n} {c}" for n, c in left.items())
                    log.warning("power: drain: still in flight after %.1f s: %s", budget,
                                ", ".join(f"{n} {c}" for n, c in left.items()))
            self._end(step)
            # 2. checkpoints (not again when they ran before a restart of the daemon)
            if self.checkpoints.hooks and "checkpoint" in self._resumed_done:
                step = self._step("checkpoint", "done before the restart of the supervisor: "
                                  "not run again")
                self._end(step)
            elif self.checkpoints.hooks:
                step = self._step("checkpoint", _count_of(len(self.checkpoints.hooks), "hook"))
                results = await self.checkpoints.run(None, "power-down")
                bad = [r.name for r in results if r.result != "ok"]
                step.detail += f"; failed: {', '.join(bad)}" if bad else "; all done"
                self._end(step)
            self._resumed_done = set()  # (once: a later power-down runs them)
            # 3. stop (no cancel from here on: power back restarts them afterwards)
            self.state = P.commit(self.state)
            step = self._step("stop", f"{_count_of(len(sup.actors), 'service')}, up to "
                              f"{cfg.stop_timeout_s:g} s")
            await self._stop_services(step)
            # nothing left to drain: the gates now say that their service is held down
            # (503 "held"), and each opens again when its service is ready after the return
            await self._reopen()
            self._end(step)
            # 4. shutdown_command
            if cfg.shutdown_command:
                step = self._step("shutdown_command", " ".join(cfg.shutdown_command)[:200])
                step.detail = await _run_command(cfg.shutdown_command)
                self._end(step)
        except asyncio.CancelledError:
            log.warning("power: power-down sequence cancelled after %.1f s",
                        self._clock() - t0)
            for step in self.sequence:
                if step.duration_s is None:
                    step.duration_s = self._clock() - step.started
                    step.detail += "; cancelled"
            self.host.changed()
            raise
        self.state = P.finished(self.state, self._clock())
        self._save_soon()
        self._mode(Mode.POWERED_DOWN, "services stopped for the power loss")
        self._count("powered_down")
        log.error("power: powered down in %.1f s (%s); waiting for the power to return",
                  self._clock() - t0, ", ".join(f"{s.name} {s.duration_s:.1f} s"
                                                for s in self.sequence))
        # the power may be back already (a power-event source tells nothing more)
        if self.reading is not None or self.last_event is not None:
            asyncio.get_running_loop().create_task(self._recheck(), name="power-recheck")

    async def _recheck(self) -> None:
        r = self.reading
        if self.last_event is not None and (self.reading_at is None
                                            or self.last_event[1] >= self.reading_at):
            state = EVENTS[self.last_event[0]]
            await self.observe(P.Observation(state, r.charge_pct if r else None,
                                             r.runtime_s if r else None, source="event"))
        elif r is not None:
            await self.observe(P.Observation(r.state, r.charge_pct, r.runtime_s,
                                             ol="OL" in r.flags, ob="OB" in r.flags))

    async def _stop_services(self, step: Step) -> None:
        """In reverse order, each held `powered_down` and sent its stop signal; each waited
        for at most its share of what is left of `stop_timeout_s`, so that one server that
        ignores SIGTERM does not keep the ones after it from a clean stop; at the deadline
        what still runs is SIGKILLed (and comes back with the power). A `failed` service
        stays failed (a power cut is no reset)."""
        sup = self.sup
        actors = [a for a in reversed(list(sup.actors.values())) if a.state is not State.FAILED]
        deadline = self._clock() + self.cfg.stop_timeout_s
        for i, actor in enumerate(actors):
            await self.host.command([actor.name], L.Stop(HOLD), internal=True)
            share = max(0.0, deadline - self._clock()) / (len(actors) - i)
            with contextlib.suppress(TimeoutError):
                await actor.wait_stopped(share)
        for actor in actors:
            with contextlib.suppress(TimeoutError):
                await actor.wait_stopped(max(0.0, deadline - self._clock()))
        late = [a for a in actors if a.proc is not None]
        if late:
            names = ", ".join(a.name for a in late)
            step.detail += f"; killed after {self.cfg.stop_timeout_s:g} s: {names}"
            log.error("power: still running after stop_timeout_s (%g s): %s: SIGKILL",
                      self.cfg.stop_timeout_s, names)
            for a in late:
                a.kill_now(keep_wanted=True)  # it comes back with the power
            for a in late:
                try:
                    await a.wait_stopped(5.0)
                except TimeoutError:
                    log.error("power: %s still not gone 5 s after SIGKILL", a.name)

    def _step(self, name: str, detail: str) -> Step:
        step = Step(name, self._clock(), None, detail)
        self.sequence.append(step)
        log.warning("power: step %s: %s", name, detail)
        self.host.changed()
        return step

    def _end(self, step: Step) -> None:
        step.duration_s = self._clock() - step.started
        self.steps_done.append(step.name)
        self._save_soon()  # a restart in the middle goes on from here
        log.warning("power: step %s done in %.2f s%s", step.name, step.duration_s,
                    f" ({step.detail})" if step.detail else "")
        self.host.changed()

    # --- status ------------------------------------------------------------------------------

    def status(self, now: float) -> dict[str, Any]:
        r = self.reading
        snap = self.poller.snapshot if self.poller is not None else None
        if self.cfg.source == "none":
            state = self.state.believed if self.last_event is not None else "unknown"
        elif snap is None or snap.status == "unknown":
            state = "unknown"
        elif snap.status != "ok" or r is None:
            state = "unreachable"
        else:
            state = r.state
        wall = time.time()
        return {
            "source": self.cfg.source,
            "ups": self.cfg.ups if self.cfg.source == "nut" else None,
            "status": r.status if r is not None and state != "unreachable" else None,
            "charge_pct": r.charge_pct if r is not None else None,
            "runtime_s": r.runtime_s if r is not None else None,
            "state": state,
            "reachable": state != "unreachable" if self.cfg.source == "nut" else None,
            "error": (snap.error if snap is not None and snap.status != "ok"
                      else r.error if r is not None else None),
            "phase": self.state.phase,
            "on_battery_for_s": (round(now - self.state.on_battery_since, 1)
                                 if self.state.on_battery_since is not None else None),
            "power_ceiling": self.ceiling,
            "last_event": self.last_event[0] if self.last_event else None,
            # upsd's FSD (or an FSD event) is not believed: the operator's `on-line --force`,
            # or fsd_stale_s after an aborted shutdown
            "override": {"by": self.override_by[0],
                         "since": round(self.override_by[1], 3)}
            if self.state.override and self.override_by is not None else None,
            "power_down": {
                "reason": self.sequence_reason,
                "steps": [{"step": s.name, "duration_s": None if s.duration_s is None
                           else round(s.duration_s, 3), "detail": s.detail}
                          for s in self.sequence],
            } if self.sequence_reason else None,
            "checkpoints": [res.as_dict(wall) for res in self._checkpoint_results()],
        }

    def _checkpoint_results(self) -> list[CheckpointResult]:
        return [self.checkpoints.last[cp.name] for cp in self.checkpoints.hooks
                if cp.name in self.checkpoints.last]

    async def close(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        if self._timer is not None:
            self._timer.cancel()
        if self.poller is not None:
            await self.poller.aclose()
        await self.checkpoints.close()


def _pct(v: float | None) -> str:
    return "unknown" if v is None else f"{v:.0f} %"


def _secs(v: float | None) -> str:
    return "unknown" if v is None else f"{v:.0f} s"


async def _run_command(argv: tuple[str, ...]) -> str:
    """Run the shutdown command (no shell, SHUTDOWN_COMMAND_TIMEOUT_S at most); its result in
    words. Never raises."""
    try:
        async with asyncio.timeout(SHUTDOWN_COMMAND_TIMEOUT_S):
            code, out = await run_argv(argv)
    except TimeoutError:  # before OSError: it is one
        log.error("power: shutdown_command %s: still running after %g s: killed", argv[0],
                  SHUTDOWN_COMMAND_TIMEOUT_S)
        return "timed out"
    except OSError as exc:
        log.error("power: shutdown_command %s: cannot run: %s", argv[0], exc.strerror or exc)
        return f"cannot run: {exc.strerror or exc}"
    text = " ".join(out.decode("utf-8", "replace").split())[-300:]
    if code != 0:
        log.error("power: shutdown_command %s: %s: %s", argv[0], exit_text(code), text)
        return exit_text(code)
    log.warning("power: shutdown_command %s: done%s", argv[0], f": {text}" if text else "")
    return "exit 0"


def _record_state(doc: object) -> tuple[P.State, str | None] | None:
    """A power state record as the policy's state (the phase and the latches) and the boot
    it was written in, or None when it is not one."""
    if not isinstance(doc, dict):
        return None
    phase, believed, boot_id = doc.get("phase"), doc.get("believed"), doc.get("boot_id")
    if phase not in P.PHASES or believed not in ("online", "on_battery", "low_battery") \
            or not isinstance(boot_id, (str, type(None))):
        return None
    forced, override = doc.get("forced"), doc.get("override")
    if not isinstance(forced, bool) or not isinstance(override, bool):
        return None
    return P.State(phase=str(phase), believed=str(believed), forced=forced,
                   override=override), boot_id


def _count_of(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")
