"""What a container costs a service: llama-server on a tiny model as a process and the same
binary in a podman container (an image made here from it and its libraries), supervised by
the daemon side by side. Per round: `llmctl stop`, `llmctl start` to ready, a request, and a
crash of the engine to ready again. Medians and maxima.

    .venv/bin/python bench/container.py [--rounds 5]

Needs podman (apt-get install podman runc) and the llama-server that scripts/setup.sh builds
($LLAMA_SERVER or its cache). podman runs on storage of the bench's own, with the flags the
testbed's machines need (tests/helpers.Podman); nothing is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import (
    Daemon,
    Podman,
    base_config,
    free_port,
    llama_server_binary,
    llama_server_pid,
    make_tiny_model,
)

IMAGE = "localhost/llama-bench:1"


def services(binary: str, model: Path, pm: Podman) -> list[dict[str, Any]]:
    out = []
    for name in ("process", "container"):
        path = str(model) if name == "process" else "/model.gguf"
        svc: dict[str, Any] = {
            "name": name,
            "command": [binary if name == "process" else "/bin/llama-server", "-m", path,
                        "--host", "127.0.0.1", "--port", "{port}", "-c", "512", "-t", "1",
                        "--no-webui"],
            "port": free_port(),
            "health": {"interval_s": 0.1, "timeout_s": 0.1, "startup_timeout_s": 60},
            "restart": {"backoff_initial_s": 0.1, "backoff_max_s": 0.1, "max_restarts": 1000,
                        "window_s": 1},
            "stop": {"timeout_s": 5}}
        if name == "container":
            svc["container"] = {"image": IMAGE, "runtime_args": pm.args, "run_args": [
                "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
                "-v", f"{model}:/model.gguf:ro"]}
        out.append(svc)
    return out


def wait(d: Daemon, name: str, want: str, not_pid: int | None = None,
         timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = d.service(name)
        if s["state"] == want and (not_pid is None or s["pid"] != not_pid):
            return
        time.sleep(0.01)
    raise SystemExit(f"{name} not {want} within {timeout} s: {d.service(name)}")


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
    binary = llama_server_binary()
    if binary is None:
        sys.exit("llama-server not built: run scripts/setup.sh")
    tmp = Path(tempfile.mkdtemp(prefix="llmsup-bench-container-"))
    pm = Podman(tmp / "podman", podman)
    d = None
    try:
        pm.build_image(binary, IMAGE)
        model = make_tiny_model(tmp / "tiny.gguf")
        svcs = services(binary, model, pm)
        ports = {s["name"]: s["port"] for s in svcs}
        d = Daemon(tmp, base_config(tmp, svcs, metrics=False)).start()
        for name in ports:
            wait(d, name, "ready")
        results: dict[str, dict[str, list[float]]] = {
            n: {"start": [], "request": [], "crash": [], "stop": []} for n in ports}
        for _ in range(args.rounds):
            for name, port in ports.items():
                r = results[name]
                t0 = time.monotonic()
                d.call("stop", {"services": [name]}, 120)
                r["stop"].append(time.monotonic() - t0)
                t0 = time.monotonic()
                d.call("start", {"services": [name]}, 120)
                wait(d, name, "ready")
                r["start"].append(time.monotonic() - t0)
                r["request"].append(request(port))
                pid = d.service(name)["pid"]
                t0 = time.monotonic()
                os.kill(llama_server_pid(port), signal.SIGKILL)
                wait(d, name, "ready", not_pid=pid)
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
        if d is not None:
            d.stop()
        pm.clean()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
