"""The only place that starts or signals processes.

- Each service runs in its own session and process group, through the exec shim
  (`_shim.py`), which sets the parent-death signal, CPU affinity and memory binding.
- A guardian process (`_guardian.py`) holds the list of live groups and SIGKILLs them when the
  daemon disappears, however it ended.
- Every launch is recorded with its start time in `state_dir/processes.json`, so that a daemon
  started after a crash of both finds and stops what is left before launching again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from .errors import SpawnError, StartupError

log = logging.getLogger(__name__)

_PKG = Path(__file__).resolve().parent
SHIM = str(_PKG / "_shim.py")
GUARDIAN = str(_PKG / "_guardian.py")
_LINE_LIMIT = 64 * 1024


@dataclass(frozen=True)
class LaunchSpec:
    service: str
    argv: tuple[str, ...]
    env: dict[str, str]
    cpus: tuple[int, ...] | None = None
    mem_node: int | None = None
    user: str | None = None


class ServiceProcess:
    """A launched service: its main process (awaited, never polled) and its process group."""

    def __init__(self, spec: LaunchSpec, proc: asyncio.subprocess.Process,
                 create_time: float, spawner: Spawner) -> None:
        self.spec = spec
        self.proc = proc
        self.pid = proc.pid
        self.pgid = proc.pid  # start_new_session: the service leads its own group
        self.create_time = create_time
        self.launched_at = time.monotonic()
        self._spawner = spawner
        self._released = False
        self.log_task: asyncio.Task[None] | None = None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def wait(self) -> int:
        return await self.proc.wait()

    def signal_group(self, sig: int) -> bool:
        """Signal the whole group; False if nothing of it is left."""
        if self._released:
            return False
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            return False
        except PermissionError as exc:
            log.error("%s: cannot signal process group %d: %s", self.spec.service, self.pgid, exc)
            return False
        return True

    def group_alive(self) -> bool:
        if self._released:
            return False
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def release(self) -> None:
        """The group is empty: forget it (guardian and state file)."""
        if not self._released:
            self._released = True
            self._spawner.forget(self)


def _user_env(user: str) -> tuple[int, int, dict[str, str]]:
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid, {"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name}


class Spawner:
    def __init__(self, state_dir: str | Path | None, use_guardian: bool = True,
                 on_output: Callable[[str, str], None] | None = None) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.use_guardian = use_guardian
        self.on_output = on_output or (lambda service, line: log.info("[%s] %s", service, line))
        self._live: dict[int, ServiceProcess] = {}
        self._guardian: asyncio.subprocess.Process | None = None
        self._guardian_fd: int | None = None
        self._guardian_watch: asyncio.Task[None] | None = None
        self._closing = False

    # --- the guardian ------------------------------------------------------------------------

    async def start(self) -> None:
        if self.use_guardian:
            await self._start_guardian()

    async def _start_guardian(self) -> None:
        rfd, wfd = os.pipe()  # both non-inheritable: no service gets the write end
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", GUARDIAN,
                stdin=rfd, stdout=asyncio.subprocess.DEVNULL, start_new_session=True,
            )
        except OSError as exc:
            os.close(rfd)
            os.close(wfd)
            raise StartupError(f"cannot start the orphan guardian: {exc}") from None
        os.close(rfd)
        os.set_blocking(wfd, False)
        self._guardian = proc
        self._guardian_fd = wfd
        for live in self._live.values():
            self._tell_guardian(f"+{live.pgid}\n")
        self._guardian_watch = asyncio.get_running_loop().create_task(
            self._watch_guardian(proc, wfd), name="guardian-watch")

    async def _watch_guardian(self, proc: asyncio.subprocess.Process, wfd: int) -> None:
        """A guardian that dies (killed by hand, OOM) is replaced at once."""
        code = await proc.wait()
        if self._closing or self._guardian is not proc:
            return
        log.error("orphan guardian (pid %d) ended (%s); starting a new one", proc.pid, code)
        if self._guardian_fd == wfd:
            os.close(wfd)
            self._guardian_fd = None
        try:
            await self._start_guardian()
        except StartupError as exc:
            log.error("%s: services are not protected against a crash of the supervisor",
                      exc)

    def _tell_guardian(self, line: str) -> None:
        if self._guardian_fd is None:
            return
        try:
            os.write(self._guardian_fd, line.encode())
        except BlockingIOError:
            log.error("orphan guardian is not reading its pipe; %s not recorded", line.strip())
        except OSError as exc:  # it died: _watch_guardian replaces it and re-registers all
            log.debug("orphan guardian pipe: %s", exc)

    def guardian_pid(self) -> int | None:
        return self._guardian.pid if self._guardian is not None else None

    async def close(self) -> None:
        """Stop the guardian cleanly: groups still registered are killed by it."""
        self._closing = True
        if self._guardian_fd is not None:
            os.close(self._guardian_fd)
            self._guardian_fd = None
        if self._guardian is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._guardian.wait(), 5)
            self._guardian = None

    # --- launching ---------------------------------------------------------------------------

    async def launch(self, spec: LaunchSpec) -> ServiceProcess:
        env = dict(spec.env)
        creds = "-"
        if spec.user is not None:
            try:
                uid, gid, user_env = _user_env(spec.user)
            except KeyError:
                raise SpawnError(f"no such user {spec.user!r}") from None
            env.update(user_env)
            if uid != os.geteuid():
                groups = ",".join(str(g) for g in os.getgrouplist(spec.user, gid))
                creds = f"{uid}:{gid}:{groups}"
        exe = shutil.which(spec.argv[0], path=env.get("PATH", os.defpath))
        if exe is None:
            raise SpawnError(f"command not found: {spec.argv[0]!r}"
                             + ("" if "/" in spec.argv[0] else " (not in PATH)"))
        cpus = ",".join(str(c) for c in spec.cpus) if spec.cpus else "-"
        mem = str(spec.mem_node) if spec.mem_node is not None else "-"
        argv = (sys.executable, "-I", "-S", SHIM, str(os.getpid()), str(int(signal.SIGKILL)),
                cpus, mem, creds, "--", *spec.argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
                limit=_LINE_LIMIT,
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            raise SpawnError(f"cannot launch {spec.argv[0]!r}: {exc}") from None
        try:
            create_time = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            create_time = 0.0
        sp = ServiceProcess(spec, proc, create_time, self)
        self._live[sp.pgid] = sp
        self._tell_guardian(f"+{sp.pgid}\n")
        self._save_state()
        if proc.stdout is not None:
            sp.log_task = asyncio.get_running_loop().create_task(
                self._forward(spec.service, proc.stdout), name=f"log-{spec.service}"
            )
        return sp

    async def _forward(self, service: str, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await stream.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    self.on_output(service, exc.partial.decode("utf-8", "replace").rstrip())
                return
            except asyncio.LimitOverrunError as exc:
                chunk = await stream.readexactly(exc.consumed)
                self.on_output(service, chunk.decode("utf-8", "replace") + " [line cut]")
                continue
            except (OSError, ValueError):
                return
            self.on_output(service, line.decode("utf-8", "replace").rstrip())

    def forget(self, proc: ServiceProcess) -> None:
        if self._live.pop(proc.pgid, None) is not None:
            self._tell_guardian(f"-{proc.pgid}\n")
            self._save_state()

    def kill_all(self) -> None:
        """Fast stop: SIGKILL every live group."""
        for proc in list(self._live.values()):
            proc.signal_group(signal.SIGKILL)

    # --- the record of launched groups, for a restart after a crash -------------------------

    def _state_file(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / "processes.json"

    def _save_state(self) -> None:
        path = self._state_file()
        if path is None:
            return
        records = [
            {"service": p.spec.service, "pid": p.pid, "pgid": p.pgid,
             "create_time": p.create_time}
            for p in self._live.values()
        ]
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"daemon_pid": os.getpid(), "processes": records}))
            os.replace(tmp, path)
        except OSError as exc:
            log.error("cannot record processes in %s: %s", path, exc)

    async def reap_leftovers(self, timeout_s: float = 10.0) -> list[str]:
        """Stop process groups left by an earlier run of the daemon. Returns what was found."""
        path = self._state_file()
        if path is None or not path.exists():
            return []
        try:
            doc = json.loads(path.read_text())
            records = doc["processes"]
            if not isinstance(records, list):
                raise TypeError("processes is not a list")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return []
        groups: list[tuple[str, int]] = []
        for rec in records:
            try:
                service, pid, pgid = str(rec["service"]), int(rec["pid"]), int(rec["pgid"])
                created = float(rec["create_time"])
            except (KeyError, TypeError, ValueError):
                continue
            if pgid <= 1 or pid <= 1:
                continue
            try:
                same = abs(psutil.Process(pid).create_time() - created) < 0.05
            except psutil.NoSuchProcess:
                same = True  # leader gone: what is left in its group is ours
            except psutil.Error:
                continue
            if not same:
                continue  # the pid was reused by an unrelated process: its group is not ours
            if _group_exists(pgid):
                groups.append((service, pgid))
        found = []
        for service, pgid in groups:
            log.warning("found %s (process group %d) left by an earlier run: stopping it",
                        service, pgid)
            found.append(f"{service} (pgid {pgid})")
            _killpg(pgid, signal.SIGTERM)
            _killpg(pgid, signal.SIGCONT)
        deadline = time.monotonic() + timeout_s
        while groups and time.monotonic() < deadline:
            groups = [(s, g) for s, g in groups if _group_exists(g)]
            if groups:
                await asyncio.sleep(0.05)
        for _service, pgid in groups:
            _killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            path.unlink()
        return found


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
