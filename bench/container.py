"""What a container costs a service: llama-server on a tiny model as a process and the same
binary in a podman container (an image made here from it and its libraries), supervised by
the daemon side by side. Per round: `llmctl start` to ready, a request, a crash of the engine
to ready again, and `llmctl stop` to stopped (the container removed). Medians and maxima.

    .venv/bin/python bench/container.py [--rounds 5]

Needs podman (apt-get install podman runc) and the llama-server that scripts/setup.sh builds
($LLAMA_SERVER or its cache). podman runs on storage of the bench's own, with the flags the
testbed's machines need (runc, vfs, cgroupfs, file events, ulimits); nothing is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from supervisord_llm import ctl  # noqa: E402

IMAGE = "localhost/llama-bench:1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def llama_server() -> str:
    env = os.environ.get("LLAMA_SERVER")
    if env:
        return env
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llm-supervisor"
    found = sorted(cache.glob("llama-server-*/llama-server"))
    if not found:
        sys.exit("llama-server not built: run scripts/setup.sh")
    return str(found[-1])


def podman_args(tmp: Path) -> list[str]:
    # (podman wants a runroot of at most 50 characters: under /tmp/lsb-XXXXXXXX)
    return ["--root", str(tmp / "root"), "--runroot", str(tmp / "run"), "--tmpdir",
            str(tmp / "tmp"), "--runtime", "runc", "--storage-driver", "vfs",
            "--cgroup-manager", "cgroupfs", "--events-backend", "file"]


def build_image(podman: str, args: list[str], binary: str, tmp: Path) -> None:
    root = tmp / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy(binary, root / "bin" / "llama-server")
    ldd = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    for part in ldd.split():
        if part.startswith("/"):
            dest = root / part.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(part, dest)
    with subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE) as tar:
        subprocess.run([podman, *args, "import", "-", IMAGE], stdin=tar.stdout, check=True,
                       capture_output=True, timeout=120)
    shutil.rmtree(root)


def toml(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(toml(x) for x in v) + "]"
    return str(v)


def config(tmp: Path, binary: str, model: Path, pargs: list[str]) -> tuple[str, dict[str, int]]:
    ports = {"process": free_port(), "container": free_port()}
    serve = ["-m", "MODEL", "--host", "127.0.0.1", "--port", "{port}", "-c", "512", "-t", "1",
             "--no-webui"]
    lines = ["[supervisor]", f"control_socket = {toml(str(tmp / 'ctl.sock'))}",
             f"state_dir = {toml(str(tmp / 'state'))}", 'log_format = "text"',
             "[metrics]", 'listen = ""', "[gpu]", 'backend = "none"']
    for name, port in ports.items():
        argv = [binary, *serve] if name == "process" else ["/bin/llama-server", *serve]
        argv = [str(model) if a == "MODEL" and name == "process" else
                "/model.gguf" if a == "MODEL" else a for a in argv]
        lines += ["[[service]]", f"name = {toml(name)}", f"command = {toml(argv)}",
                  f"port = {port}", 'start = "always"',
                  "[service.health]", "interval_s = 0.1", "timeout_s = 0.1",
                  "startup_timeout_s = 60",
                  "[service.restart]", "backoff_initial_s = 0.1", "backoff_max_s = 0.1",
                  "max_restarts = 1000", "window_s = 1",
                  "[service.stop]", "timeout_s = 5"]
        if name == "container":
            lines += ["[service.container]", f"image = {toml(IMAGE)}",
                      f"runtime_args = {toml(pargs)}",
                      "run_args = " + toml(["--ulimit", "nofile=1024:1024", "--ulimit",
                                            "nproc=1024:1024", "-v",
                                            f"{model}:/model.gguf:ro"])]
    return "\n".join(lines) + "\n", ports


def state(sock: str, name: str) -> dict[str, Any]:
    try:
        services = ctl.call(sock, "status", {}, 30)["services"]
    except ctl.CtlError:  # (not answering yet)
        return {"state": "-", "pid": None}
    for s in services:
        if s["name"] == name:
            return dict(s)
    raise KeyError(name)


def wait(sock: str, name: str, want: str, not_pid: int | None = None,
         timeout: float = 120) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        s = state(sock, name)
        if s["state"] == want and (not_pid is None or s["pid"] != not_pid):
            return time.monotonic() - t0
        time.sleep(0.01)
    raise SystemExit(f"{name} not {want} within {timeout} s: {state(sock, name)}")


def engine_pid(port: int) -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd[0].endswith(b"llama-server") and str(port).encode() in cmd:
                return int(entry)
    raise SystemExit(f"no llama-server on port {port}")


def request(port: int) -> float:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 4}).encode()
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Content-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    podman = shutil.which("podman")
    if podman is None:
        sys.exit("podman is not installed (apt-get install podman runc)")
    binary = llama_server()
    made = [p for p in (Path("/var/lib/containers"), Path("/run/containers"))
            if not p.exists()]
    tmp = Path(tempfile.mkdtemp(prefix="lsb-", dir="/tmp"))
    pargs = podman_args(tmp / "podman")
    daemon = None
    try:
        build_image(podman, pargs, binary, tmp)
        model = tmp / "tiny.gguf"
        subprocess.run([sys.executable, str(ROOT / "tests" / "make_tiny_gguf.py"), str(model)],
                       check=True, capture_output=True)
        text, ports = config(tmp, binary, model, pargs)
        (tmp / "config.toml").write_text(text)
        sock = str(tmp / "ctl.sock")
        with open(tmp / "daemon.log", "wb") as log:
            daemon = subprocess.Popen([sys.executable, "-m", "supervisord_llm", "--config",
                                       str(tmp / "config.toml")], stdout=log,
                                      stderr=subprocess.STDOUT, cwd=str(tmp))
        for name in ports:
            wait(sock, name, "ready")
        results: dict[str, dict[str, list[float]]] = {
            n: {"start": [], "request": [], "crash": [], "stop": []} for n in ports}
        for _ in range(args.rounds):
            for name, port in ports.items():
                r = results[name]
                t0 = time.monotonic()
                ctl.call(sock, "stop", {"services": [name]}, 120)
                r["stop"].append(time.monotonic() - t0)
                t0 = time.monotonic()
                ctl.call(sock, "start", {"services": [name]}, 120)
                wait(sock, name, "ready")
                r["start"].append(time.monotonic() - t0)
                r["request"].append(request(port))
                pid = state(sock, name)["pid"]
                t0 = time.monotonic()
                os.kill(engine_pid(port), signal.SIGKILL)
                wait(sock, name, "ready", not_pid=pid)
                r["crash"].append(time.monotonic() - t0)
        print(f"{'':10} {'start->ready':>14} {'request':>10} {'crash->ready':>14} "
              f"{'stop':>10}   (median / max, ms; {args.rounds} rounds)")
        for name, r in results.items():
            cells = [f"{statistics.median(v) * 1e3:6.0f} /{max(v) * 1e3:6.0f}"
                     for v in (r["start"], r["request"], r["crash"], r["stop"])]
            print(f"{name:10} {cells[0]:>14} {cells[1]:>10} {cells[2]:>14} {cells[3]:>10}")

        def added(key: str) -> float:
            return (statistics.median(results["container"][key])
                    - statistics.median(results["process"][key])) * 1e3

        print(f"a container adds: start {added('start'):+.0f} ms, crash->ready "
              f"{added('crash'):+.0f} ms, stop {added('stop'):+.0f} ms (medians)")
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(60)
            except subprocess.TimeoutExpired:
                daemon.kill()
        subprocess.run([podman, *pargs, "rm", "-a", "-f", "-t", "0"], capture_output=True,
                       check=False)
        shutil.rmtree(tmp, ignore_errors=True)
        for p in made:
            shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    main()
