"""Model keeper: one per model instance, so that a model outlives a restart or a crash of the
supervisor (docs/design.md, "Models that outlive the supervisor").

    python -I -S _keeper.py --id ID --dir DIR --service NAME --gen N [--grace S]
        [--unattended S] [--stop-timeout S] [--lease-fd FD] -- ARGV...

It makes itself a child subreaper, starts ARGV (the shim chain and the engine) in a process
group of its own with its output on a pipe, and then only waits: for the supervisor on a
control socket (DIR/ctl.sock, SOCK_SEQPACKET, one JSON object per message), for its lease
(a pipe whose write end only the supervisor, and systemd's fd store, hold) to close, for the
engine to exit, for SIGTERM. Standard library only and small: it is the one process that must
not change while a model runs.

The rules (the lease is the only orphan rule):
- `stop` from the supervisor, or SIGTERM: SIGTERM to the engine's group, SIGKILL to every
  process it left (its group and every descendant, found through /proc: what a `setsid`
  escaped with is still below the keeper, its subreaper) after the stop timeout; the exit
  written to DIR/exit.json; the keeper exits 0.
- The lease's end (EOF): the grace starts; a new lease (passed with SCM_RIGHTS) ends it; when
  it runs out, as on `stop`.
- No supervisor attached for `--unattended` seconds: as on `stop` (heat and power must not go
  unwatched for long).
- The engine exits by itself: its status is kept and sent (`exited`); the keeper stays until
  told to stop (the supervisor decides on a restart).
- The engine's output: each line, with the service's name in front, to the keeper's own
  stderr (the journal, or the supervisor's log), never blocking:
  what a full stderr cannot take is dropped and counted (a line is at most 3800 bytes).

Messages (client -> keeper): `ping` -> `pong` (a supervisor says it is there: with no word
for `--unattended` seconds, attached or not, the model is stopped);
`hello {proto: [min, max]}` -> `snapshot`; `lease` (an fd
attached) -> `ok`; `signal {sig}` -> `ok`; `stop {timeout_s?}` -> `stopped {exit}`, then the
keeper exits. A keeper that cannot speak any protocol in the client's range answers hello
with `error {code: "proto", proto}` and then takes only `stop`, `lease` and `ping` (what
every protocol keeps: a later supervisor can always keep an older keeper's model and stop it).
`run {gen}` starts the engine again once it and everything it started are gone -> `started`.
`settings {grace_s?, unattended_s?, stop_timeout_s?}` -> `ok` (a new supervisor's values).
One supervisor at a time: a connection while one that said hello is attached gets
`error busy` and is closed (one that never said hello is replaced).
Keeper -> client, unasked: `exited {exit, pid}` (and `started`, with --client-fd).
"""

from __future__ import annotations

import _json
import _signal as signal
import _socket as socket
import array
import errno
import math
import os
import select
import sys
import time

PROTO = 1
VERSION = "keeper-1"
PR_SET_CHILD_SUBREAPER = 36
MAX_MESSAGE = 65536
MAX_LINE = 3800  # within PIPE_BUF with the name: a line is written whole or not at all
PIPE_BUF = 4096
CTL = "ctl.sock"
_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP)
STATE = "state.json"
EXIT = "exit.json"


def _now() -> float:
    return time.monotonic()


# JSON through the C parts of the json module only: `json` itself imports `re`, which would be
# a third of the keeper's memory
class _Ctx:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: dict[str, str] = {}  # noqa: RUF012 - the scanner's, cleared after each parse

    @staticmethod
    def parse_constant(name: str) -> float:
        raise ValueError(f"{name} is not JSON")


_scan = _json.make_scanner(_Ctx())  # type: ignore[arg-type]  # any object with these fields


def loads(data: bytes) -> object:
    text = data.decode("utf-8")
    end = len(text)
    i = 0
    while i < end and text[i] in " \t\r\n":
        i += 1
    try:
        value, at = _scan(text, i)
    except StopIteration:
        raise ValueError("not JSON") from None
    finally:
        _Ctx.memo.clear()
    if text[at:].strip(" \t\r\n"):
        raise ValueError("more after the JSON value")
    return value


def dumps(value: object) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return str(_json.encode_basestring_ascii(value))
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "null"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{dumps(str(k))}: {dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(dumps(v) for v in value) + "]"
    return dumps(str(value))


def _sendable(doc: dict[str, object]) -> bytes:
    return dumps(doc).encode()


class _Poll:
    """What the keeper waits on (epoll; `selectors` would bring half the standard library)."""

    def __init__(self) -> None:
        self.ep = select.epoll()
        self.tags: dict[int, str] = {}

    def add(self, fd: int, tag: str) -> None:
        self.ep.register(fd, select.EPOLLIN)
        self.tags[fd] = tag

    def remove(self, fd: int) -> None:
        if self.tags.pop(fd, None) is not None:
            try:
                self.ep.unregister(fd)
            except OSError:
                pass

    def wait(self, timeout: float | None) -> list[str]:
        try:
            events = self.ep.poll(-1 if timeout is None else timeout)
        except InterruptedError:
            return []
        return [self.tags[fd] for fd, _ev in events if fd in self.tags]


def _write_json(path: str, doc: dict[str, object]) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, dumps(doc).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): with the pid, who it is."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def descendants(root: int) -> list[int]:
    """Every process below `root` (through /proc/PID/task/TID/children)."""
    out: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as fh:
                    kids = [int(x) for x in fh.read().split()]
            except (OSError, ValueError):
                continue
            for kid in kids:
                if kid not in out:
                    out.append(kid)
                    todo.append(kid)
    return out


def _cpus(text: str) -> set[int]:
    """A kernel cpulist ("0-3,8")."""
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


SYS_SET_MEMPOLICY = {"x86_64": 238, "aarch64": 237, "riscv64": 237, "ppc64le": 261,
                     "ppc64": 261, "s390x": 270}


class _Libc:
    """prctl and syscall through `_ctypes` alone (`ctypes` would cost a third of a
    megabyte more). Arguments are Python ints (C ints) and bytes (pointers)."""

    def __init__(self) -> None:
        import _ctypes

        self._call = _ctypes.call_function
        lib = _ctypes.dlopen(None)  # type: ignore[arg-type]  # None: the program itself
        self._prctl = _ctypes.dlsym(lib, "prctl")
        self._syscall = _ctypes.dlsym(lib, "syscall")

    def prctl(self, *args: int) -> int:
        return int(self._call(self._prctl, args))

    def syscall(self, *args: int | bytes) -> int:
        return int(self._call(self._syscall, args))


def _bind_memory(libc: _Libc, node: int, warn: object) -> None:  # pragma: no cover - child
    """set_mempolicy(MPOL_BIND, {node}): the engine's memory on its GPUs' NUMA node."""
    nr = SYS_SET_MEMPOLICY.get(os.uname().machine)
    if nr is None:
        warn(f"memory binding not supported on {os.uname().machine}")  # type: ignore[operator]
        return
    words = node // 64 + 1
    mask = (1 << node).to_bytes(words * 8, sys.byteorder)  # unsigned longs, this machine's
    if libc.syscall(nr, 2, mask, words * 64 + 1) != 0:
        warn(f"cannot bind memory to node {node}")  # type: ignore[operator]


def _parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    if "--" not in argv:
        raise ValueError("no command (-- ARGV...)")
    cut = argv.index("--")
    opts, cmd = argv[:cut], argv[cut + 1:]
    if not cmd:
        raise ValueError("an empty command")
    out: dict[str, str] = {}
    it = iter(opts)
    for key in it:
        if not key.startswith("--"):
            raise ValueError(f"unexpected {key!r}")
        try:
            out[key[2:]] = next(it)
        except StopIteration:
            raise ValueError(f"{key} needs a value") from None
    for need in ("id", "dir", "service", "gen"):
        if need not in out:
            raise ValueError(f"--{need} is required")
    return out, cmd


class Keeper:
    def __init__(self, opts: dict[str, str], cmd: list[str]) -> None:
        self.id = opts["id"]
        self.dir = opts["dir"]
        self.service = opts["service"]
        self.gen = int(opts["gen"])
        self.grace_s = float(opts.get("grace", "30"))
        self.unattended_s = float(opts.get("unattended", "300"))
        self.stop_timeout_s = float(opts.get("stop-timeout", "10"))
        lease = opts.get("lease-fd")
        self.lease: int | None = int(lease) if lease is not None else None
        client = opts.get("client-fd")
        self._client_fd = int(client) if client is not None else None
        self.cpus = _cpus(opts["cpus"]) if opts.get("cpus", "-") != "-" else None
        self.mem_node = int(opts["mem-node"]) if opts.get("mem-node", "-") != "-" else None
        creds = opts.get("creds", "-")
        self.creds: tuple[int, int, list[int]] | None = None
        if creds != "-":
            uid, gid, groups = creds.split(":")
            self.creds = (int(uid), int(gid), [int(g) for g in groups.split(",") if g])
        self.pdeathsig = int(opts.get("pdeathsig", "9"))
        self.log_format = opts.get("log-format", "plain")
        if self.log_format not in ("plain", "journal", "text", "json"):
            raise ValueError(f"--log-format {self.log_format!r}: plain, journal, text or json")
        self.cmd = cmd
        # in a container: the CLI in the foreground is the engine; the container itself is
        # stopped, signalled and removed through the runtime (a CLI killed leaves it running)
        self.container = opts.get("container") or None
        self.runtime: list[str] = []
        if self.container is not None:
            runtime = loads(opts.get("runtime", "").encode())
            if not isinstance(runtime, list) or not runtime \
                    or not all(isinstance(a, str) and a for a in runtime):
                raise ValueError("--runtime must be a JSON array of strings with --container")
            self.runtime = runtime
        self.pull_image = opts.get("pull") or None  # pulled first when it is not here
        self.pull_timeout_s = float(opts.get("pull-timeout", "1800"))
        self.helpers: list[tuple[list[str], float, int]] = []  # runtime calls to make, in order
        self.helper_pid = 0
        self.helper_args: list[str] = []
        self.helper_sig = 0  # a signal the call was to give: to the CLI if it fails
        self.helper_until: float | None = None
        self.helper_fd = -1  # its output (a pipe; the last 2000 bytes kept)
        self.helper_said = b""
        self._teardown_queued = False
        self._rm_ok = False  # the last `rm` removed the container (or there was none)
        self._removed = False  # the container of the run that ended is gone
        self._exit_unsent: dict[str, object] | None = None  # said once its container is gone
        # after the removal: what the container left below the keeper (a conmon and a
        # `runc init` of a container the runtime never recorded) is given until then, then
        # SIGKILLed
        self._settle_until: float | None = None
        self._settle_killed = False
        self._fast = False  # SIGKILL asked: the container goes without its stop timeout
        self._termed = False
        self.tail: list[bytes] = []  # the last lines of the run's output (a runtime's refusal)
        self.libc: _Libc | None = None
        self.sel = _Poll()
        self.pid = 0
        self.pgid = 0
        self.ticks: int | None = None
        self.exit: dict[str, object] | None = None
        self.client: socket.socket | None = None
        self.client_known = False  # the client said hello (or started the keeper)
        self.outdated = False  # the client speaks no protocol of ours: stop and lease
        self.grace_until: float | None = None
        # no word from a supervisor since (attached or not: a supervisor that is frozen, or
        # stopped with SIGSTOP, watches nothing either); every message counts, `ping` too
        self.alone_since: float | None = _now()
        self.stopping_until: float | None = None  # SIGKILL after this
        self.stop_reply: socket.socket | None = None
        self.done = False
        self.dropped = 0  # output lines (or parts) a full stderr could not take
        self._unsaid = 0  # dropped since the last notice
        self._partial = b""
        self._skipping = False
        self.out_fd = -1

    # --- start -------------------------------------------------------------------------------

    def start(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        try:
            self.libc = _Libc()
            self.libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        except OSError:
            pass
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        # held by the keeper alone, never the engine's (set before the engine's fork)
        if self.lease is not None:
            os.set_inheritable(self.lease, False)
        if self._client_fd is not None:
            os.set_inheritable(self._client_fd, False)
        self.err = _Err()
        # the control socket first: the supervisor may connect as soon as the engine runs.
        # Bound through /proc/self/fd: a deep DIR would not fit in a socket's 108 bytes
        # bound and listening under another name, then renamed: the path never names a
        # socket that refuses connections
        dirfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        tmp = f"{CTL}.{os.getpid()}"
        try:
            for name in (CTL, tmp):
                try:
                    os.unlink(name, dir_fd=dirfd)
                except FileNotFoundError:
                    pass
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.listener.bind(f"/proc/self/fd/{dirfd}/{tmp}")
            os.chmod(tmp, 0o600, dir_fd=dirfd)
            self.listener.listen(4)
            os.rename(tmp, CTL, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        finally:
            os.close(dirfd)
        self.listener.setblocking(False)
        self.sel.add(self.listener.fileno(), "listen")
        if self.lease is not None:
            os.set_blocking(self.lease, False)
            self.sel.add(self.lease, "lease")
        else:
            self.grace_until = _now() + self.grace_s  # no lease yet: one must come
        sr, sw = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        signal.set_wakeup_fd(sw)
        for sig in _HANDLED:
            signal.signal(sig, lambda *_a: None)
        self.sel.add(sr, "signal")
        self._sigfd = sr
        self._spawn()
        if self._client_fd is not None:  # the supervisor that started it, connected already
            fd, self._client_fd = self._client_fd, None
            self._attach(socket.socket(fileno=fd), known=True)
            self._send({**self.snapshot(), "op": "started"})

    def _spawn(self) -> None:
        """Start the engine: a fork that does what the exec shim did (a session of its own,
        stdin /dev/null, output to our pipe, the user switch, the parent-death signal, CPU
        affinity, NUMA memory binding), then exec. No Python start-up on the way: a
        relaunch costs a fork."""
        if self.out_fd >= 0:  # the last run's output: what is left of it, then closed
            self._drain_output()
            if self.out_fd >= 0:
                self.sel.remove(self.out_fd)
                os.close(self.out_fd)
                self.out_fd = -1
        if self._partial:
            self._line(self._partial)
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
        me = os.getpid()

        def child() -> None:  # pragma: no cover - in the child
            os.close(sync_r)
            os.close(sync_w)  # the keeper goes on: the group is there
            _default_signals()
            os.close(rfd)
            self._child(me, wfd)

        try:
            pid = _fork(child)
        except OSError:
            for fd in (rfd, wfd, sync_r, sync_w):
                os.close(fd)
            raise
        os.close(sync_w)
        try:
            os.read(sync_r, 1)  # EOF once the child has its group (or has died)
        except OSError:
            pass
        os.close(sync_r)
        os.close(wfd)
        self.pid = self.pgid = pid  # the child makes itself a session (and group) leader
        self.ticks = start_ticks(pid)
        self.exit = None
        self.tail = []
        self._removed = self._fast = self._termed = self._rm_ok = False
        self.out_fd = rfd
        self._partial = b""
        os.set_blocking(rfd, False)
        self.sel.add(rfd, "out")
        self._save_state()

    def _child(self, keeper: int, out: int) -> None:  # pragma: no cover - in the child
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)

        def warn(msg: str) -> None:
            os.write(2, f"llm-supervisor keeper: {msg}\n".encode())

        try:  # the supervisor protects itself from the OOM killer; the engine must not
            with open("/proc/self/oom_score_adj", "r+") as fh:
                if int(fh.read().strip() or 0) < 0:
                    fh.seek(0)
                    fh.write("0")
        except (OSError, ValueError):
            pass
        if self.creds is not None:
            uid, gid, groups = self.creds
            try:
                os.setgroups(groups)
                os.setgid(gid)
                os.setuid(uid)
            except OSError as exc:
                warn(f"cannot switch to uid {uid} gid {gid}: {exc.strerror}")
                os._exit(126)
        libc = self.libc
        if self.pdeathsig and libc is not None:
            libc.prctl(1, self.pdeathsig, 0, 0, 0)
        if os.getppid() != keeper:
            os._exit(1)  # the keeper died before we got here: do not start an orphan
        if self.cpus is not None:
            try:
                os.sched_setaffinity(0, self.cpus)
            except (OSError, ValueError) as exc:
                warn(f"cannot set CPU affinity: {exc}")
        if self.mem_node is not None and libc is not None:
            _bind_memory(libc, self.mem_node, warn)
        if self.pull_image is not None:
            self._pull(self.pull_image, warn)
        try:
            os.execvp(self.cmd[0], self.cmd)  # noqa: S606 - the point of the keeper
        except OSError as exc:
            warn(f"cannot execute {self.cmd[0]!r}: {exc.strerror}")
        os._exit(127)

    def _pull(self, image: str, warn: object) -> None:  # pragma: no cover - in the child
        """The image, pulled first when the runtime does not have it; the look and the pull
        together within pull_timeout_s. One that fails or overruns ends the run as the
        runtime would (125), saying so in a line `containers.refusal` reads (`pull: ...`)."""
        assert callable(warn)
        limit = self.pull_timeout_s
        deadline = _now() + limit
        code = _wait([*self.runtime, "image", "inspect", "--format", "{{.Id}}", image],
                     min(60.0, limit), quiet=True)
        if code == 0:
            return
        if code is None:
            warn(f"pull: `image inspect {image}` did not answer within {min(60.0, limit):g} s")
            os._exit(125)
        warn(f"{image} is not here: pulling it (for at most {limit:g} s)")
        code = _wait([*self.runtime, "pull", image], max(0.0, deadline - _now()))
        if code is None:
            warn(f"pull: {image} took longer than pull_timeout_s ({limit:g} s)")
            os._exit(125)
        if code != 0:
            warn(f"pull: {image} failed (exit {code})")
            os._exit(125)

    def _save_state(self) -> None:
        try:
            _write_json(os.path.join(self.dir, STATE), {
                "proto": PROTO, "version": VERSION, "id": self.id, "service": self.service,
                "gen": self.gen, "keeper_pid": os.getpid(),
                "keeper_ticks": start_ticks(os.getpid()), "dir": self.dir,
                "pid": self.pid, "pgid": self.pgid, "ticks": self.ticks})
        except OSError as exc:  # its directory removed under it: it keeps the model all the same
            self._log(f"state not recorded: {exc.strerror or exc}")

    # --- the loop ------------------------------------------------------------------------

    def run(self) -> int:
        while not self.done:
            timeout = self._next_deadline()
            for what in self.sel.wait(timeout):
                if what == "out":
                    self._output()
                elif what == "listen":
                    self._accept()
                elif what == "client":
                    self._message()
                elif what == "lease":
                    self._lease_readable()
                elif what == "signal":
                    self._signals()
                elif what == "helper":
                    self._helper_output()
            self._reap()
            self._timers()
        return 0

    def _next_deadline(self) -> float | None:
        now = _now()
        times = [t for t in (self.grace_until, self.stopping_until, self.helper_until,
                             self._settle_until) if t is not None]
        if self._settle_until is not None:
            times.append(now + 0.05)  # look whether what was left has gone
        if self.alone_since is not None and self.unattended_s > 0:
            times.append(self.alone_since + self.unattended_s)
        if self.stopping_until is not None:
            times.append(now + 0.05)  # while stopping: look whether everything has gone
        return max(0.0, min(times) - now) if times else None

    def _timers(self) -> None:
        now = _now()
        if self.helper_until is not None and now >= self.helper_until and self.helper_pid:
            self._log(f"`{self.runtime[0]} {self.helper_args[0]}` of {self.container} did not "
                      "end in time: killed")
            try:
                os.killpg(self.helper_pid, signal.SIGKILL)
            except OSError:
                pass
            self.helper_until = None
        if self._settle_until is not None:
            self._settle()
        if self.stopping_until is not None:
            if self._all_gone():
                self._finish()
            elif now >= self.stopping_until:
                self._kill_all(signal.SIGKILL)
            elif self.container is not None and self.exit is None and not self._termed \
                    and not self._helpers_busy():
                # the runtime stopped what it could, and the CLI is still there (it was still
                # pulling or creating): it passes the signal on, or ends with it
                self._termed = True
                self._signal_group(signal.SIGTERM)
            return
        if self.grace_until is not None and now >= self.grace_until:
            self._log(f"no lease for {self.grace_s:g}s: stopping the model")
            self.stop(self.stop_timeout_s)
        elif self.alone_since is not None and self.unattended_s > 0 \
                and now >= self.alone_since + self.unattended_s:
            self._log(f"no word from a supervisor for {self.unattended_s:g}s: stopping the "
                      "model (its heat and power unwatched)")
            self.stop(self.stop_timeout_s)

    # --- the engine ---------------------------------------------------------------------

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.helper_pid:
                self._helper_done(status)
            elif pid == self.pid and self.exit is None:
                self.exit = _exit_of(status)
                self._drain_output()
                said = {"op": "exited", "exit": self.exit, "pid": pid, "tail": [
                    t.decode("utf-8", "replace").rstrip("\r") for t in self.tail]}
                if self.container is not None:  # the container may outlive its CLI: removed
                    self._teardown(0.0 if self._fast else self.stop_timeout_s)
                    if self.stopping_until is None:
                        self._exit_unsent = said  # said once the container is gone
                elif self.stopping_until is None:  # not asked for: say so (a stop's reply does)
                    self._say_exit(said)

    def _say_exit(self, said: dict[str, object]) -> None:
        if self.client is None:  # (an attached supervisor says it itself)
            self._log(f"engine pid {said['pid']} ended ({_describe(self.exit or {})}) while no "
                      "supervisor was attached")
        self._send(said)

    # --- the container -----------------------------------------------------------------------

    def _helpers_busy(self) -> bool:
        return bool(self.helper_pid or self.helpers)

    def _teardown(self, timeout_s: float) -> None:
        """Stop the container (its stop signal, SIGKILL after `timeout_s`), then remove it:
        queued once until done (a CLI that ends while it runs needs no second one)."""
        if self._teardown_queued or self.container is None:
            return
        self._teardown_queued = True
        t = max(0, math.ceil(timeout_s))
        self.helpers += [(["stop", "-t", str(t), self.container], t + 15.0, 0),
                         (["rm", "-f", self.container], 30.0, 0)]
        self._helper_next()

    def _helper_next(self) -> None:
        while not self.helper_pid and self.helpers:
            args, timeout, sig = self.helpers.pop(0)
            try:
                pid = self._spawn_helper([*self.runtime, *args])
            except OSError as exc:
                self._log(f"cannot run `{self.runtime[0]} {args[0]}` for {self.container}: "
                          f"{exc.strerror or exc}")
                if sig and self.exit is None:
                    self._signal_group(sig)
                continue
            self.helper_pid, self.helper_args, self.helper_sig = pid, args, sig
            self.helper_until = _now() + timeout
        if not self._helpers_busy() and self._teardown_queued:
            self._teardown_queued = False
            if self.exit is not None:
                self._removed = self._rm_ok
                if self._settle_until is None:
                    self._settle_until, self._settle_killed = _now() + 2.0, False
                self._settle()

    def _spawn_helper(self, argv: list[str]) -> int:
        """A runtime call: a fork (its own session, stdin /dev/null, its output on a pipe we
        read, the parent-death signal: it never outlives the keeper), then exec."""
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        me = os.getpid()

        def child() -> None:  # pragma: no cover - in the child
            _default_signals()
            if self.libc is not None:
                self.libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
            if os.getppid() != me:
                os._exit(1)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(wfd, 1)
            os.dup2(wfd, 2)
            os.execvp(argv[0], argv)  # noqa: S606

        try:
            pid = _fork(child)
        except OSError:
            os.close(rfd)
            raise
        finally:
            os.close(wfd)
        os.set_blocking(rfd, False)
        self.helper_fd = rfd
        self.helper_said = b""
        self.sel.add(rfd, "helper")
        return pid

    def _helper_output(self) -> None:
        """What the runtime call says: the last 2000 bytes kept, the rest read and dropped."""
        for _ in range(64):
            if self.helper_fd < 0:
                return
            data = _read(self.helper_fd, 65536)
            if data is None:
                return
            if not data:
                self.sel.remove(self.helper_fd)
                os.close(self.helper_fd)
                self.helper_fd = -1
                return
            self.helper_said = (self.helper_said + data)[-2000:]

    def _helper_done(self, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        args, sig = self.helper_args, self.helper_sig
        self.helper_pid, self.helper_until = 0, None
        self._helper_output()  # what is left in the pipe (a child that kept it open: cut)
        if self.helper_fd >= 0:
            self.sel.remove(self.helper_fd)
            os.close(self.helper_fd)
            self.helper_fd = -1
        said = self.helper_said.decode("utf-8", "replace").strip()
        low = said.lower()
        gone = "no such container" in low or "no container with name" in low
        if args[0] == "rm":
            self._rm_ok = code == 0 or gone
        if code != 0 and not gone:
            self._log(f"`{self.runtime[0]} {' '.join(args[:-1])}` of {self.container}: "
                      f"exit {code}: {_printable(said[-600:]) or '(nothing said)'}")
            if sig and self.exit is None:  # the runtime could not: the CLI passes it on
                self._signal_group(sig)
        self._helper_next()

    def _settle(self) -> None:
        """After the container's removal: once nothing of the run is left below the keeper
        (given 2 s, then SIGKILLed, then 5 s more), the exit is said."""
        assert self._settle_until is not None
        if self._helpers_busy():
            return
        left = self._alive()
        now = _now()
        if left and now < self._settle_until:
            return
        if left and not self._settle_killed:
            self._log(f"{len(left)} process(es) of {self.container} left after its removal "
                      f"(pid {', '.join(map(str, left[:5]))}): killed")
            self._kill_all(signal.SIGKILL)
            self._settle_killed, self._settle_until = True, now + 5.0
            return
        self._settle_until = None
        if self._exit_unsent is not None:
            said, self._exit_unsent = self._exit_unsent, None
            if self.stopping_until is None:
                self._say_exit(said)

    def _signal_container(self, sig: int) -> int:
        """A signal for the engine: to the container through the runtime. SIGKILL ends the
        CLI at once, and its end removes the container without waiting."""
        if sig == signal.SIGKILL:
            self._fast = True
            return self._signal_group(sig)
        if sig in (signal.SIGCONT, 0):
            return 1
        assert self.container is not None
        if len(self.helpers) >= 16:  # a runtime that does not keep up: not a queue for ever
            self._log(f"signal {sig} for {self.container} dropped: 16 runtime calls waiting")
            return 0
        self.helpers.append((["kill", "--signal", str(sig), self.container], 15.0, sig))
        self._helper_next()
        return 1

    def _alive(self) -> list[int]:
        return [p for p in descendants(os.getpid()) if _is_process(p)]

    def _all_gone(self) -> bool:
        self._reap()
        return self.exit is not None and not self._helpers_busy() and not self._alive() \
            and self._settle_until is None

    def _signal_group(self, sig: int) -> int:
        """The engine's process group: while its leader lives, by its id; after, each of our
        descendants still in it (the id may not name it any more)."""
        if self.pgid <= 0:
            return 0
        if self.exit is None:
            try:
                os.killpg(self.pgid, sig)
                return 1
            except OSError:
                return 0
        n = 0
        for pid in self._alive():
            try:
                if os.getpgid(pid) == self.pgid:
                    os.kill(pid, sig)
                    n += 1
            except OSError:
                pass
        return n

    def _kill_all(self, sig: int) -> None:
        for pid in [-self.pgid, *self._alive()]:
            try:
                os.kill(pid, sig)
            except OSError:
                pass

    def stop(self, timeout_s: float, reply: socket.socket | None = None) -> None:
        if reply is not None:
            self.stop_reply = reply
        if self.stopping_until is not None:
            return
        self.grace_until = None
        self.alone_since = None
        self.stopping_until = _now() + max(0.0, timeout_s)
        if self.container is None:
            self._kill_all(signal.SIGTERM)  # the group, and what escaped it (still below us)
            return
        # the runtime's stop, then its rm (and SIGKILL to what is left when both are overdue)
        self.stopping_until += 15.0 + 30.0 + 5.0
        if timeout_s <= 0:
            self._fast = True
        if not self._removed:
            self._teardown(timeout_s)

    def _finish(self) -> None:
        self._drain_output()
        try:
            _write_json(os.path.join(self.dir, EXIT), {
                "exit": self.exit, "pid": self.pid, "dropped_lines": self.dropped,
                "container_removed": self._removed if self.container is not None else None})
        except OSError as exc:  # its directory removed under it: the end all the same
            self._log(f"exit not recorded: {exc.strerror or exc}")
        if self.stop_reply is not None:
            try:
                self.stop_reply.send(_sendable({"op": "stopped", "exit": self.exit}))
            except OSError:
                pass
        try:
            os.unlink(os.path.join(self.dir, CTL))
        except OSError:
            pass
        self.done = True

    # --- output ----------------------------------------------------------------------------

    def _output(self) -> None:
        data = _read(self.out_fd, 65536)
        if data is None:
            return
        if not data:
            self.sel.remove(self.out_fd)
            os.close(self.out_fd)
            self.out_fd = -1
            if self._partial:
                self._line(self._partial)
                self._partial = b""
            return
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if self._skipping:  # the rest of a line already written cut
                self._skipping = False
                continue
            self._line(line)
        if len(self._partial) > MAX_LINE:
            if not self._skipping:
                self._line(self._partial, cut=True)
                self._skipping = True
            self._partial = b""

    def _drain_output(self) -> None:
        """What the engine wrote before it ended (until the pipe is empty or closed)."""
        for _ in range(64):
            if self.out_fd < 0:
                return
            try:
                if not select_readable(self.out_fd):
                    return
            except OSError:
                return
            self._output()

    def _line(self, line: bytes, cut: bool = False) -> None:
        """One line of the engine's, as the supervisor's own log shows a service's output
        (`[service] line` at INFO, in its `log_format`); one longer than MAX_LINE is cut."""
        if len(line) > MAX_LINE:
            line, cut = line[:MAX_LINE], True
            while line and (line[-1] & 0xC0) == 0x80:  # not inside a UTF-8 sequence
                line = line[:-1]
        body = b"[" + self.service.encode() + b"] " + line.rstrip(b"\r") + \
            (b" [line cut]" if cut else b"")
        self.tail.append(line[:500])  # (decoded only when the run ends)
        if len(self.tail) > 8:
            del self.tail[0]
        if self._unsaid:  # said once it takes lines again, before the next one
            n = self._unsaid
            if not self._emit(f"keeper {self.id} of {self.service}: {n} log "
                              f"line{'s' if n != 1 else ''} dropped: the journal did not keep "
                              "up".encode(), "warning", "supervisord_llm.keeper"):
                self.dropped += 1
                self._unsaid += 1
                return
            self._unsaid = 0
        if not self._emit(body, "info", "supervisord_llm.spawn"):
            self.dropped += 1
            self._unsaid += 1

    def _log(self, msg: str, level: str = "warning") -> None:
        self._emit(f"keeper {self.id} of {self.service}: {msg}".encode(), level,
                   "supervisord_llm.keeper")

    def _emit(self, body: bytes, level: str, logger: str) -> bool:
        fmt = self.log_format
        if fmt == "journal":
            body = (b"<6>" if level == "info" else b"<4>") + body
        elif fmt == "text":
            now = time.time()
            body = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
                    + f".{int(now % 1 * 1000):03d} {level.upper():<7} ").encode() + body
        elif fmt == "json":
            msg = body.decode("utf-8", "replace")
            while True:  # escapes may make it longer than a pipe takes whole
                body = dumps({"ts": round(time.time(), 3), "level": level, "logger": logger,
                              "msg": msg}).encode()
                if len(body) < PIPE_BUF or not msg:
                    break
                msg = msg[:len(msg) // 2] + " [line cut]"
        elif logger != "supervisord_llm.spawn":
            body = b"llm-supervisor " + body  # (plain: the keeper's own lines say whose)
        return self.err.write(body + b"\n")

    # --- the supervisor ----------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            fd, _addr = self.listener._accept()  # type: ignore[attr-defined]  # _socket's
        except OSError:
            return
        conn = socket.socket(fileno=fd)
        if self.client is not None and self.client_known and self._client_alive():
            # one supervisor at a time: a second connection (a stray `socat`, a probe, a
            # second daemon on a copied state directory) must not take the keeper from the
            # one attached
            try:
                conn.send(_sendable({"op": "error", "code": "busy", "message":
                                     "a supervisor is attached to this keeper"}),
                          socket.MSG_DONTWAIT)
            except OSError:
                pass
            conn.close()
            return
        self._attach(conn)

    def _client_alive(self) -> bool:
        """The attached client has not gone (its end not closed, even if unread yet)."""
        assert self.client is not None
        try:
            return self.client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    def _attach(self, conn: socket.socket, known: bool = False) -> None:
        if self.client is not None:  # gone, or one that never said hello: replaced
            self._drop_client()
        conn.setblocking(False)
        self.client = conn
        # a supervisor: it said hello (or started this keeper); until then, a connection
        # (a stray probe left open) does not keep a supervisor out
        self.client_known = known
        self.outdated = False
        if self.stopping_until is None:
            self.alone_since = _now()
        self.sel.add(conn.fileno(), "client")

    def _drop_client(self) -> None:
        if self.client is None:
            return
        self.sel.remove(self.client.fileno())
        if self.client is not self.stop_reply:
            self.client.close()
        self.client = None

    def _send(self, doc: dict[str, object]) -> None:
        if self.client is None:
            return
        try:
            self.client.send(_sendable(doc), socket.MSG_DONTWAIT)
        except OSError:  # full (a supervisor that does not read), or gone
            pass

    def _message(self) -> None:
        assert self.client is not None
        fds = array.array("i")
        try:
            data, anc, flags, _addr = self.client.recvmsg(
                MAX_MESSAGE, socket.CMSG_SPACE(4 * fds.itemsize))
        except BlockingIOError:
            return
        except OSError:
            data, anc, flags = b"", [], 0
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        if not data:
            for fd in fds:
                os.close(fd)
            self._drop_client()
            return
        try:
            msg = loads(data) if not flags & socket.MSG_TRUNC else None
        except (ValueError, RecursionError):  # (a deeply nested one)
            msg = None
        if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
            for fd in fds:
                os.close(fd)
            self._send({"op": "error", "code": "bad_request",
                        "message": "one JSON object with an op per message"})
            return
        self._handle(msg, list(fds))

    def _handle(self, msg: dict[str, object], fds: list[int]) -> None:
        op = msg["op"]
        if self.stopping_until is None:
            self.alone_since = _now()  # a word from the supervisor
        if op == "ping":
            self._send({"op": "pong"})
        elif op == "hello":
            self.client_known = True
            rng = msg.get("proto")
            ok = isinstance(rng, list) and len(rng) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) for x in rng) \
                and rng[0] <= PROTO <= rng[1]
            self.outdated = not ok
            if not ok:
                self._send({"op": "error", "code": "proto", "proto": PROTO,
                            "message": f"this keeper speaks protocol {PROTO} only; it takes "
                            "only stop and lease"})
            else:
                self._send(self.snapshot())
        elif op == "stop":
            timeout = msg.get("timeout_s", self.stop_timeout_s)
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                    or not 0 <= timeout <= 86400:
                timeout = self.stop_timeout_s
            self.stop(float(timeout), self.client)
        elif self.outdated and op != "lease":  # stop and lease: every protocol's
            self._send({"op": "error", "code": "proto", "proto": PROTO,
                        "message": "only stop and lease are taken from a client of another "
                        "protocol"})
        elif op == "lease":
            if len(fds) != 1:
                self._send({"op": "error", "code": "bad_request",
                            "message": "lease needs exactly one fd"})
            else:
                self._new_lease(fds.pop())
                self._send({"op": "ok"})
        elif op == "settings":
            # a new supervisor's [supervisor] and stop timeout apply to what it adopted
            for key, attr in (("grace_s", "grace_s"), ("unattended_s", "unattended_s"),
                              ("stop_timeout_s", "stop_timeout_s")):
                value = msg.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and 0 <= value <= 86400 and math.isfinite(value):
                    setattr(self, attr, float(value))
            self._send({"op": "ok"})
        elif op == "run":
            gen = msg.get("gen")
            left = self._alive() if self.exit is not None else []
            if self._helpers_busy() or self._settle_until is not None:
                left = left or [self.helper_pid or os.getpid()]
            elif self.container is not None and self.exit is not None and not self._removed:
                self._send({"op": "error", "code": "busy", "message":
                            f"its container {self.container} could not be removed"})
                return
            if not isinstance(gen, int) or isinstance(gen, bool):
                self._send({"op": "error", "code": "bad_request",
                            "message": "run needs a generation (gen)"})
            elif self.stopping_until is not None or self.exit is None or left:
                self._send({"op": "error", "code": "busy", "message":
                            "stopping" if self.stopping_until is not None else
                            "the engine runs" if self.exit is None else
                            f"{len(left)} process(es) of the last run still there "
                            f"(pid {', '.join(map(str, left[:5]))})"})
            else:
                self.gen = gen
                try:
                    self._spawn()
                except OSError as exc:
                    self._send({"op": "error", "code": "spawn",
                                "message": f"cannot fork: {exc.strerror or exc}"})
                else:
                    self._send({**self.snapshot(), "op": "started"})
        elif op == "signal":
            sig = msg.get("sig")
            if isinstance(sig, int) and not isinstance(sig, bool) and 0 < sig < 65:
                n = self._signal_container(sig) if self.container is not None \
                    and self.exit is None else self._signal_group(sig)
                self._send({"op": "ok", "signalled": n})
            else:
                self._send({"op": "error", "code": "bad_request",
                            "message": "signal needs a signal number"})
        else:
            self._send({"op": "error", "code": "unsupported", "message": f"unknown op {op!r}"})
        for fd in fds:
            os.close(fd)

    def snapshot(self) -> dict[str, object]:
        return {"op": "snapshot", "proto": PROTO, "version": VERSION, "id": self.id,
                "service": self.service, "gen": self.gen, "pid": self.pid,
                "ticks": self.ticks, "keeper_pid": os.getpid(),
                "state": "stopping" if self.stopping_until is not None else
                "exited" if self.exit is not None else "running",
                "exit": self.exit, "lease": self.lease is not None,
                "dropped_lines": self.dropped, "grace_s": self.grace_s,
                "unattended_s": self.unattended_s, "stop_timeout_s": self.stop_timeout_s,
                "container": self.container}

    # --- the lease ---------------------------------------------------------------------------

    def _new_lease(self, fd: int) -> None:
        os.set_inheritable(fd, False)  # (an fd from SCM_RIGHTS is inheritable): not the engine's
        if self.lease is not None:
            self.sel.remove(self.lease)
            os.close(self.lease)
        os.set_blocking(fd, False)
        self.lease = fd
        self.sel.add(fd, "lease")
        self.grace_until = None

    def _lease_readable(self) -> None:
        assert self.lease is not None
        data = _read(self.lease, 4096)
        if data is None:
            return
        if data:
            return  # nothing is ever written; ignored
        self.sel.remove(self.lease)
        os.close(self.lease)
        self.lease = None
        if self.stopping_until is None:
            self.grace_until = _now() + self.grace_s
            self._log(f"lease ended: stopping the model in {self.grace_s:g}s unless a new "
                      "lease comes")

    # --- signals -----------------------------------------------------------------------------

    def _signals(self) -> None:
        try:
            got = os.read(self._sigfd, 64)
        except OSError:
            return
        for n in got:
            if n in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                self.stop(self.stop_timeout_s)


class _Err:
    """The keeper's stderr, written without ever blocking. A pipe is opened again through
    /proc (its own open file description, made non-blocking: the supervisor's and the other
    keepers' writes to the same pipe stay as they are); a socket (the journal) is sent to with
    MSG_DONTWAIT; a file or a terminal is written as it is."""

    def __init__(self) -> None:
        import stat  # small, C

        self.fd = 2
        self.sock: socket.socket | None = None
        try:
            mode = os.fstat(2).st_mode
        except OSError:
            self.fd = -1
            return
        if stat.S_ISFIFO(mode):
            try:
                self.fd = os.open("/proc/self/fd/2", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                pass
        elif stat.S_ISSOCK(mode):
            try:
                self.sock = socket.socket(fileno=os.dup(2))
            except OSError:
                pass

    def write(self, data: bytes) -> bool:
        """False when it could not be written now (dropped)."""
        try:
            if self.sock is not None:
                self.sock.send(data, socket.MSG_DONTWAIT)
            elif self.fd >= 0:
                os.write(self.fd, data)
            return True
        except BlockingIOError:
            return False
        except OSError:
            return True  # gone: nobody reads it; not a drop to count


def _fork(child: object) -> int:
    """A fork whose child makes itself a session (and group) of its own, before anyone
    signals it, then runs `child`, which execs (or exits 127). A signal meant for the child
    before its exec must not reach our handlers (whose wakeup pipe is the keeper's): they are
    blocked across the fork, and the child puts them back to their defaults."""
    assert callable(child)
    signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child; it never returns
            try:
                os.setsid()
                child()
            finally:
                os._exit(127)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
    return pid


def _default_signals() -> None:  # pragma: no cover - in a child, before its exec
    """Every disposition back to the default, as systemd gives a service (Python ignores
    SIGPIPE and SIGXFSZ, a shell that started us without job control SIGINT and SIGQUIT,
    nohup SIGHUP; an ignored signal survives exec), the keeper's wakeup pipe dropped, and
    the signals blocked across the fork unblocked."""
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass  # (one the C library keeps for itself)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)


def _printable(text: str) -> str:
    """Another program's words, safe for a terminal (escapes and controls shown, not run;
    containers.printable's twin: the keeper imports nothing of the package)."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256
                   else f"\\u{ord(c):04x}" for c in text)


def _wait(argv: list[str], timeout_s: float, quiet: bool = False
          ) -> int | None:  # pragma: no cover - in the engine's child, before its exec
    """Run a command and wait for it (at most `timeout_s`: then it is killed, None)."""
    actions = [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
               (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)] if quiet else []
    try:
        pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions)
    except OSError as exc:
        os.write(2, f"llm-supervisor keeper: Error: cannot run {argv[0]!r}: "
                    f"{exc.strerror or exc}\n".encode())
        return 127
    deadline = _now() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if _now() >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.1)


def _read(fd: int, size: int) -> bytes | None:
    """What a non-blocking fd has: None when nothing now, b"" at its end (or an error)."""
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def select_readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _is_process(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _describe(exit: dict[str, object]) -> str:
    return f"killed by signal {exit['signal']}" if exit.get("signal") else f"exit {exit['code']}"


def _exit_of(status: int) -> dict[str, object]:
    if os.WIFSIGNALED(status):
        return {"code": None, "signal": os.WTERMSIG(status)}
    return {"code": os.waitstatus_to_exitcode(status), "signal": None}


def main(argv: list[str]) -> int:
    try:
        opts, cmd = _parse(argv)
        keeper = Keeper(opts, cmd)
    except ValueError as exc:
        sys.stderr.write(f"llm-supervisor keeper: {exc}\n")
        return 2
    try:
        keeper.start()
    except OSError as exc:
        sys.stderr.write(f"llm-supervisor keeper {opts['id']}: cannot start "
                         f"{cmd[0]!r}: {exc.strerror or exc}\n")
        if exc.errno in (errno.ENOENT, errno.EACCES):
            return 127
        return 1
    return keeper.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
