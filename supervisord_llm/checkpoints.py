"""The `[[checkpoint]]` hooks: make the RAG / vector stores durable before the services stop.

Run in config order, each with its own `timeout_s`; a failure is logged, counted and shown, and
never stops the ones after it (nor the power-down sequence that runs them).

- `http`: POST to `url` (empty body); a 2xx answer is done. At most 64 KiB of the answer is
  read (shown on failure, trimmed).
- `command`: run argv (no shell) in a process group of its own, stdin from /dev/null; exit 0 is
  done. Its output is kept to the last 4 KiB (shown on failure); at the deadline the whole
  group is killed (SIGKILL) and reaped.
- `signal`: send `signal` to the service's process group (only the process the supervisor
  launched and still holds, through its pidfd); with `done_file`, done once that file has
  been written after the signal (its mtime changed and is not older than the signal), else
  done once the signal is delivered.

One run at a time: `llmctl checkpoint` while one runs is refused; the power-down sequence
waits for a run in progress and then runs its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from . import protocol as P
from .config import Checkpoint
from .errors import ControlError
from .health import client_session, read_bounded
from .procs import MARK_INSTANCE, MARK_SERVICE, ExitProtocol
from .spawn import Spawner

if TYPE_CHECKING:
    from .supervisor import Supervisor

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
MAX_OUTPUT = 4096
OUTPUT_GRACE_S = 1.0  # after a hook exits, for the rest of its output
DONE_FILE_POLL_S = 0.05
MTIME_SLACK_NS = 50_000_000  # file systems stamp with a coarse clock that may lag time.time()


@dataclass(frozen=True)
class CheckpointResult:
    name: str
    kind: str
    result: str  # ok | failed | timeout
    duration_s: float
    error: str | None
    finished_at: float  # wall clock (time.time())
    why: str  # power-down | operator

    def as_dict(self, now_wall: float) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "result": self.result,
                "duration_s": round(self.duration_s, 3), "error": self.error,
                "age_s": round(max(0.0, now_wall - self.finished_at), 1), "why": self.why}


class _Failed(Exception):
    pass


def _tail(data: bytes, limit: int = 300) -> str:
    text = " ".join(data.decode("utf-8", "replace").split())
    return text if len(text) <= limit else "..." + text[-limit:]


class CheckpointRunner:
    def __init__(self, sup: Supervisor, *, wall: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sup = sup
        self._wall = wall
        self._clock = clock
        self._lock = asyncio.Lock()
        self.running: str | None = None  # why the run in progress was started
        self.last: dict[str, CheckpointResult] = {}  # name -> its last result
        self.last_ok: dict[str, float] = {}  # name -> wall time of its last success
        self.runs: dict[tuple[str, str], int] = {}  # (name, result) -> count
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[Any] | None = None  # the run in progress
        self._preempted: asyncio.Task[Any] | None = None  # cancelled by a power-down's run

    @property
    def hooks(self) -> tuple[Checkpoint, ...]:
        return self.sup.cfg.checkpoints  # the running config (a reload changes it)

    def total_timeout_s(self) -> float:
        return sum(cp.timeout_s for cp in self.hooks)

    async def run(self, names: list[str] | None, why: str) -> list[CheckpointResult]:
        """Run the hooks (all, or `names`, in config order); refuses (ControlError) a run of
        the operator's while another runs, waits for it when the power-down asks."""
        hooks = self.hooks
        if names:
            known = {cp.name for cp in hooks}
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ControlError(P.FAILED, f"no checkpoint named {', '.join(unknown)} "
                                   f"(configured: {', '.join(sorted(known)) or 'none'})")
            hooks = tuple(cp for cp in hooks if cp.name in names)
        if self._lock.locked():
            if why != "power-down":
                raise ControlError(P.FAILED, f"checkpoints are already running (started by "
                                   f"{self.running}); wait for them to finish")
            # the power-down's run replaces an operator's: one run's worth of timeouts in
            # the battery budget, not two
            if self._task is not None and not self._task.done():
                self._preempted = self._task
                self._task.cancel()
        async with self._lock:
            self.running = why
            self._task = asyncio.current_task()
            try:
                return [await self.run_one(cp, why) for cp in hooks]
            except asyncio.CancelledError:
                if self._preempted is asyncio.current_task():
                    self._preempted = None
                    raise ControlError(P.FAILED, "cancelled: the power-down runs the "
                                       "checkpoints now (see `llmctl status`)") from None
                raise
            finally:
                self.running = None
                self._task = None

    async def run_one(self, cp: Checkpoint, why: str) -> CheckpointResult:
        started = self._clock()
        log.info("checkpoint %s (%s): started", cp.name, cp.kind)
        result, error = "ok", None
        try:
            async with asyncio.timeout(cp.timeout_s):
                if cp.kind == "http":
                    await self._http(cp)
                elif cp.kind == "command":
                    await self._command(cp)
                else:
                    await self._signal(cp)
        except TimeoutError:
            result, error = "timeout", f"not done within timeout_s ({cp.timeout_s:g} s)"
        except _Failed as exc:
            result, error = "failed", str(exc)
        except Exception as exc:  # a bug or an odd error: the next hooks still run
            result, error = "failed", f"{type(exc).__name__}: {exc}"
        except asyncio.CancelledError:  # the power back, a stop, a power-down's own run
            self._record(cp, why, "cancelled", self._clock() - started, "cancelled")
            raise
        self._record(cp, why, result, self._clock() - started, error)
        return self.last[cp.name]

    def _record(self, cp: Checkpoint, why: str, result: str, duration: float,
                error: str | None) -> None:
        res = CheckpointResult(cp.name, cp.kind, result, duration, error, self._wall(), why)
        self.last[cp.name] = res
        if result == "ok":
            self.last_ok[cp.name] = res.finished_at
        self.runs[(cp.name, result)] = self.runs.get((cp.name, result), 0) + 1
        if result == "ok":
            log.info("checkpoint %s: done in %.2f s", cp.name, duration)
        else:
            log.error("checkpoint %s: %s after %.2f s: %s", cp.name, result, duration, error)

    # --- the kinds ----------------------------------------------------------------------------

    async def _http(self, cp: Checkpoint) -> None:
        assert cp.url is not None
        if self._session is None or self._session.closed:
            self._session = client_session()
        try:
            async with self._session.post(cp.url, data=b"", allow_redirects=False) as resp:
                body, _more = await read_bounded(resp, MAX_BODY)
                status = resp.status
        except aiohttp.ClientConnectorError as exc:
            raise _Failed(f"cannot connect to {cp.url}: "
                          f"{exc.os_error.strerror or exc.os_error}") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise _Failed(f"POST {cp.url}: {type(exc).__name__}: {exc}".rstrip(": ")) from None
        if not 200 <= status < 300:
            raise _Failed(f"POST {cp.url} answered HTTP {status}: {_tail(body)}")

    async def _command(self, cp: Checkpoint) -> None:
        try:
            code, out = await run_argv(cp.command, self.sup.spawner, f"checkpoint:{cp.name}")
        except OSError as exc:
            raise _Failed(f"cannot run {cp.command[0]}: {exc.strerror or exc}") from None
        if code != 0:
            raise _Failed(f"{cp.command[0]}: {exit_text(code)}: {_tail(out)}".rstrip(": "))

    async def _signal(self, cp: Checkpoint) -> None:
        assert cp.service is not None and cp.signal is not None
        actor = self.sup.actors.get(cp.service)
        proc = actor.proc if actor is not None else None
        if proc is None:
            raise _Failed(f"{cp.service} is not running: nothing to signal")
        before = await asyncio.to_thread(_mtime_ns, cp.done_file) if cp.done_file else None
        sent_ns = time.time_ns()
        if not proc.signal_group(cp.signal):
            raise _Failed(f"{cp.service}: its process group is gone; no signal sent")
        if cp.done_file is None:
            return
        while True:
            await asyncio.sleep(DONE_FILE_POLL_S)
            now = await asyncio.to_thread(_mtime_ns, cp.done_file)
            if now is not None and now != before and now >= sent_ns - MTIME_SLACK_NS:
                return

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def run_argv(argv: tuple[str, ...], spawner: Spawner | None = None,
                   label: str = "helper") -> tuple[int, bytes]:
    """Run argv (no shell) in a process group of its own, stdin from /dev/null; return its
    exit status and the last MAX_OUTPUT bytes of its output. Raises OSError when it cannot
    start. Cancelled (a deadline around it), the whole group is SIGKILLed and reaped.

    With a `spawner`, it carries the daemon's instance marker and its group is registered
    with the orphan guardian: a daemon killed mid-checkpoint takes its hook with it (the next
    daemon would otherwise run the same hook beside the old one). Once it has exited, what
    it left in its group holding the output (`cmd &`) is given OUTPUT_GRACE_S, then killed:
    its exit status is the answer."""
    env = None
    if spawner is not None:
        env = {**os.environ, MARK_INSTANCE: spawner.instance_id, MARK_SERVICE: label}
    loop = asyncio.get_running_loop()
    # the exit is seen when it happens (the child watcher), not when the output pipe closes:
    # something the hook left running may hold that open
    transport, protocol = await loop.subprocess_exec(
        lambda: ExitProtocol(1 << 16, loop), *argv, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True, env=env)
    pid = transport.get_pid()
    if spawner is not None:
        spawner.track_group(pid)
    kept = bytearray()

    async def read() -> None:
        stream = protocol.stdout
        assert stream is not None
        while chunk := await stream.read(65536):
            kept.extend(chunk)
            del kept[:-MAX_OUTPUT]

    reader = asyncio.ensure_future(read())
    try:
        code = await protocol.exited
        _done, pending = await asyncio.wait({reader}, timeout=OUTPUT_GRACE_S)
        if pending:  # something it started still holds the output
            _kill_group(pid)
            reader.cancel()
            await asyncio.wait({reader})
    except BaseException:  # the deadline (or a cancel): the group goes, then it is reaped
        _kill_group(pid)
        reader.cancel()
        await asyncio.shield(_reap(protocol, pid))
        raise
    finally:
        transport.close()
        if spawner is not None:
            spawner.untrack_group(pid)
    return code, bytes(kept)


def exit_text(code: int) -> str:
    return f"killed by {_signame(-code)}" if code < 0 else f"exit {code}"


def _mtime_ns(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _kill_group(pgid: int) -> None:
    """SIGKILL the hook's own process group (it is its leader: start_new_session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def _reap(protocol: ExitProtocol, pid: int) -> None:
    try:
        async with asyncio.timeout(5):
            await protocol.exited
    except TimeoutError:
        log.error("checkpoint command %d: not reaped 5 s after SIGKILL", pid)
