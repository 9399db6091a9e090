"""Shared test helpers: ports, waiting with deadlines, a TOML writer, the daemon as a process."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil

from supervisord_llm import ctl
from supervisord_llm.ports import pick_free_port, port_free

ROOT = Path(__file__).resolve().parent.parent
FAKE = str(Path(__file__).resolve().parent / "fakebackend.py")
# allow_paths of the tests about HTTP itself (any path; not those of the front door's
# allowlist, tests/test_door.py)
ANY_PATH: tuple[str, ...] = ("/*",)
SIM_UUID = "GPU-5a1e0000-0000-4000-8000-{:012d}"

_used_ports: set[int] = set()


def _worker_ports() -> range | None:
    """Under pytest-xdist, this worker's own slice of 20000-32000: two workers never hand out
    the same port in the moment before its server binds it. None without workers."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2:
        return None
    width = 12000 // count
    start = 20000 + int(worker[2:]) * width
    return range(start, start + width)


def free_port() -> int:
    """A free TCP port below the ephemeral range, not handed out before in this run."""
    ports = _worker_ports()
    if ports is None:
        port = pick_free_port(exclude=_used_ports)
    else:
        candidates = (random.choice(ports) for _ in range(2000))
        port = next(p for p in candidates if p not in _used_ports and port_free(p))
    _used_ports.add(port)
    return port


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


async def async_wait_until(pred: Callable[[], Any], timeout: float = 10.0,
                           interval: float = 0.02, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


# --- a small TOML writer (tests write configs from dicts) ------------------------------------


def _key(k: str) -> str:
    bare = k and all(c.isalnum() or c in "_-" for c in k) and k.isascii()
    return k if bare else json.dumps(k)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def toml_dumps(doc: Mapping[str, Any], prefix: str = "") -> str:
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for k, v in doc.items():
        is_tables = isinstance(v, list) and v and all(isinstance(x, dict) for x in v)
        if isinstance(v, dict) or is_tables:
            tables.append((k, v))
        else:
            lines.append(f"{_key(k)} = {toml_value(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in tables:
        name = f"{prefix}.{_key(k)}" if prefix else _key(k)
        if isinstance(v, dict):
            out += f"\n[{name}]\n" + toml_dumps(v, name)
        else:
            for item in v:
                out += f"\n[[{name}]]\n" + toml_dumps(item, name)
    return out


# --- configs -----------------------------------------------------------------------------------


def sim_gpus(n: int, numa: int = 0) -> list[dict[str, Any]]:
    return [{"uuid": SIM_UUID.format(i), "name": f"Sim GPU {i}",
             "pci_bus_id": f"00000000:{0x41 + i:02x}:00.0", "numa_node": numa}
            for i in range(n)]


def fake_service(name: str, port: int, *knobs: str, gpus: list[Any] | None = None,
                 **sections: Any) -> dict[str, Any]:
    svc: dict[str, Any] = {
        "name": name,
        "command": [sys.executable, FAKE, "--port", "{port}", *knobs],
        "port": port,
        "health": {"interval_s": 0.1, "timeout_s": 0.1, "failures": 2,
                   "startup_timeout_s": 10},
        "restart": {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "max_restarts": 5,
                    "window_s": 60},
        "stop": {"timeout_s": 2},
    }
    if gpus is not None:
        svc["gpus"] = gpus
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(svc.get(key), dict):
            svc[key] = {**svc[key], **value}
        else:
            svc[key] = value
    return svc


def base_config(tmp: Path, services: list[dict[str, Any]], gpus: int = 2,
                metrics: bool = True, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        # a model left by a daemon killed in a test goes 10 s after (unless one adopts it)
        "supervisor": {"control_socket": str(tmp / "ctl.sock"), "state_dir": str(tmp / "state"),
                       "log_format": "text", "adopt_grace_s": 10},
        "metrics": {"listen": f"127.0.0.1:{free_port()}" if metrics else ""},
        "gpu": {"backend": "sim", "poll_interval_s": 0.2, "sim_state_file": str(tmp / "sim.json"),
                "sim": sim_gpus(gpus)},
        "service": services,
    }
    doc.update(extra)
    return doc


def gated(name: str, *knobs: str, gpus: list[Any] | None = None, backup: str | None = None,
          service: Mapping[str, Any] | None = None, **gate: Any) -> dict[str, Any]:
    """A fake service behind a request gate on a free port (`max_concurrency` 10 unless
    given, any path: ANY_PATH); `service` adds or changes other sections of the service
    (health, env, ...)."""
    cfg: dict[str, Any] = {"listen": f"127.0.0.1:{free_port()}", "max_concurrency": 10,
                           "allow_paths": list(ANY_PATH), **gate}
    if backup:
        cfg["backup"] = backup
    return fake_service(name, free_port(), *knobs, gpus=gpus, gate=cfg, **(service or {}))


def stays(pred: Callable[[], Any], seconds: float, what: str) -> None:
    """`pred` holds for the whole of `seconds` (checked every 50 ms): the assertion that
    something does not happen."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert pred(), what
        time.sleep(0.05)


async def async_stays(pred: Callable[[], Any], seconds: float, what: str) -> None:
    """`stays` for async tests: `pred` holds for the whole of `seconds`, the loop kept free."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = pred()
        if isinstance(value, Awaitable):
            value = await value
        assert value, what
        await asyncio.sleep(0.05)


# --- processes ------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """True if the process exists and is not a zombie (a zombie holds no memory)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def proc_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class Daemon:
    """llm-supervisor as a real process, on a config written under `tmp`."""

    def __init__(self, tmp: Path, doc: dict[str, Any], env: Mapping[str, str] | None = None,
                 nofile: int | str | None = None, stdio: int | None = None) -> None:
        self.tmp = tmp
        self.nofile = nofile  # RLIMIT_NOFILE of the daemon, to run it out of descriptors
        self.stdio = stdio  # an fd (a pipe) for the daemon's stdout and stderr, not the log file
        self.doc = doc
        self.config = tmp / "config.toml"
        self.write(doc)
        self.socket = doc["supervisor"]["control_socket"]
        self.log = tmp / "daemon.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids_seen: set[int] = set()

    def write(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.config.write_text(toml_dumps(doc))

    def start(self, wait: bool = True) -> Daemon:
        self._logfh = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        argv = [sys.executable, "-m", "supervisord_llm", "--config", str(self.config)]
        if self.nofile is not None:
            argv = ["prlimit", f"--nofile={self.nofile}", "--", *argv]
        out = self._logfh if self.stdio is None else self.stdio
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=str(self.tmp))
        if wait:
            wait_until(self._answers, 20, what=f"control socket (log: {self.logtext()[-2000:]})")
        return self

    def wait_ready(self, timeout: float = 30) -> Daemon:
        """Until the daemon has started (or adopted) its services: its control socket answers
        before, with each service as it was before the start (stopped, no holds)."""
        wait_until(lambda: "llm-supervisor ready" in self.logtext(), timeout,
                   what=f"the daemon ready (log: {self.logtext()[-2000:]})")
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}: {self.logtext()}")
        try:
            self.status()
        except ctl.CtlError:
            return False
        return True

    def logtext(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def call(self, cmd: str, args: dict[str, Any] | None = None,
             timeout: float | None = 30) -> Any:
        return ctl.call(self.socket, cmd, args or {}, timeout)

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = self.call("status")
        for svc in data["services"]:
            if svc["pid"]:
                self.pids_seen.add(svc["pid"])
        return data

    def service(self, name: str) -> dict[str, Any]:
        for svc in self.status()["services"]:
            if svc["name"] == name:
                return dict(svc)
        raise KeyError(name)

    def wait_state(self, name: str, state: str, timeout: float = 15.0) -> dict[str, Any]:
        result: dict[str, Any] = wait_until(
            lambda: (s := self.service(name))["state"] == state and s,
            timeout, what=f"{name} {state} (log: {self.logtext()[-3000:]})")
        return result

    def llmctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "supervisord_llm.ctl", "--socket", self.socket, *args],
            capture_output=True, text=True, timeout=timeout, check=False,
        )

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def crash(self) -> None:
        """The daemon dies as in a crash, leaving its services behind: frozen first (it
        replaces a dead orphan guardian at once, and that one would stop the services when
        the daemon goes), then its guardian killed, then the daemon."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        for p in descendants(self.proc.pid):
            with contextlib.suppress(OSError):
                if b"_guardian" in Path(f"/proc/{p}/cmdline").read_bytes():
                    os.kill(p, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if hasattr(self, "_logfh"):
            self._logfh.close()
        for pid in self.pids_seen:  # never leave a test's processes behind
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)


class NotifyListener:
    """A fake systemd: an AF_UNIX datagram socket that records what the daemon sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def has(self, field: str) -> bool:
        return any(field in m.split("\n") for _, m in self.messages)

    def times(self, field: str) -> list[float]:
        return [t for t, m in self.messages if field in m.split("\n")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@contextlib.contextmanager
def running(tmp: Path, doc: dict[str, Any], env: Mapping[str, str] | None = None,
            nofile: int | str | None = None) -> Iterator[Daemon]:
    d = Daemon(tmp, doc, env, nofile)
    try:
        yield d.start()
    finally:
        d.stop()


# --- podman ---------------------------------------------------------------------------------


class Podman:
    """podman on storage of its own under `tmp` (for a test, a benchmark), with the flags these
    machines need (testbed section 6). What podman makes for itself whatever its storage (a
    blob cache, a networks run directory) is removed by `clean()` when it was not there."""

    def __init__(self, tmp: Path, exe: str = "podman") -> None:
        self.tmp = tmp
        self.exe = exe
        self.made = [p for p in (Path("/var/lib/containers"), Path("/run/containers"))
                     if not p.exists()]
        # podman refuses a runroot longer than 50 characters (pytest's, under xdist, is)
        self.run = Path(tempfile.mkdtemp(prefix="lsp-", dir="/tmp"))
        self.args = ["--root", str(tmp / "root"), "--runroot", str(self.run),
                     "--tmpdir", str(tmp / "tmp"), "--runtime", "runc",
                     "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
                     "--events-backend", "file"]

    def __call__(self, *args: str, check: bool = True, timeout: float = 120
                 ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([self.exe, *self.args, *args], capture_output=True, text=True,
                           timeout=timeout, check=False)
        if check and r.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: {r.returncode} {r.stderr}")
        return r

    def names(self, label: str | None = None) -> list[str]:
        filt = ["--filter", f"label={label}"] if label else []
        out = self("ps", "-a", *filt, "--format", "{{.Names}}").stdout
        return sorted(n for n in out.split() if n)

    def inspect(self, name: str) -> dict[str, Any]:
        doc: list[dict[str, Any]] = json.loads(self("inspect", name).stdout)
        return doc[0]

    def build_image(self, binary: str, image: str) -> None:
        """llama-server (as /bin/llama-server) and its libraries as a rootfs, imported as
        `image` (no registry is reachable here)."""
        root = self.tmp / "rootfs"
        (root / "bin").mkdir(parents=True)
        shutil.copy(binary, root / "bin" / "llama-server")
        ldd = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
        for line in ldd.splitlines():
            for part in line.split():
                if part.startswith("/"):
                    dest = root / part.lstrip("/")
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(part, dest)  # (the library the link names)
        with subprocess.Popen(["tar", "-C", str(root), "-c", "."],
                              stdout=subprocess.PIPE) as tar:
            r = subprocess.run([self.exe, *self.args, "import", "-", image],
                               stdin=tar.stdout, capture_output=True, text=True, timeout=120,
                               check=False)
        assert r.returncode == 0, r.stderr
        shutil.rmtree(root)

    def clean(self) -> None:
        """Every container of this storage, then the storage itself."""
        self("rm", "-a", "-f", "-t", "0", check=False)
        r = subprocess.run(["mount"], capture_output=True, text=True, check=False)
        for line in r.stdout.splitlines():  # (vfs mounts nothing, but a shm may be left)
            where = line.split(" on ", 1)[-1].split(" type ", 1)[0]
            if where.startswith((str(self.tmp), str(self.run))):
                subprocess.run(["umount", "-l", where], check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)
        shutil.rmtree(self.run, ignore_errors=True)
        for p in self.made:
            shutil.rmtree(p, ignore_errors=True)


# --- llama.cpp's llama-server -----------------------------------------------------------------

LLAMA_VERSION = "0.3.36"


def llama_server_binary() -> str | None:
    """$LLAMA_SERVER, or the binary that scripts/build-llama-server.sh caches."""
    env = os.environ.get("LLAMA_SERVER")
    if env:
        return env if os.access(env, os.X_OK) else None
    cache = Path(os.environ.get("LLM_SUPERVISOR_CACHE", Path.home() / ".cache/llm-supervisor"))
    path = cache / f"llama-server-{LLAMA_VERSION}" / "llama-server"
    return str(path) if os.access(path, os.X_OK) else None


def require_llama_server() -> str:
    """The llama-server binary, for a test module: skips the module without one, or fails
    under LLM_SUPERVISOR_REQUIRE_E2E=1 (CI, where it is built)."""
    binary = llama_server_binary()
    if binary is None:
        if os.environ.get("LLM_SUPERVISOR_REQUIRE_E2E") == "1":
            raise RuntimeError("llama-server is required (LLM_SUPERVISOR_REQUIRE_E2E=1) but "
                               "not built: run scripts/build-llama-server.sh")
        import pytest

        pytest.skip("llama-server not built: run scripts/build-llama-server.sh",
                    allow_module_level=True)
    return binary


def llama_server_pid(port: int) -> int:
    """The llama-server serving on `port`, as this host sees it (in a container too)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd[0].endswith(b"llama-server") and str(port).encode() in cmd:
                return int(entry)
    raise AssertionError(f"no llama-server on port {port}")


def make_tiny_model(path: Path, *args: str) -> Path:
    subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "make_tiny_gguf.py"),
                    str(path), *args], check=True, capture_output=True)
    return path


# --- raw HTTP peers for the gate's tests ---------------------------------------------------

RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request from a raw connection: (head, body), Content-Length or chunked."""
    head = await reader.readuntil(b"\r\n\r\n")
    body = b""
    low = head.lower()
    if b"content-length:" in low:
        n = int(low.split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(n)
    elif b"transfer-encoding: chunked" in low:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += data[:-2]
    return head, body


class RawBackend:
    """A backend that answers exactly what a test writes: `handler` gets each connection.
    Counts connections made and ended; `sent` is for the handler's own bookkeeping."""

    def __init__(self, handler: RawHandler) -> None:
        self.handler = handler
        self.port = free_port()
        self.connections = 0
        self.closed_connections = 0
        self.sent = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            await self.handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed_connections += 1
            writer.close()

    async def __aenter__(self) -> RawBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        await self.server.wait_closed()


def nginx_main_conf(tmp: Path, include: str) -> Path:
    """A minimal nginx main config under `tmp` (pid, logs, temp paths) that includes the
    `http {}`-level file `tmp/include` (one of docs/nginx/*.conf with a test's ports)."""
    main = tmp / "nginx.conf"
    main.write_text(f"""
user root;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    include {tmp}/{include};
}}
""")
    return main


# --- clients through a gate or the router --------------------------------------------------


def post(port: int, body: dict[str, Any], timeout: float = 30,
         secret: str | None = None) -> bytes:
    """One request on its own connection (Connection: close): the whole answer."""
    raw = json.dumps(body).encode()
    auth = f"Authorization: Bearer {secret}\r\n".encode() if secret else b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth +
                  b"Content-Type: application/json\r\nConnection: close\r\n"
                  + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


class Streams:
    """SSE streams through a gate or the router, each on a thread: done (ended with [DONE])
    or cut."""

    def __init__(self, port: int, n: int, tokens: int, delay: float,
                 model: str | None = None, *, secret: str | None = None) -> None:
        self.secret = secret
        self.n = n
        self.done = 0
        self.cut = 0
        body: dict[str, Any] = {"stream": True, "max_tokens": tokens,
                                "fake_token_delay_s": delay,
                                "messages": [{"role": "user", "content": "hi"}]}
        if model is not None:
            body["model"] = model
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._one, args=(port, body), daemon=True)
                         for _ in range(n)]
        for t in self._threads:
            t.start()

    def _one(self, port: int, body: dict[str, Any]) -> None:
        try:
            ok = b"data: [DONE]" in post(port, body, secret=self.secret)
        except OSError:
            ok = False
        with self._lock:
            if ok:
                self.done += 1
            else:
                self.cut += 1

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))


@contextlib.asynccontextmanager
async def front_host() -> AsyncIterator[Any]:
    """A front process driven as the daemon drives it (no daemon: the test is the daemon),
    its gates' counters and statistics read afresh every 50 ms."""
    import tempfile

    from supervisord_llm.front.client import FrontClient

    log = tempfile.NamedTemporaryFile(prefix="llm-front-", suffix=".log")  # noqa: SIM115
    host = FrontClient(None, output_fd=log.fileno(), log_format="text")
    host.test_log = Path(log.name)  # type: ignore[attr-defined]
    try:
        await host.start()
    except BaseException:  # (its directory under /tmp goes with it)
        await host.close()
        log.close()
        raise

    async def refresh() -> None:
        while True:
            await host.refresh()
            await asyncio.sleep(0.05)

    task = asyncio.get_running_loop().create_task(refresh())
    try:
        yield host
    finally:
        task.cancel()
        await host.close()
        log.close()
