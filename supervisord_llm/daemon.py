"""Composition root: builds everything, installs the signal handlers, runs until stopped.

Start-up order (SPEC): validate config, discover GPUs, reap leftovers of an earlier run, bind
the control socket and the metrics listener, launch services in config order, READY=1. Then
STATUS= as things change and WATCHDOG=1 from a loop timer at half of WATCHDOG_USEC, only while
the loop and every actor task are alive. Signal handlers only enqueue; the host actor does the
work (a reload never holds up a stop).
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import protocol as P
from .access import Access
from .checkpoints import CheckpointRunner
from .config import Config, load_config, one_line, state_dir_problem
from .control import Commands, ControlServer, Peer
from .demand import Swapper
from .errors import ConfigError, ControlError, StartupError
from .front.client import FrontClient
from .guard import GpuGuard, LimitStore
from .health import HttpProber
from .host import Host
from .ledger import Decisions, Ledger
from .parts import Parts
from .plan import ServicePlan, resolve_plan
from .power import PowerController
from .probe import GenerationProber
from .sensors.base import GpuInfo
from .sensors.discovery import Discovery, discover_gpus, vendor_backends
from .sensors.events import EventSource, GpuEvents
from .sensors.hub import GpuHub
from .sensors.nvml import NvmlBackend, NvmlXidSource
from .sensors.udev import UdevSource
from .spawn import Spawner
from .status import status_line
from .supervisor import Supervisor
from .systemd import (
    STOP_SIGNALS,
    Notifier,
    Systemd,
    can_run_units,
    job_of,
    listen_fds,
    own_unit,
)
from .web import MetricsServer

log = logging.getLogger("llm-supervisor")

DISCOVERY_TIMEOUT_S = 30.0
TEST_HOOKS_ENV = "LLM_SUPERVISOR_TEST_HOOKS"
STATE_DIR_CHECK_S = 5.0
REPROBE_S = 30.0  # a lost GPU is asked again this often whether it answers
NOFILE_CAP = 1 << 20
# STATUS= at most this often (a flapping sensor must not flood systemd); the latest line wins
STATUS_MIN_INTERVAL_S = 1.0
RELOAD_READ_TIMEOUT_S = 30.0  # reading the config (a hung NFS mount) must not hold a reload
RELOAD_PROBLEMS_SHOWN = 20  # in the log and in llmctl's answer (--check shows 100)


@dataclasses.dataclass(frozen=True)
class Overrides:
    control_socket: str | None = None
    state_dir: str | None = None
    log_format: str | None = None


def apply_overrides(cfg: Config, ov: Overrides) -> Config:
    sup = cfg.supervisor
    changes: dict[str, Any] = {}
    if ov.control_socket:
        changes["control_socket"] = os.path.abspath(ov.control_socket)
        if (why := state_dir_problem(os.path.dirname(changes["control_socket"]))) is not None:
            raise ConfigError([f"--control-socket: its directory cannot be made: {why}"])
    if ov.state_dir:
        changes["state_dir"] = os.path.abspath(ov.state_dir)
        if (why := state_dir_problem(changes["state_dir"])) is not None:
            raise ConfigError([f"--state-dir: {why}"])  # as supervisor.state_dir's would be
    if ov.log_format:
        changes["log_format"] = ov.log_format
    if not changes:
        return cfg
    return dataclasses.replace(cfg, supervisor=dataclasses.replace(sup, **changes))


def _pynvml() -> Any:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    return pynvml


async def discover(cfg: Config) -> Discovery:
    """The GPUs and their backends (NVML; later AMD sysfs; sim; none)."""
    return await discover_gpus(cfg.gpu, vendor_backends(_pynvml), timeout_s=DISCOVERY_TIMEOUT_S)


async def _never(req: P.Request, peer: Peer) -> Any:  # pragma: no cover - never serves
    raise ControlError(P.FAILED, "not serving")


def _pyudev() -> Any:
    try:
        import pyudev
    except ImportError:
        return None
    return pyudev


def event_sources(hub: GpuHub, gpus: list[GpuInfo]) -> list[EventSource]:
    """Where GPU losses are seen besides a failed read: NVML's critical Xid events, and the
    kernel's PCI remove/add (udev) for real GPUs."""
    sources: list[EventSource] = []
    nvml = [g for g in gpus if g.backend == "nvml"]
    for backend in hub.backends:
        if isinstance(backend, NvmlBackend) and nvml:
            sources.append(NvmlXidSource(backend, nvml))
    real = {g.pci_bus_id: g.uuid for g in gpus if g.backend in ("nvml", "amd-sysfs")
            and g.pci_bus_id}
    pyudev = _pyudev() if real else None
    if pyudev is not None:
        sources.append(UdevSource(pyudev, real))
    return sources


def raise_nofile(cfg: Config) -> None:
    """Take the hard limit of file descriptors (a shell's soft limit is often 1024, which a
    gate's default max_connections alone would use up); warn if the gates can still take
    more connections than that."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else NOFILE_CAP
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            log.info("file descriptors: soft limit raised from %d to %d", soft, want)
            soft = want
        except (OSError, ValueError) as exc:
            log.warning("file descriptors: cannot raise the soft limit %d: %s", soft, exc)
    # a client connection and an upstream one per request, and some for everything else
    need = sum(2 * s.gate.max_connections for s in cfg.services if s.gate) + 256
    if soft != resource.RLIM_INFINITY and need > soft:
        log.warning("file descriptors: the gates may take %d connections but the limit is %d; "
                    "raise LimitNOFILE (the unit sets 65536) or lower max_connections",
                    need, soft)


def _lock_intact(state_dir: str, fd: int) -> bool:
    try:
        return os.stat(os.path.join(state_dir, "lock")).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


def lock_state_dir(state_dir: str) -> int:
    try:
        Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(os.path.join(state_dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o640)
    except OSError as exc:  # made into a file since the config was read, or no permission
        why = state_dir_problem(state_dir) or exc.strerror
        raise StartupError(f"cannot use state_dir {state_dir}: {why}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"state_dir {state_dir} is locked: another llm-supervisor is "
                           "running with it") from None
    return fd


class Daemon:
    def __init__(self, config_path: str, overrides: Overrides) -> None:
        self.config_path = config_path
        self.overrides = overrides
        self.cfg: Config | None = None
        self.gpus: list[GpuInfo] = []
        self.sup: Supervisor | None = None
        self.host: Host | None = None
        self.parts: Parts | None = None  # once every part is built
        self.notifier = Notifier()
        self._signals: asyncio.Queue[str] = asyncio.Queue()
        self._last_signal = "a signal"  # (which one: said in the log)
        self._status_pending = False
        self._last_status = ""
        self._status_mode = ""
        self._status_sent_at = -STATUS_MIN_INTERVAL_S
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_warned = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._lock_fd = -1
        self.ledger = Ledger(None)  # the operator's decisions, kept across a restart
        self.unit: str | None = None  # our systemd unit, when run as one
        self.clock = time.monotonic
        self.access: Access | None = None

    def load(self) -> Config:
        return apply_overrides(load_config(self.config_path), self.overrides)

    async def run(self) -> int:
        """Returns the exit code: 0 clean stop, 1 config error, 2 other fatal start error."""
        cfg = await asyncio.to_thread(self.load)  # ConfigError -> 1 (cli)
        self.cfg = cfg
        for warning in cfg.warnings:
            log.warning("config: %s", warning)
        raise_nofile(cfg)
        disc = await discover(cfg)
        log.info("%s", disc.message)
        self.gpus = list(disc.gpus)
        try:
            plans = await asyncio.to_thread(resolve_plan, cfg, self.gpus)
            self._lock_fd = lock_state_dir(cfg.supervisor.state_dir)
            self.ledger = Ledger(cfg.supervisor.state_dir)
        except BaseException:
            await disc.aclose()
            raise
        # under systemd: the keepers in transient units, their leases in the fd store
        self.unit = own_unit()
        systemd = Systemd(self.notifier, listen_fds()) if can_run_units() else None
        if self.unit is not None and systemd is None:
            log.warning("running as %s without systemd-run (or not as root): the models run "
                        "in its cgroup, and a restart of the unit restarts them", self.unit)
        spawner = Spawner(cfg.supervisor.state_dir, adopt_grace_s=cfg.supervisor.adopt_grace_s,
                          unattended_limit_s=cfg.supervisor.unattended_limit_s,
                          log_format=cfg.supervisor.log_format, systemd=systemd)
        hub = disc.hub(cfg.gpu.poll_interval_s, cfg.gpu.call_timeout_s,
                       health_interval_s=cfg.gpu.health_interval_s)
        events: GpuEvents | None = None
        prober = HttpProber()
        control: ControlServer | None = None
        web: MetricsServer | None = None
        try:
            # a SIGTERM during the start-up (the adoption of an earlier daemon's models) is a
            # stop like any other, handled once the start is done: not the default's death,
            # which would leave the models to their grace
            loop = asyncio.get_running_loop()
            for sig, what in ((signal.SIGTERM, "term"), (signal.SIGINT, "term"),
                              (signal.SIGHUP, "hup")):
                loop.add_signal_handler(sig, self._signal, what, sig)
            # blocked since the entry point: what came meanwhile is delivered now, to these
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            # another daemon on this socket: refuse before the sweep can touch its services
            await ControlServer(cfg.supervisor.control_socket, None, _never).check_free()
            found = await spawner.reap_leftovers(
                max((s.stop.timeout_s for s in cfg.services), default=10.0))
            if found:
                log.warning("stopped processes left by an earlier run: %s", ", ".join(found))
            adoptable = await spawner.adopt()  # the models an earlier daemon left running
            # containers of this state directory that no keeper holds now: a dead run's
            await spawner.keepers.sweep_containers(
                {run.runtime for p in plans if (run := p.container_run()) is not None})
            if systemd is not None and (gone := systemd.leftover()):
                log.info("dropped %d lease(s) of keepers gone meanwhile from the fd store",
                         len(gone))
            decisions = await self.ledger.load()  # the operator's stops, drains and pins
            await spawner.start()
            # the parts, each given what it needs; the record of them goes to status,
            # metrics and the control commands
            sup = Supervisor(cfg, plans, hub, spawner, prober, front=lambda: FrontClient(
                Path(cfg.supervisor.state_dir) / "front",
                grace_s=cfg.supervisor.adopt_grace_s,
                unattended_s=cfg.supervisor.unattended_limit_s,
                log_format=cfg.supervisor.log_format, systemd=systemd,
                memory_max_mb=cfg.supervisor.front_memory_max_mb))
            self.sup = sup
            access = Access(sup.set_door)
            self.access = access
            await asyncio.to_thread(access.load, cfg)  # ConfigError: a broken keys file
            sup.door = access.doc()
            host = Host(sup, self._load_for_reload, self._reloading)
            self.host = host
            host.under_systemd = self.unit is not None
            guard = GpuGuard(sup, host, hub, cfg.thermal, LimitStore(cfg.supervisor.state_dir),
                             clock=self.clock)
            events = GpuEvents(self.gpus, guard.on_gpu_event, hub=hub,
                               sources=event_sources(hub, self.gpus))
            power = PowerController(sup, host, cfg.power, CheckpointRunner(sup),
                                    set_ceiling=guard.set_ceiling, recheck=guard.poke,
                                    clock=self.clock)
            parts = Parts(sup, host, guard, power, GenerationProber(sup, host, clock=self.clock),
                          events, Swapper(sup, host, clock=self.clock), access)
            self.parts = parts
            control = ControlServer(cfg.supervisor.control_socket,
                                    cfg.supervisor.control_group,
                                    self._dispatch_with_hooks(Commands(parts, self.clock)))
            await control.start()
            if cfg.metrics.listen is not None:
                web = MetricsServer(parts, cfg.metrics.listen, self.clock, self.notifier)
                await web.start()
            await sup.start_gates()
            await hub.poll_once()
            # what an earlier run lowered and did not restore (taken over, with its models)
            await guard.restore_leftovers(adopt=bool(adoptable))
            events.start()
            low_at_start = await power.first_reading(adopting=bool(adoptable))
            gen_probes, swapper = parts.probes, parts.swapper
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(hub.run(), name="gpu-hub"),
                loop.create_task(sup.monitor_loop(), name="loop-monitor"),
                loop.create_task(host.run(), name="host"),
                loop.create_task(self._guard_state_dir(cfg.supervisor.state_dir, spawner),
                                 name="state-dir-guard"),
                loop.create_task(guard.reprobe(events.probe_back, REPROBE_S), name="reprobe"),
            ]
            self._tasks.append(loop.create_task(gen_probes.run(), name="generation-probes"))
            self._tasks.append(loop.create_task(swapper.run(), name="models-on-demand"))
            if power.poller is not None:  # a task that ends stops the watchdog: only with NUT
                self._tasks.append(loop.create_task(power.run(), name="power"))
            sup.on_change(self._schedule_status)
            host.on_change(self._schedule_status)
            hub.on_update(self._schedule_status)
            hub.on_update(guard.poke)
            self._start_watchdog()
            adopted = await sup.start_all(hold="powered_down" if low_at_start else None,
                                          adoptable=adoptable,
                                          held={n for n, d in decisions.items() if d.held})
            sup.release_upstreams()  # (a front an earlier daemon left: it followed them)
            await self._reapply(parts, decisions, adopted)
            sup.on_change(lambda: self.ledger.record(decisions_of(parts)))
            if adopted:
                self._tasks.append(loop.create_task(sup.time_reattach(adopted),
                                                    name="reattach"))
            self._last_status = status_line(parts)
            self._status_mode = host.mode.value
            self.notifier.ready(self._last_status)
            log.info("llm-supervisor ready: %d services, %d GPUs (%s), control %s, metrics %s",
                     len(plans), len(self.gpus), hub.backend_names,
                     cfg.supervisor.control_socket, cfg.metrics.listen or "off")
            await self._main_loop(host)
            return 0
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            for task in self._tasks:
                task.cancel()
            if self.parts is not None:
                await self.parts.power.close()
                await self.parts.probes.close()
                await self.parts.swapper.close()
            if self.sup is not None:
                await self.sup.close(
                    handover=self.host is not None and self.host.handing_over)
            if control is not None:
                await control.close()
            if web is not None:
                await web.close()
            await prober.close()
            await self.ledger.flush()
            handover = self.host is not None and self.host.handing_over
            spawner.handover = handover  # the keepers stay, and the power limits (adopted)
            await spawner.close()
            if self.parts is not None and not handover:
                await self.parts.guard.restore_all()
            if events is not None:
                await events.aclose()  # before nvmlShutdown: no thread may wait in NVML
            await hub.aclose()
            os.close(self._lock_fd)
            if self._status_pending:  # the last word (stopped, shutting_down) is not lost
                self._send_status()
            self.notifier.close()

    async def _main_loop(self, host: Host) -> None:
        """Signals, in order: a stop hands over to the host (again: SIGKILL everything); a
        reload is queued on the host and never waited for here."""
        stopped = asyncio.ensure_future(host.stopped.wait())
        try:
            while True:
                sig_wait = asyncio.ensure_future(self._signals.get())
                done, _ = await asyncio.wait({stopped, sig_wait},
                                             return_when=asyncio.FIRST_COMPLETED)
                if stopped in done:
                    sig_wait.cancel()
                    if host.handing_over:
                        log.info("handed over; exiting")
                    else:
                        log.info("all services stopped; exiting")
                    return
                what = sig_wait.result()
                if what == "term" and host.mode.value != "shutting_down" \
                        and self.unit is not None and await self._restarting():
                    # `systemctl restart`: the models stay with their keepers (the leases in
                    # the fd store); the next start adopts them
                    log.info("%s is being restarted: exiting, the models stay for the next "
                             "start", self.unit)
                    host.handing_over = True
                    return
                if what == "term":
                    if host.mode.value != "shutting_down":
                        log.info("stopping (%s): services in reverse order (again to stop at "
                                 "once)", self._last_signal)
                        self.notifier.stopping("stopping services")
                    host.shutdown(fast=host.mode.value == "shutting_down")
                elif what == "hup":
                    asyncio.get_running_loop().create_task(self._sighup(host))
        finally:
            stopped.cancel()

    def _signal(self, what: str, sig: int) -> None:
        self._last_signal = signal.Signals(sig).name
        self._signals.put_nowait(what)

    async def _restarting(self) -> bool:
        """Whether the SIGTERM is a restart of our unit (`systemctl list-jobs`), with the
        keepers out of its cgroup: only then do the models stay."""
        if self.unit is None or self.sup is None or self.sup.spawner.keepers.systemd is None:
            return False
        return await job_of(self.unit) in ("restart", "try-restart", "reload-or-restart")

    async def _sighup(self, host: Host) -> None:
        try:
            await host.reload()
        except ControlError as exc:  # what went wrong is logged where it went wrong
            log.info("reload (SIGHUP) not done: %s", exc.message)
        except Exception as exc:  # never let a reload take the daemon down
            log.error("reload: failed: %s", one_line(f"{type(exc).__name__}: {exc}"))

    # --- status and watchdog ---------------------------------------------------------------

    def _schedule_status(self) -> None:
        """STATUS= soon: at once, or (coalesced) STATUS_MIN_INTERVAL_S after the last one. A
        change of mode (on battery, shutting down) goes at once: it is what an operator
        watching `systemctl status` needs to see, and it is rare."""
        mode_changed = self.host is not None and self.host.mode.value != self._status_mode
        if mode_changed or not self._status_pending:
            self._status_pending = True
            loop = asyncio.get_running_loop()
            wait = self._status_sent_at + STATUS_MIN_INTERVAL_S - loop.time()
            if wait > 0 and not mode_changed:
                loop.call_later(wait, self._send_status)
            else:
                loop.call_soon(self._send_status)

    def _send_status(self) -> None:
        self._status_pending = False
        if self.parts is None:
            return
        line = status_line(self.parts)
        self._status_mode = self.parts.host.mode.value
        if line != self._last_status:
            self._last_status = line
            self._status_sent_at = asyncio.get_running_loop().time()
            self.notifier.status(line)

    async def _reapply(self, parts: Parts, decisions: dict[str, Decisions],
                       adopted: list[str]) -> None:
        """The operator's drains and pins from before the restart (their stops are holds
        the services started with)."""
        sup, loop = parts.sup, asyncio.get_running_loop()
        drained = [n for n, d in decisions.items() if d.drained and sup.gate_of(n) is not None]
        if drained:
            log.info("drained by the operator before the restart, drained again: %s",
                     ", ".join(drained))
            await parts.host.drain(drained, "operator", 0.0)
        pinned = [n for n, d in decisions.items() if d.pinned and n in sup.actors
                  and sup.actors[n].cfg.on_demand and not d.held]
        for name in pinned:
            if name in adopted:
                parts.swapper.pinned.add(name)
            else:  # it was not running: loaded and pinned again, as `llmctl start` would
                self._tasks.append(loop.create_task(self._pin_again(parts, name),
                                                    name=f"pin-{name}"))
        self.ledger.record(decisions_of(parts))

    async def _pin_again(self, parts: Parts, name: str) -> None:
        try:
            await parts.swapper.start([name])
        except ControlError as exc:
            log.warning("%s: pinned before the restart, not loaded again: %s", name,
                        exc.message)

    async def _guard_state_dir(self, state_dir: str, spawner: Spawner) -> None:
        """A state directory removed while the daemon runs (an operator's `rm -rf`) takes the
        lock file with it: another daemon could then take the directory and sweep our
        services as leftovers. Every STATE_DIR_CHECK_S the lock is checked, off the loop, and
        taken again (with the process record) if it is gone."""
        while True:
            await asyncio.sleep(STATE_DIR_CHECK_S)
            if self.parts is not None:  # what a drain or a pin changed without a transition
                self.ledger.record(decisions_of(self.parts))
            if await asyncio.to_thread(_lock_intact, state_dir, self._lock_fd):
                continue
            try:
                fd = await asyncio.to_thread(lock_state_dir, state_dir)
            except StartupError as exc:
                log.error("the state directory's lock was removed and cannot be taken again: "
                          "%s", exc)
                continue
            old, self._lock_fd = self._lock_fd, fd
            os.close(old)
            spawner.record_again()
            log.warning("state_dir %s (or its lock file) was removed while running: created "
                        "again and locked", state_dir)

    def _start_watchdog(self) -> None:
        interval = self.notifier.watchdog_interval_s
        if interval is None or self.sup is None:
            return
        log.info("systemd watchdog: pinging every %.3g s", interval)
        self._watchdog = asyncio.get_running_loop().call_later(interval, self._pet, interval)

    def _pet(self, interval: float) -> None:
        """Runs on the loop: if this fires, the loop is alive. Also require every actor and
        poller task to be alive; a dead one means the daemon should be restarted."""
        sup = self.sup
        assert sup is not None
        dead = [t.get_name() for t in self._tasks if t.done()]
        if not sup.tasks_alive():
            dead += [a.name for a in sup.actors.values() if not a.alive]
        if dead:
            if not self._watchdog_warned:
                log.error("internal task(s) ended: %s; not petting the watchdog",
                          ", ".join(dead))
                self._watchdog_warned = True
        elif self.notifier.watchdog():
            sup.loop.watchdog_pings += 1
        self._watchdog = asyncio.get_running_loop().call_later(interval, self._pet, interval)

    # --- reload ----------------------------------------------------------------------------

    def _reloading(self, started: bool) -> None:
        if started:
            self.notifier.reloading()
        elif self.parts is not None:
            self.notifier.ready(status_line(self.parts))

    async def _load_for_reload(self) -> tuple[Config, list[ServicePlan]]:
        """Read and validate the config off the loop. Any failure keeps the running config:
        it is logged (briefly) and raised as ControlError."""
        try:
            try:
                cfg = await asyncio.wait_for(asyncio.to_thread(self.load),
                                             RELOAD_READ_TIMEOUT_S)
                plans: list[ServicePlan] = await asyncio.to_thread(resolve_plan, cfg,
                                                                   self.gpus)
            except BaseException:
                if self.access is not None:  # the audit file opened again all the same
                    await self.access.push()  # (logrotate's reload)
                raise
            if self.access is not None:  # the keys file read again (a hand edit), and the
                await self.access.reload(cfg)  # audit file opened again
        except ConfigError as exc:
            for problem in exc.problems[:RELOAD_PROBLEMS_SHOWN]:
                log.error("reload: %s", problem)
            more = len(exc.problems) - RELOAD_PROBLEMS_SHOWN
            shown = "; ".join(exc.problems[:RELOAD_PROBLEMS_SHOWN]) + (
                f"; ... and {more} more (see the log)" if more > 0 else "")
            if more > 0:
                log.error("reload: ... and %d more problems", more)
            log.error("reload: keeping the running configuration")
            raise ControlError(P.CONFIG_ERROR, "new configuration is invalid, "
                               "keeping the running one: " + shown) from None
        except TimeoutError:
            log.error("reload: reading %s took longer than %g s; keeping the running "
                      "configuration", self.config_path, RELOAD_READ_TIMEOUT_S)
            raise ControlError(P.FAILED, f"reading {self.config_path} took longer "
                               f"than {RELOAD_READ_TIMEOUT_S:g} s; keeping the "
                               "running configuration") from None
        except Exception as exc:
            why = one_line(f"{type(exc).__name__}: {exc}")
            log.error("reload: cannot read the configuration (%s); keeping the running "
                      "configuration", why)
            log.debug("reload failure", exc_info=True)
            raise ControlError(P.FAILED, f"reload failed ({why}); keeping the running "
                               "configuration") from None
        for warning in cfg.warnings:
            log.warning("config: %s", warning)
        self.cfg = cfg
        if self.access is not None:
            log.info("reload: %s", self.access.summary())
        return cfg, plans

    def _dispatch_with_hooks(self, commands: Commands) -> Any:
        hooks = os.environ.get(TEST_HOOKS_ENV) == "1"

        async def dispatch(req: P.Request, peer: Peer) -> Any:
            if hooks and req.cmd == "status" and "debug_block_loop_s" in req.args:
                # Test hook (only with LLM_SUPERVISOR_TEST_HOOKS=1): block the event loop, as
                # a bug would, to prove that systemd's watchdog then restarts the daemon.
                seconds = req.args["debug_block_loop_s"]
                if isinstance(seconds, (int, float)) and 0 < seconds <= 600:
                    log.warning("test hook: blocking the event loop for %g s", seconds)
                    time.sleep(float(seconds))  # noqa: ASYNC251 - the point of the hook
                    return {"blocked_s": seconds}
            try:
                return await commands.dispatch(req, peer)
            finally:
                if req.cmd in ("start", "stop", "drain", "resume", "reset") \
                        and self.parts is not None:
                    # the operator's decision is on disk when llmctl returns: a crash right
                    # after it keeps it
                    self.ledger.record(decisions_of(self.parts))
                    await self.ledger.flush()

        return dispatch


def decisions_of(parts: Parts) -> dict[str, Decisions]:
    """The operator's decisions as they stand, per service (for the ledger)."""
    out = {}
    for name, actor in parts.sup.actors.items():
        gate = parts.sup.gate_of(name)
        out[name] = Decisions(held="operator" in actor.holds,
                              drained=gate is not None and "operator" in gate.drains,
                              pinned=name in parts.swapper.pinned)
    return out


def run(config_path: str, overrides: Overrides) -> int:
    daemon = Daemon(config_path, overrides)
    return asyncio.run(daemon.run())


def fatal(message: str) -> None:
    journal = bool(os.environ.get("JOURNAL_STREAM")) or not sys.stderr.isatty()
    from .logs import error_line

    sys.stderr.write(error_line(message, journal) + "\n")
