"""The only place that starts or signals processes.

- Each model instance runs under a keeper (`keep.py`, `_keeper.py`): its parent, which
  outlives the daemon, so that a restart, an upgrade or a crash of the daemon reloads no
  model. The keeper puts it in a process group of its own and does what must not be done in
  `preexec_fn` (the daemon has threads): the user switch, the parent-death signal, CPU
  affinity and NUMA memory binding.
- Every launch carries a marker in its environment that its descendants inherit:
  `LLM_SUPERVISOR_INSTANCE` (the keeper's id for a model; this daemon run's random id for a
  helper), `LLM_SUPERVISOR_SERVICE` and `LLM_SUPERVISOR_LAUNCH`. A process outside a
  service's group is signalled only if its `/proc/PID/environ` carries the marker, and only
  through a pidfd opened before the check, so a reused pid is never hit.
- A guardian process (`_guardian.py`) holds the groups of the helpers the daemon runs itself
  (checkpoint hooks) and SIGKILLs them, and every process carrying this run's marker, when
  the daemon disappears, however it ended.
- `state_dir/processes.json` records this run (the boot id and the instance id), so that a
  daemon started after a crash of both finds and stops what an earlier version left (and only
  that) before launching again. The record is written off the event loop by a single writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import secrets
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import procs as P
from .config import read_config_file
from .containers import ContainerRun
from .errors import ConfigError, SpawnError, StartupError
from .keep import Adoptable, Keepers, KeptProcess, SystemdHooks
from .procs import MARK_INSTANCE, MARK_LAUNCH, MARK_SERVICE, read_boot_id

log = logging.getLogger(__name__)

_PKG = Path(__file__).resolve().parent
GUARDIAN = str(_PKG / "_guardian.py")


@dataclass(frozen=True)
class LaunchSpec:
    service: str
    argv: tuple[str, ...]
    env: dict[str, str]
    cpus: tuple[int, ...] | None = None
    mem_node: int | None = None
    user: str | None = None
    gen: int = 0
    port: int | None = None
    stop_timeout_s: float = 10.0
    digest: str = ""  # what makes two launches the same (keep.digest), for a relaunch/adoption
    container: ContainerRun | None = None  # run in a container: argv shows it (`--check`)


def _user_env(user: str) -> tuple[int, int, dict[str, str]]:
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid, {"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name}


class Spawner:
    def __init__(self, state_dir: str | Path | None, use_guardian: bool = True,
                 instance_id: str | None = None, *, adopt_grace_s: float = 30.0,
                 unattended_limit_s: float = 300.0, log_format: str = "plain",
                 output_fd: int = 2, systemd: SystemdHooks | None = None) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.use_guardian = use_guardian
        self.instance_id = instance_id or secrets.token_hex(8)
        self.boot_id = read_boot_id()
        # the models' keepers; their output goes to `output_fd` (the daemon's stderr: the
        # journal), never through the daemon
        self.keepers = Keepers(self.state_dir / "keep" if self.state_dir is not None else None,
                               grace_s=adopt_grace_s, unattended_s=unattended_limit_s,
                               log_format=log_format, output_fd=output_fd, systemd=systemd)
        self._tracked: set[int] = set()  # helpers' groups, for the guardian
        self._launches = 0
        self._guardian: asyncio.subprocess.Process | None = None
        self._guardian_fd: int | None = None
        self._guardian_watch: asyncio.Task[None] | None = None
        self._closing = False
        self.handover = False  # at close: leave the models to the next daemon
        self._heartbeat: asyncio.Task[None] | None = None
        # the record: one writer task, the latest state wins, writes never go backwards
        self._state_seq = 0
        self._state_next: tuple[int, str] | None = None
        self._state_writer: asyncio.Task[None] | None = None
        self._state_lock = threading.Lock()
        self._state_written = 0

    # --- the guardian ------------------------------------------------------------------------

    async def start(self) -> None:
        self._save_state()  # this run, on record (a later start tells it was ours)
        self._heartbeat = asyncio.get_running_loop().create_task(self.keepers.heartbeat(),
                                                                 name="keeper-heartbeat")
        if self.use_guardian:
            await self._start_guardian()

    async def _start_guardian(self) -> None:
        rfd, wfd = os.pipe()  # both non-inheritable: no service gets the write end
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", GUARDIAN, self.instance_id,
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
        for pgid in self._tracked:
            self._tell_guardian(f"+{pgid}\n")
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

    def track_group(self, pgid: int) -> None:
        """A helper's process group (a checkpoint hook) for the orphan guardian to kill if
        the daemon dies while it runs."""
        self._tracked.add(pgid)
        self._tell_guardian(f"+{pgid}\n")

    def untrack_group(self, pgid: int) -> None:
        self._tracked.discard(pgid)
        self._tell_guardian(f"-{pgid}\n")

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
        """Stop the keepers (or, after a hand-over, leave them to the next daemon), write the
        last record, then stop the guardian cleanly: groups still registered, and processes
        still carrying this run's marker, are killed by it."""
        self._closing = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        await self.keepers.close(handover=self.handover)
        await self.flush_state()
        if self._guardian_fd is not None:
            os.close(self._guardian_fd)
            self._guardian_fd = None
        if self._guardian is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._guardian.wait(), 5)
            self._guardian = None

    # --- launching ---------------------------------------------------------------------------

    async def launch(self, spec: LaunchSpec) -> KeptProcess:
        """Run a service's command under a keeper (a relaunch of the same launch goes to the
        keeper of the last run)."""
        env = dict(spec.env)
        creds = "-"
        if spec.user is not None:
            # NSS lookups (LDAP, sssd) can block for long: in a thread, with a deadline.
            lookup_timeout_s = 30.0
            try:
                uid, gid, user_env = await asyncio.wait_for(
                    asyncio.to_thread(_user_env, spec.user), lookup_timeout_s)
                groups = ""
                if uid != os.geteuid():
                    groups = ",".join(str(g) for g in await asyncio.wait_for(
                        asyncio.to_thread(os.getgrouplist, spec.user, gid), lookup_timeout_s))
            except KeyError:
                raise SpawnError(f"no such user {spec.user!r}") from None
            except TimeoutError:
                raise SpawnError(f"looking up user {spec.user!r} took longer than "
                                 f"{lookup_timeout_s:g} s") from None
            except OSError as exc:
                raise SpawnError(f"cannot look up the groups of user {spec.user!r}: "
                                 f"{exc}") from None
            env.update(user_env)
            if uid != os.geteuid():
                creds = f"{uid}:{gid}:{groups}"
        exe = shutil.which(spec.argv[0], path=env.get("PATH", os.defpath))
        if exe is None and spec.container is not None:
            raise SpawnError(f"container runtime not found: {spec.argv[0]!r}"
                             + ("" if "/" in spec.argv[0] else " (not in PATH)"), refused=True)
        if exe is None:
            raise SpawnError(f"command not found: {spec.argv[0]!r}"
                             + ("" if "/" in spec.argv[0] else " (not in PATH)"))
        self._launches += 1

        def marker(keeper_id: str, launch_id: str) -> dict[str, str]:
            return {MARK_INSTANCE: keeper_id, MARK_SERVICE: spec.service,
                    MARK_LAUNCH: launch_id}

        return await self.keepers.launch(spec, env, creds, marker)

    def retire(self, service: str) -> None:
        """The service is not to be launched again soon: the keeper kept for its relaunch
        goes."""
        self.keepers.retire(service)

    async def adopt(self) -> list[Adoptable]:
        """What an earlier daemon's keepers still run (see `Keepers.adopt`)."""
        return await self.keepers.adopt()

    def kill_all(self) -> None:
        """Fast stop: SIGKILL every model's group."""
        self.keepers.kill_all()

    # --- the record of launched groups, for a restart after a crash -------------------------

    def _state_file(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / "processes.json"

    def record_again(self) -> None:
        """Write the record now (its directory was removed and created again)."""
        self._save_state()

    def _save_state(self) -> None:
        """Snapshot the record now (in order, on the loop); write it off the loop. One writer
        task at a time; a snapshot taken while it writes replaces any older one still
        waiting, so writes never pile up and the latest state always lands last."""
        path = self._state_file()
        if path is None:
            return
        records: list[dict[str, Any]] = []  # models are on record in their keepers' dirs
        self._state_seq += 1
        self._state_next = (self._state_seq, json.dumps(
            {"daemon_pid": os.getpid(), "boot_id": self.boot_id, "instance": self.instance_id,
             "processes": records}))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_pending(path)
            return
        if self._state_writer is None or self._state_writer.done():
            self._state_writer = loop.create_task(self._write_state(path), name="state-writer")

    async def _write_state(self, path: Path) -> None:
        while self._state_next is not None:
            seq, text = self._state_next
            self._state_next = None
            await asyncio.to_thread(self._write_record, path, seq, text)

    def _write_pending(self, path: Path) -> None:
        if self._state_next is not None:
            seq, text = self._state_next
            self._state_next = None
            self._write_record(path, seq, text)

    def _write_record(self, path: Path, seq: int, text: str) -> None:
        with self._state_lock:
            if seq <= self._state_written:
                return  # a newer record is already there
            try:
                if not path.parent.is_dir():
                    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
                    log.warning("state directory %s was missing: created it again",
                                path.parent)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(text)
                os.replace(tmp, path)
            except OSError as exc:
                log.error("cannot record processes in %s: %s", path, exc)
                return
            self._state_written = seq

    async def flush_state(self) -> None:
        """Until the latest record is on disk (called at exit: nothing is lost)."""
        writer = self._state_writer
        if writer is not None and not writer.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(writer)
        path = self._state_file()
        if path is not None:
            self._write_pending(path)

    async def reap_leftovers(self, timeout_s: float = 10.0) -> list[str]:
        """Stop what an earlier run of the daemon left behind, and only that: processes that
        carry the recorded instance id, in a recorded group or escaped from one, on the same
        boot. Returns what was found."""
        path = self._state_file()
        if path is None:
            return []
        doc = await asyncio.to_thread(_read_record, path)
        if doc is None:
            return []
        owner = await asyncio.to_thread(_live_supervisor, doc.get("daemon_pid"))
        if owner is not None and doc.get("boot_id") == self.boot_id:
            # its lock file went with a removed state directory: it is not a leftover
            raise StartupError(f"{path.parent} belongs to a running llm-supervisor (pid "
                               f"{owner}) whose lock file was removed; stop that one first")
        try:
            found = await self._reap_recorded(path, doc, timeout_s)
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
        return found

    async def _reap_recorded(self, path: Path, doc: dict[str, Any], timeout_s: float
                             ) -> list[str]:
        records = doc.get("processes")
        if not isinstance(records, list):
            log.warning("ignoring unreadable %s: processes is not a list", path)
            return []
        recorded_boot = doc.get("boot_id")
        if self.boot_id is None or recorded_boot != self.boot_id:
            log.warning("%s was written %s: nothing recorded in it can be running; "
                        "nothing stopped", path,
                        "before the last reboot" if recorded_boot else "without a boot id")
            return []
        instance = doc.get("instance")
        if not isinstance(instance, str) or not instance:
            log.warning("%s has no instance id (an older version wrote it): nothing can be "
                        "proven ours, so nothing is stopped", path)
            return []
        groups: dict[int, str] = {}
        for rec in records:
            try:
                service, pgid = str(rec["service"]), int(rec["pgid"])
            except (KeyError, TypeError, ValueError):
                continue
            if pgid > 1:
                groups[pgid] = service
        scan = await asyncio.to_thread(P.scan_leftovers, instance, groups)
        for pid, pgid, cmd, why in scan.strangers:
            log.warning("process %d (%s) in process group %d, recorded for %s by an earlier "
                        "run, is not proven ours (%s): left alone",
                        pid, cmd, pgid, groups.get(pgid, "?"), why)
        found: list[str] = []
        for left in scan.ours:
            desc = (f"{left.service} (pgid {left.pgid})" if left.in_group
                    else f"{left.service} (pid {left.pid}, outside its group)")
            if desc not in found:
                found.append(desc)
                log.warning("found %s left by an earlier run: stopping it", desc)
            log.info("stopping pid %d (%s)", left.pid, left.cmd)
        try:
            await P.stop_pidfds([left.pidfd for left in scan.ours], timeout_s)
        finally:
            for left in scan.ours:
                os.close(left.pidfd)
        return found


def _live_supervisor(pid: object) -> int | None:
    """`pid` if it is a live llm-supervisor other than this one (by its command line)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1 or pid == os.getpid():
        return None
    st = P.stat(pid)
    if st is None or st.state in ("Z", "X"):
        return None
    cmd = P.cmdline(pid)
    return pid if "supervisord_llm" in cmd or "llm-supervisor" in cmd else None


def _read_record(path: Path) -> dict[str, Any] | None:
    """The record, read like a config file (a regular file of at most 1 MB: a FIFO, a device
    or a huge file left there is refused, never read); None if there is none."""
    if not (path.exists() or path.is_symlink()):
        return None
    try:
        text = read_config_file(path, what="process record").decode("utf-8", "replace")
        doc = json.loads(text)
    except ConfigError as exc:
        log.warning("ignoring %s", "; ".join(exc.problems))
        return None
    except (ValueError, RecursionError) as exc:
        log.warning("ignoring unreadable %s: %s", path, str(exc)[:200])
        return {}
    return doc if isinstance(doc, dict) else {}


__all__ = ["MARK_INSTANCE", "MARK_LAUNCH", "MARK_SERVICE", "Adoptable", "KeptProcess",
           "LaunchSpec", "Spawner", "read_boot_id"]
