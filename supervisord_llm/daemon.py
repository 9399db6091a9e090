"""Composition root: builds everything, installs the signal handlers, runs until stopped.

Start-up order (SPEC): validate config, discover GPUs, reap leftovers of an earlier run, bind
the control socket and the metrics listener, launch services in config order, READY=1. Then
STATUS= as things change and WATCHDOG=1 from a loop timer at half of WATCHDOG_USEC, only while
the loop and every actor task are alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import protocol as P
from .config import Config, load_config
from .control import Commands, ControlServer, Peer
from .errors import ConfigError, ControlError, SensorError, StartupError
from .health import HttpProber
from .plan import ServicePlan, resolve_plan
from .sensors.base import GpuBackend, GpuInfo, NoGpuBackend
from .sensors.hub import CallThread, GpuHub
from .sensors.nvml import NvmlBackend
from .sensors.sim import SimBackend
from .spawn import Spawner
from .supervisor import Supervisor
from .systemd import Notifier
from .web import MetricsServer

log = logging.getLogger("llm-supervisor")

DISCOVERY_TIMEOUT_S = 30.0
TEST_HOOKS_ENV = "LLM_SUPERVISOR_TEST_HOOKS"


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
    if ov.state_dir:
        changes["state_dir"] = os.path.abspath(ov.state_dir)
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


def make_backend(cfg: Config) -> GpuBackend:
    backend = cfg.gpu.backend
    if backend == "sim":
        return SimBackend(cfg.gpu.sim, cfg.gpu.sim_state_file)
    if backend == "none":
        return NoGpuBackend()
    if backend in ("nvml", "auto"):
        nvml = _pynvml()
        if nvml is not None:
            return NvmlBackend(nvml)
        if backend == "nvml":
            raise StartupError("gpu.backend nvml: the nvidia-ml-py package is not installed")
        return NoGpuBackend()
    raise ConfigError([f'gpu.backend: "{backend}" is not available in this version of '
                       'llm-supervisor (use "nvml", "sim", "none" or "auto")'])


async def discover_gpus(cfg: Config) -> tuple[GpuBackend, list[GpuInfo]]:
    """The backend and its GPUs; `auto` without a working NVML runs without GPUs."""
    backend = make_backend(cfg)
    try:
        return backend, await discover(backend)
    except StartupError as exc:
        if cfg.gpu.backend != "auto":
            raise
        log.info("gpu.backend auto: no NVIDIA GPU (%s); running without GPU telemetry", exc)
        backend.close()
        return NoGpuBackend(), []


async def discover(backend: GpuBackend) -> list[GpuInfo]:
    thread = CallThread("gpu-discover")
    try:
        fut = asyncio.wrap_future(thread.submit(backend.discover))
        try:
            return await asyncio.wait_for(fut, DISCOVERY_TIMEOUT_S)
        except TimeoutError:
            raise StartupError(f"GPU discovery ({backend.name}) did not finish within "
                               f"{DISCOVERY_TIMEOUT_S:g} s") from None
        except SensorError as exc:
            raise StartupError(f"GPU discovery ({backend.name}) failed: {exc}") from None
    finally:
        thread.close()


def lock_state_dir(state_dir: str) -> int:
    try:
        Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(os.path.join(state_dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o640)
    except OSError as exc:
        raise StartupError(f"cannot use state_dir {state_dir}: {exc.strerror}") from None
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
        self.notifier = Notifier()
        self._signals: asyncio.Queue[str] = asyncio.Queue()
        self._status_pending = False
        self._last_status = ""
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_warned = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._reload_lock = asyncio.Lock()
        self.clock = time.monotonic

    def load(self) -> Config:
        return apply_overrides(load_config(self.config_path), self.overrides)

    async def run(self) -> int:
        """Returns the exit code: 0 clean stop, 1 config error, 2 other fatal start error."""
        cfg = self.load()  # ConfigError -> 1 (cli)
        self.cfg = cfg
        for warning in cfg.warnings:
            log.warning("config: %s", warning)
        backend, self.gpus = await discover_gpus(cfg)
        plans = resolve_plan(cfg, self.gpus)
        lock_fd = lock_state_dir(cfg.supervisor.state_dir)
        spawner = Spawner(cfg.supervisor.state_dir)
        hub = GpuHub(backend, self.gpus, cfg.gpu.poll_interval_s, cfg.gpu.call_timeout_s)
        prober = HttpProber()
        control: ControlServer | None = None
        web: MetricsServer | None = None
        try:
            found = await spawner.reap_leftovers(
                max((s.stop.timeout_s for s in cfg.services), default=10.0))
            if found:
                log.warning("stopped processes left by an earlier run: %s", ", ".join(found))
            await spawner.start()
            sup = Supervisor(cfg, plans, hub, spawner, prober)
            self.sup = sup
            commands = Commands(sup, self.reload)
            control = ControlServer(cfg.supervisor.control_socket,
                                    cfg.supervisor.control_group,
                                    self._dispatch_with_hooks(commands))
            await control.start()
            if cfg.metrics.listen is not None:
                web = MetricsServer(sup, cfg.metrics.listen, self.clock)
                await web.start()
            await sup.start_gates()
            await hub.poll_once()
            loop = asyncio.get_running_loop()
            for sig, what in ((signal.SIGTERM, "term"), (signal.SIGINT, "term"),
                              (signal.SIGHUP, "hup")):
                loop.add_signal_handler(sig, self._signals.put_nowait, what)
            self._tasks = [
                loop.create_task(hub.run(), name="gpu-hub"),
                loop.create_task(sup.monitor_loop(), name="loop-monitor"),
            ]
            sup.on_change(self._schedule_status)
            hub.on_update(self._schedule_status)
            self._start_watchdog()
            await sup.start_all()
            self._last_status = sup.status_line()
            self.notifier.ready(self._last_status)
            log.info("llm-supervisor ready: %d services, %d GPUs (%s), control %s, metrics %s",
                     len(plans), len(self.gpus), backend.name, cfg.supervisor.control_socket,
                     cfg.metrics.listen or "off")
            await self._main_loop(sup)
            return 0
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            for task in self._tasks:
                task.cancel()
            if self.sup is not None:
                await self.sup.close()
            if control is not None:
                await control.close()
            if web is not None:
                await web.close()
            await prober.close()
            await spawner.close()
            hub.close()
            os.close(lock_fd)
            self.notifier.close()

    async def _main_loop(self, sup: Supervisor) -> None:
        stopping: asyncio.Task[None] | None = None
        while True:
            if stopping is not None:
                sig_wait = asyncio.ensure_future(self._signals.get())
                done, _ = await asyncio.wait({stopping, sig_wait},
                                             return_when=asyncio.FIRST_COMPLETED)
                if stopping in done:
                    sig_wait.cancel()
                    stopping.result()
                    log.info("all services stopped; exiting")
                    return
                what = sig_wait.result()
            else:
                what = await self._signals.get()
            if what == "term":
                if stopping is None:
                    log.info("stopping: services in reverse order (again to stop at once)")
                    self.notifier.stopping("stopping services")
                    stopping = asyncio.get_running_loop().create_task(sup.stop_all())
                else:
                    log.warning("second stop signal: killing every service now")
                    sup.kill_all()
            elif what == "hup" and stopping is None:
                with contextlib.suppress(ControlError):  # logged; the old config stays
                    await self.reload()

    # --- status and watchdog ---------------------------------------------------------------

    def _schedule_status(self) -> None:
        if not self._status_pending:
            self._status_pending = True
            asyncio.get_running_loop().call_soon(self._send_status)

    def _send_status(self) -> None:
        self._status_pending = False
        if self.sup is None:
            return
        line = self.sup.status_line()
        if line != self._last_status:
            self._last_status = line
            self.notifier.status(line)

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

    async def reload(self) -> dict[str, Any]:
        assert self.sup is not None
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                try:
                    cfg = self.load()
                    plans: list[ServicePlan] = resolve_plan(cfg, self.gpus)
                except ConfigError as exc:
                    for problem in exc.problems:
                        log.error("reload: %s", problem)
                    log.error("reload: keeping the running configuration")
                    raise ControlError(P.CONFIG_ERROR, "new configuration is invalid, "
                                       "keeping the running one: " + "; ".join(exc.problems)
                                       ) from None
                res = await self.sup.reload(cfg, plans)
                self.cfg = cfg
                for w in res.warnings:
                    log.warning("reload: %s", w)
                log.info("reloaded: added %s, removed %s, restarted %s, unchanged %s",
                         res.added or "-", res.removed or "-", res.restarted or "-",
                         res.unchanged or "-")
                return res.as_dict()
            finally:
                self.notifier.ready(self.sup.status_line())

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
            return await commands.dispatch(req, peer)

        return dispatch


def run(config_path: str, overrides: Overrides) -> int:
    daemon = Daemon(config_path, overrides)
    return asyncio.run(daemon.run())


def fatal(message: str) -> None:
    journal = bool(os.environ.get("JOURNAL_STREAM")) or not sys.stderr.isatty()
    from .logs import error_line

    sys.stderr.write(error_line(message, journal) + "\n")
