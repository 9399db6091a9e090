"""A real Prometheus server for tests (Debian's `prometheus` package), on loopback at a free
port, with its storage in a temporary directory that stop() removes.

    with PromServer(tmp_path, config_text, files={"alerts.yml": text}) as prom:
        prom.targets()                 # /api/v1/targets: the active targets
        prom.query("up == 0")          # /api/v1/query: the instant vector
        prom.alerts()                  # /api/v1/alerts: pending and firing alerts

The config (and `files`, e.g. its rule files) are written next to each other, so relative
paths in the config work. The server runs in its own process group; stop() (and leaving the
`with`, and an exit of the interpreter) terminates it, kills it if it lingers, and reaps it;
started from the main thread it also dies with pytest (PR_SET_PDEATHSIG through setpriv).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
import weakref
from pathlib import Path
from typing import Any

from helpers import free_port, wait_until

PROMETHEUS = shutil.which("prometheus") or (
    "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
PROMTOOL = shutil.which("promtool")
SETPRIV = shutil.which("setpriv")

_live: weakref.WeakSet[PromServer] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for server in list(_live):
        server.stop()


def prometheus_missing() -> str | None:
    if PROMETHEUS is None or PROMTOOL is None:
        return "prometheus and promtool are not installed (scripts/setup.sh installs them)"
    return None


class PromServer:
    def __init__(self, base: Path, config: str, files: dict[str, str] | None = None) -> None:
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)
        self.config = base / "prometheus.yml"
        self.config.write_text(config)
        for name, text in (files or {}).items():
            (base / name).write_text(text)
        self.storage = base / "prometheus-data"
        self.log = base / "prometheus.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def check_config(self) -> subprocess.CompletedProcess[str]:
        assert PROMTOOL is not None
        return subprocess.run([PROMTOOL, "check", "config", str(self.config)],
                              capture_output=True, text=True, timeout=60, check=False)

    def start(self) -> PromServer:
        assert PROMETHEUS is not None
        prefix = [SETPRIV, "--pdeathsig", "KILL", "--"] if SETPRIV is not None and \
            threading.current_thread() is threading.main_thread() else []
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*prefix, PROMETHEUS, f"--config.file={self.config}",
                 f"--storage.tsdb.path={self.storage}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.base, start_new_session=True)
        _live.add(self)
        wait_until(self._ready, 60, 0.1, what=f"prometheus ready (log: {self.logtext()})")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}: {self.logtext()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready",
                                        timeout=5) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def logtext(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/{path}{query}",
                                    timeout=10) as r:
            doc = json.loads(r.read())
        assert doc["status"] == "success", doc
        return doc["data"]

    def targets(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return data

    def query(self, expr: str) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return data

    def alerts(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return data

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        _live.discard(self)
        shutil.rmtree(self.storage, ignore_errors=True)

    def __enter__(self) -> PromServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
