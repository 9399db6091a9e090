"""The daemon as a real process: llmctl, exit codes, reload, signals, sd_notify, metrics,
orphans. Services are the fake backend; GPUs are simulated."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import (
    SIM_UUID,
    Daemon,
    NotifyListener,
    alive,
    base_config,
    descendants,
    fake_service,
    free_port,
    running,
    stays,
    toml_dumps,
    wait_until,
)


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


def two_services(tmp: Path, *knobs: str) -> dict[str, Any]:
    return base_config(tmp, [fake_service("alpha", free_port(), *knobs, gpus=[0]),
                             fake_service("beta", free_port(), *knobs, gpus=[SIM_UUID.format(1)])])


def test_status_after_start(tmp_path: Path) -> None:
    with running(tmp_path, two_services(tmp_path)) as d:
        d.wait_state("alpha", "ready")
        d.wait_state("beta", "ready")
        data = d.status()
        sup = data["supervisor"]
        assert set(sup) >= {"version", "pid", "uptime_s", "config_path", "mode"}
        assert sup["mode"] == "normal" and sup["pid"] == d.proc.pid  # type: ignore[union-attr]
        svc = data["services"][0]
        assert set(svc) >= {"name", "state", "pid", "gpus", "numa_node", "cpus", "port",
                            "health", "restarts", "last_exit", "uptime_s", "inflight", "gate",
                            "throttled"}
        assert set(svc["health"]) == {"ok", "last_error", "checked_s_ago"}
        assert svc["gpus"] == [SIM_UUID.format(0)] and svc["numa_node"] == 0
        assert svc["gate"] == "none" and svc["inflight"] == 0
        gpu = data["gpus"][1]
        assert set(gpu) >= {"index", "uuid", "name", "pci_bus_id", "numa_node", "temperature_c",
                            "memory_temperature_c", "power_w", "power_limit_w",
                            "default_power_limit_w", "utilization_pct", "memory_used_bytes",
                            "memory_total_bytes", "thermal_state", "thresholds"}
        assert gpu["temperature_c"] == 35.0 and gpu["thermal_state"] == "ok"
        assert set(data["power"]) >= {"source", "ups", "status", "charge_pct", "runtime_s",
                                      "state"}
        # sim readings come from the state file, re-read at every poll
        (tmp_path / "sim.json").write_text(json.dumps(
            {SIM_UUID.format(1): {"temperature_c": 71, "power_w": 180}}))
        wait_until(lambda: d.status()["gpus"][1]["temperature_c"] == 71.0, 5, what="71C")
        (tmp_path / "sim.json").write_text(json.dumps({SIM_UUID.format(1): {"lost": True}}))
        wait_until(lambda: d.status()["gpus"][1]["thermal_state"] == "lost", 5, what="lost")


def test_llmctl_table_json_and_exit_codes(tmp_path: Path) -> None:
    with running(tmp_path, two_services(tmp_path)) as d:
        d.wait_state("alpha", "ready")
        r = d.llmctl("status")
        assert r.returncode == 0, r.stderr
        assert "SERVICE" in r.stdout and "alpha" in r.stdout and "GPU0" in r.stdout
        r = d.llmctl("--json", "status", "beta")
        assert r.returncode == 0 and [s["name"] for s in json.loads(r.stdout)["services"]] == \
            ["beta"]
        r = d.llmctl("stop", "alpha")
        assert r.returncode == 0 and "alpha: stopped" in r.stdout
        assert d.service("alpha")["state"] == "stopped"
        r = d.llmctl("start", "alpha")
        assert r.returncode == 0
        d.wait_state("alpha", "ready")
        pid = d.service("alpha")["pid"]
        r = d.llmctl("restart", "alpha")
        assert r.returncode == 0 and "alpha: ready" in r.stdout, r.stderr
        assert d.service("alpha")["pid"] != pid
        r = d.llmctl("restart", "--no-wait", "--all")
        assert r.returncode == 0
        r = d.llmctl("stop", "nope")
        assert r.returncode == 1 and "no service named 'nope'" in r.stderr
        r = d.llmctl("reset", "alpha")
        assert r.returncode == 0
        r = d.llmctl("stop")
        assert r.returncode == 2 and "--all" in r.stderr
        r = d.llmctl("frobnicate")
        assert r.returncode == 2
        r = d.llmctl("drain", "alpha")
        assert r.returncode == 1 and "alpha has no gate" in r.stderr
        r = d.llmctl("checkpoint")
        assert r.returncode == 1 and "no checkpoint is configured" in r.stderr
    r = subprocess.run([sys.executable, "-m", "supervisord_llm.ctl", "--socket",
                        str(tmp_path / "gone.sock"), "status"], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 3 and "is llm-supervisor running?" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run llmctl as another user")
def test_permission_denied_for_mutating_commands(tmp_path: Path) -> None:
    import shutil
    import tempfile

    public = Path(tempfile.mkdtemp(prefix="llmsup-"))  # pytest's own tmp is private to root
    public.chmod(0o755)
    doc = two_services(tmp_path)
    doc["supervisor"]["control_socket"] = str(public / "ctl.sock")
    try:
        run_permission_checks(tmp_path, doc)
    finally:
        shutil.rmtree(public, ignore_errors=True)


def run_permission_checks(tmp_path: Path, doc: dict[str, Any]) -> None:
    with running(tmp_path, doc) as d:
        d.wait_state("alpha", "ready")
        os.chmod(d.socket, 0o666)  # noqa: S103 - let an ordinary user connect: SO_PEERCRED decides
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}

        # llmctl needs only the standard library: the system Python runs it as nobody even
        # where the project's virtual environment is private to root.
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

        def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
            try:
                return subprocess.run([python, "-m", "supervisord_llm.ctl", "--socket",
                                       d.socket, *args], capture_output=True, text=True,
                                      check=False, user=65534, group=65534, extra_groups=[],
                                      env=env, cwd="/")
            except PermissionError:
                pytest.skip(f"{python} cannot be run by nobody here")

        r = as_nobody("status")
        if r.returncode != 0 and "No module named" in r.stderr:
            pytest.skip("the checkout is not readable by nobody here")
        assert r.returncode == 0, r.stderr
        r = as_nobody("stop", "alpha")
        assert r.returncode == 4 and "permission_denied" in r.stderr
        assert d.service("alpha")["state"] == "ready"
        os.chmod(d.socket, 0o660)
        r = as_nobody("status")
        assert r.returncode == 4, r.stderr
    # members of control_group may mutate: nobody's own group is nogroup
    doc["supervisor"]["control_group"] = "nogroup"
    with running(tmp_path, doc) as d:
        d.wait_state("alpha", "ready")
        assert os.stat(d.socket).st_gid == 65534
        r = as_nobody("stop", "alpha")
        assert r.returncode == 0, r.stderr
        assert d.service("alpha")["state"] == "stopped"


def test_ready_status_watchdog_reload_stopping(tmp_path: Path, notify: NotifyListener) -> None:
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
    d = Daemon(tmp_path, two_services(tmp_path), env)
    d.start(wait=False)
    try:
        wait_until(lambda: notify.has("READY=1"), 20, what="READY=1")
        # READY=1 comes after the sockets are bound and every service was launched
        data = d.status()
        assert all(s["pid"] for s in data["services"])
        wait_until(lambda: len(notify.times("WATCHDOG=1")) >= 5, 5, what="pings")
        pings = notify.times("WATCHDOG=1")
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 0.4 and min(gaps) > 0.1
        wait_until(lambda: any("STATUS=2/2 services ready" in m for _, m in notify.messages),
                   10, what="STATUS line")
        d.signal(signal.SIGHUP)
        wait_until(lambda: notify.has("RELOADING=1"), 5, what="RELOADING=1")
        wait_until(lambda: len(notify.times("READY=1")) >= 2, 10, what="READY after reload")
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 0
        assert notify.has("STOPPING=1")
    finally:
        d.stop()


def test_blocked_loop_stops_watchdog_pings(tmp_path: Path, notify: NotifyListener) -> None:
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000",
           "LLM_SUPERVISOR_TEST_HOOKS": "1"}
    with running(tmp_path, two_services(tmp_path), env) as d:
        wait_until(lambda: len(notify.times("WATCHDOG=1")) >= 3, 10, what="pings")
        t0 = time.monotonic()
        d.call("status", {"debug_block_loop_s": 1.5})
        t1 = time.monotonic()
        during = [t for t in notify.times("WATCHDOG=1") if t0 + 0.25 < t < t1 - 0.05]
        assert during == []
        wait_until(lambda: any(t > t1 for t in notify.times("WATCHDOG=1")), 2,
                   what="pings resume")


def test_reload_restarts_only_changed_services(tmp_path: Path) -> None:
    doc = two_services(tmp_path)
    with running(tmp_path, doc) as d:
        d.wait_state("alpha", "ready")
        d.wait_state("beta", "ready")
        pa, pb = d.service("alpha")["pid"], d.service("beta")["pid"]
        doc["service"][1]["env"] = {"CHANGED": "1"}
        doc["service"].append(fake_service("gamma", free_port()))
        d.write(doc)
        r = d.llmctl("--json", "reload")
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert res["restarted"] == ["beta"] and res["unchanged"] == ["alpha"]
        assert res["added"] == ["gamma"]
        assert d.service("alpha")["pid"] == pa
        d.wait_state("beta", "ready")
        assert d.service("beta")["pid"] != pb
        d.wait_state("gamma", "ready")
        # an invalid config is refused and the running one kept
        d.config.write_text(toml_dumps(doc).replace("interval_s = 0.1", "interval_s = -1", 1))
        r = d.llmctl("reload")
        assert r.returncode == 1 and "service[0].health.interval_s: must be > 0" in r.stderr
        assert d.service("alpha")["pid"] == pa and d.service("alpha")["state"] == "ready"
        d.signal(signal.SIGHUP)
        wait_until(lambda: "reload (SIGHUP) not done" in d.logtext(), 5,
                   what="SIGHUP reload refused")
        assert d.service("gamma")["state"] == "ready"
        # removing a service stops it
        del doc["service"][2]
        d.write(doc)
        r = d.llmctl("--json", "reload")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["removed"] == ["gamma"]
        assert [s["name"] for s in d.status()["services"]] == ["alpha", "beta"]


def test_a_daemon_killed_for_good_leaves_nothing_after_the_grace(tmp_path: Path) -> None:
    """kill -9 and never restarted: the models outlive it for `adopt_grace_s` (a new daemon
    would adopt them), then their keepers stop them, grandchildren that ignore SIGTERM
    included, within the grace plus the stop timeout."""
    doc = base_config(tmp_path, [
        fake_service("alpha", free_port(), "--grandchild", "--pidfile", str(tmp_path / "a.pid")),
        fake_service("beta", free_port(), "--grandchild", "--ignore-term",
                     "--pidfile", str(tmp_path / "b.pid"), stop={"timeout_s": 1}),
    ])
    doc["supervisor"]["adopt_grace_s"] = 1
    with running(tmp_path, doc) as d:
        d.wait_state("alpha", "ready")
        d.wait_state("beta", "ready")
        assert d.proc is not None
        procs = descendants(d.proc.pid)
        for f in ("a.pid", "b.pid"):
            wait_until((tmp_path / f).exists, 5, what=f)
            procs += [int(p) for p in (tmp_path / f).read_text().split()]
        assert len(set(procs)) >= 7  # guardian, 2 keepers, 2 services, 2 grandchildren
        kept = [p for p in procs if p not in guardians(procs)]
        d.proc.kill()
        d.proc.wait()
        t0 = time.monotonic()
        stays(lambda: all(alive(p) for p in kept), 0.5,
              f"the models outlive the daemon: {[(p, alive(p)) for p in kept]}")
        wait_until(lambda: not any(alive(p) for p in procs), 10.0,
                   what=f"no survivors among {procs}")
        assert time.monotonic() - t0 < 1 + 1 + 3  # the grace, the stop timeout, slack


def guardians(pids: list[int]) -> set[int]:
    out = set()
    for p in pids:
        with contextlib.suppress(OSError):
            if b"_guardian" in Path(f"/proc/{p}/cmdline").read_bytes():
                out.add(p)
    return out


def test_graceful_stop_in_reverse_order_and_fast_second_signal(tmp_path: Path) -> None:
    with running(tmp_path, two_services(tmp_path)) as d:
        d.wait_state("alpha", "ready")
        d.wait_state("beta", "ready")
        procs = descendants(d.proc.pid)  # type: ignore[union-attr]
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 0
        log = d.logtext()
        assert log.index("beta: ready -> stopping") < log.index("alpha: ready -> stopping")
        assert not any(alive(p) for p in procs)
        assert not Path(d.socket).exists()
    doc = base_config(tmp_path, [fake_service("stubborn", free_port(), "--ignore-term",
                                              stop={"timeout_s": 60})])
    with running(tmp_path, doc) as d:
        d.wait_state("stubborn", "ready")
        procs = descendants(d.proc.pid)  # type: ignore[union-attr]
        d.signal(signal.SIGTERM)
        wait_until(lambda: d.service("stubborn")["state"] == "stopping", 5, what="stopping")
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.wait(10) == 0
        assert time.monotonic() - t0 < 5
        wait_until(lambda: not any(alive(p) for p in procs), 2, what="fast stop")


def test_the_next_daemon_adopts_what_a_crashed_one_left(tmp_path: Path) -> None:
    """A crash (the daemon and its guardian killed): the next daemon, started within the
    grace, adopts the running model: same pid, same grandchild, `adopted` in status; its
    stop then stops them."""
    pidfile = tmp_path / "a.pid"
    doc = base_config(tmp_path, [fake_service("alpha", free_port(), "--grandchild",
                                              "--pidfile", str(pidfile))])
    d = Daemon(tmp_path, doc).start()
    try:
        first = d.wait_state("alpha", "ready")
        assert first["adopted"] is False
        wait_until(pidfile.exists, 5, what="pidfile")
        main, grandchild = map(int, pidfile.read_text().split())
        assert first["pid"] == main
        d.crash()  # the daemon and its guardian gone, the services left
        d.pids_seen.clear()  # d.stop() must not clean up what the next daemon has to find
        stays(lambda: alive(grandchild) and alive(main), 0.3, "the model lives on")
    finally:
        d.stop()
    with running(tmp_path, doc) as d2:
        svc = d2.wait_state("alpha", "ready")
        assert svc["pid"] == main and svc["adopted"] is True and svc["restarts"] == 0
        assert "alpha: adopted pid" in d2.logtext()
        assert alive(grandchild)
        d2.signal(signal.SIGTERM)
        assert d2.wait(20) == 0
    assert not alive(main) and not alive(grandchild)


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback only
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_metrics_and_healthz(tmp_path: Path) -> None:
    doc = two_services(tmp_path)
    doc["service"].append(fake_service("crashy", free_port(), "--exit-after", "0.01",
                                       restart={"max_restarts": 1}))
    listen = doc["metrics"]["listen"]
    with running(tmp_path, doc) as d:
        d.wait_state("alpha", "ready")
        d.wait_state("crashy", "failed", 20)
        code, text = http_get(f"http://{listen}/metrics")
        assert code == 200
        for name in ("llm_supervisor_build_info{version=", 'llm_supervisor_mode{mode="normal"} 1.0',
                     "llm_supervisor_loop_lag_seconds", "llm_supervisor_watchdog_pings_total",
                     'llm_supervisor_service_state{service="alpha",state="ready"} 1.0',
                     'llm_supervisor_service_up{service="alpha"} 1.0',
                     'llm_supervisor_service_restarts_total{reason="exit",service="crashy"} 1.0',
                     "llm_supervisor_service_health_failures_total{service=",
                     'llm_supervisor_service_start_duration_seconds{service="alpha"}',
                     "llm_supervisor_gpu_temperature_celsius{gpu=\"0\"",
                     "llm_supervisor_gpu_power_limit_watts", "llm_supervisor_gpu_up",
                     "llm_supervisor_gpu_memory_total_bytes", "llm_supervisor_gpu_thermal_state",
                     "llm_supervisor_gpu_slowdown_threshold_celsius"):
            assert name in text, name
        assert 'uuid="GPU-5a1e0000-0000-4000-8000-000000000000"' in text
        code, body = http_get(f"http://{listen}/healthz")
        assert code == 503 and json.loads(body)["failed"] == ["crashy"]
        r = d.llmctl("stop", "crashy")
        assert r.returncode == 0
        code, body = http_get(f"http://{listen}/healthz")
        assert code == 200 and json.loads(body)["ok"] is True
        # strangers on the metrics listener: an answer, one log line at most per kind
        assert http_get(f"http://{listen}/nope")[0] == 404
        host, port = listen.rsplit(":", 1)
        for _ in range(20):
            for raw in (b"\x00garbage\r\n\r\n", b"GET / HTTP/1.1\nX: y\n\n",
                        b"GET /metrics HTTP/1.1\r\nContent-Length: -5\r\n\r\n"):
                with socket.create_connection((host, int(port)), timeout=5) as s:
                    s.sendall(raw)
                    assert s.recv(100).startswith(b"HTTP/1.1 400")
        wait_until(lambda: "bad request" in d.logtext(), 5, what="the bad requests logged")
        log = d.logtext()
        assert log.count("bad request") <= 6 and "Traceback" not in log


def test_start_errors_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[service]]\n")
    r = subprocess.run([sys.executable, "-m", "supervisord_llm", "--config", str(bad)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("<3>llm-supervisor: config error:") and "line 1" in r.stderr
    with running(tmp_path, two_services(tmp_path)) as d:
        other = tmp_path / "other"
        other.mkdir()
        doc2 = two_services(other)
        doc2["supervisor"]["control_socket"] = d.socket  # in use by the first daemon
        (other / "c.toml").write_text(toml_dumps(doc2))
        r = subprocess.run([sys.executable, "-m", "supervisord_llm", "--config",
                            str(other / "c.toml")], capture_output=True, text=True, check=False,
                           timeout=30)
        assert r.returncode == 2, r.stderr
        assert "is in use: is another llm-supervisor running?" in r.stderr
        assert "Traceback" not in r.stderr
        doc3 = two_services(other)
        doc3["supervisor"]["state_dir"] = d.doc["supervisor"]["state_dir"]
        (other / "c3.toml").write_text(toml_dumps(doc3))
        r = subprocess.run([sys.executable, "-m", "supervisord_llm", "--config",
                            str(other / "c3.toml")], capture_output=True, text=True, check=False,
                           timeout=30)
        assert r.returncode == 2 and "is locked" in r.stderr
        assert d.service("alpha")["pid"]  # the first daemon is untouched


# --- fuzzing the control socket of a live daemon -------------------------------------------

hostile = st.one_of(
    st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
                 lambda inner: st.lists(inner, max_size=4) |
                 st.dictionaries(st.text(max_size=8), inner, max_size=4),
                 max_leaves=15).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({
        "v": st.sampled_from([1, 2, "1", None]),
        "id": st.one_of(st.integers(), st.text(max_size=5), st.none(), st.booleans()),
        "cmd": st.sampled_from(["status", "start", "stop", "restart", "reset", "nope", "", 7]),
        "args": st.one_of(st.none(), st.integers(), st.dictionaries(
            st.sampled_from(["services", "all", "wait", "timeout_s", "service", "x"]),
            st.one_of(st.booleans(), st.integers(), st.text(max_size=8),
                      st.lists(st.text(max_size=8), max_size=3), st.floats()), max_size=3)),
    }).map(lambda v: json.dumps(v).encode()),
)


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("fuzz")
    doc = base_config(tmp, [{"name": "sleeper", "command": ["/bin/sleep", "600"],
                             "restart": {"policy": "always", "backoff_initial_s": 0}}])
    with running(tmp, doc) as d:
        yield d


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(line=hostile)
def test_control_socket_fuzz(fuzz_daemon: Daemon, line: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(fuzz_daemon.socket)
        s.sendall(line + b"\n")
        s.sendall(b'{"v":1,"id":"probe","cmd":"status","args":{}}\n')
        buf = b""
        while buf.count(b"\n") < (2 if line.strip() else 1):
            chunk = s.recv(65536)
            assert chunk, "daemon closed the connection"
            buf += chunk
    replies = [json.loads(x) for x in buf.splitlines()]
    if line.strip():
        first = replies[0]
        assert first["v"] == 1 and isinstance(first["ok"], bool)
        if not first["ok"]:
            assert first["error"]["code"] in ("bad_request", "unknown_command",
                                              "unknown_service", "timeout", "failed")
    assert replies[-1]["ok"] is True and replies[-1]["id"] == "probe"


def test_oversized_and_garbage_messages_keep_the_daemon_serving(fuzz_daemon: Daemon) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(fuzz_daemon.socket)
        # the daemon answers past 64 KiB and closes: the rest may meet a closed socket
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(b"x" * 200_000)
        reply = json.loads(s.makefile("rb").readline())
        assert reply["error"]["code"] == "bad_request" and "longer than" in reply["error"][
            "message"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # half a message, then gone
        s.connect(fuzz_daemon.socket)
        s.sendall(b'{"v":1,"cmd":')
    assert fuzz_daemon.status()["services"][0]["name"] == "sleeper"


# --- hostile config files at reload and at --check ----------------------------------------


def test_pathological_config_keeps_the_daemon_and_its_services(tmp_path: Path) -> None:
    """SIGHUP or `llmctl reload` with a 600-deep config, a FIFO, /dev/zero or a huge file:
    the running config and the services stay; `--check` says why in a line or two."""
    doc = base_config(tmp_path, [fake_service("alpha", free_port())])
    with running(tmp_path, doc) as d:
        d.wait_state("alpha", "ready")
        pid = d.service("alpha")["pid"]
        good = d.config.read_bytes()

        def make_deep() -> None:
            d.config.write_text("a = " + "[" * 600 + "]" * 600 + "\n")

        def make_fifo() -> None:
            d.config.unlink()
            os.mkfifo(d.config)

        def make_zero() -> None:
            d.config.unlink()
            d.config.symlink_to("/dev/zero")

        def make_huge() -> None:
            d.config.write_bytes(good + b"#" * (2 * 1024 * 1024) + b"\n")

        cases = [(make_deep, "nested too deeply"), (make_fifo, "is a FIFO (named pipe)"),
                 (make_zero, "is a character device"), (make_huge, "larger than 1 MB")]
        for make, expected in cases:
            make()
            kept = d.logtext().count("keeping the running configuration")
            d.signal(signal.SIGHUP)
            wait_until(lambda k=kept: d.logtext().count(  # type: ignore[misc]
                "keeping the running configuration") > k, 10, what=f"SIGHUP: {expected}")
            r = d.llmctl("reload", timeout=20)
            assert r.returncode == 1 and expected in r.stderr, r.stderr
            assert len(r.stderr.splitlines()) == 1 and len(r.stderr) < 600, r.stderr
            assert d.proc is not None and d.proc.poll() is None
            svc = d.service("alpha")
            assert svc["state"] == "ready" and svc["pid"] == pid, svc
            r = subprocess.run([sys.executable, "-m", "supervisord_llm", "--config",
                                str(d.config), "--check"], capture_output=True, text=True,
                               check=False, timeout=20)
            assert r.returncode == 1 and expected in r.stderr, r.stderr
            assert not r.stdout and len(r.stderr.splitlines()) == 2, r.stderr
            assert "Traceback" not in r.stderr and len(r.stderr) < 1000
            d.config.unlink()
            d.config.write_bytes(good)
        log = d.logtext()
        assert "Traceback" not in log and "RecursionError" not in log
        r = d.llmctl("reload")
        assert r.returncode == 0, r.stderr
        assert d.service("alpha")["pid"] == pid


def test_start_with_a_pathological_config(tmp_path: Path) -> None:
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 600 + "]" * 600 + "\n")
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    for path in (deep, fifo, Path("/dev/zero")):
        r = subprocess.run([sys.executable, "-m", "supervisord_llm", "--config", str(path)],
                           capture_output=True, text=True, check=False, timeout=20)
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
        assert r.stderr.startswith("<3>llm-supervisor: config error:"), r.stderr


async def test_any_reload_failure_is_a_control_error(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading fails in an unexpected way, or applying a valid config fails as a bug would:
    either way a ControlError for llmctl, and the running configuration stays."""
    from supervisord_llm import daemon as daemon_mod
    from supervisord_llm import rollout
    from supervisord_llm.errors import ControlError
    from supervisord_llm.host import Host

    path = tmp_path / "c.toml"
    path.write_text(toml_dumps({"gpu": {"backend": "none"},
                                "service": [{"name": "a", "command": ["/bin/true"]}]}))
    dm = daemon_mod.Daemon(str(path), daemon_mod.Overrides())

    def load_fails() -> Any:
        raise ValueError("an unexpected kind of failure")

    monkeypatch.setattr(dm, "load", load_fails)
    with pytest.raises(ControlError) as info:
        await dm._load_for_reload()
    assert info.value.code == "failed"
    assert "ValueError: an unexpected kind of failure" in info.value.message
    assert "keeping the running configuration" in info.value.message
    monkeypatch.undo()

    async def apply_fails(*_args: Any) -> Any:
        raise RuntimeError("boom while applying")

    monkeypatch.setattr(rollout, "reload", apply_fails)
    host = Host(None, dm._load_for_reload)  # type: ignore[arg-type]
    runner = asyncio.get_running_loop().create_task(host.run())
    try:
        with pytest.raises(ControlError) as info:
            await host.reload()
    finally:
        runner.cancel()
    assert info.value.code == "failed" and "RuntimeError: boom while applying" in str(info.value)
    assert not host.ops  # the operation is over; another reload may run


def test_a_removed_state_dir_is_locked_again_and_a_second_daemon_kills_nothing(
        tmp_path: Path) -> None:
    doc = base_config(tmp_path, [fake_service("alpha", free_port())])
    with running(tmp_path, doc) as d:
        s = d.wait_state("alpha", "ready")
        shutil.rmtree(tmp_path / "state")
        wait_until(lambda: "created again and locked" in d.logtext(), 15,
                   what="the lock taken again")
        assert (tmp_path / "state" / "lock").exists()
        # a second daemon with the same config: refused before it touches anything
        r = subprocess.run([sys.executable, "-m", "supervisord_llm", "--config", str(d.config)],
                           capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert alive(s["pid"]) and d.service("alpha")["pid"] == s["pid"]


def test_the_descriptor_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    """Started from a shell with a soft limit of 512 (hard 4096), the daemon takes 4096 and
    warns that its gate could take more connections than that."""
    doc = base_config(tmp_path, [fake_service("alpha", free_port(), gate={
        "listen": f"127.0.0.1:{free_port()}", "max_connections": 4000})])
    with running(tmp_path, doc, nofile="512:4096") as d:
        limits = Path(f"/proc/{d.proc.pid if d.proc else 0}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        assert line.split()[3:5] == ["4096", "4096"], line
        wait_until(lambda: "soft limit raised from 512 to 4096" in d.logtext(), 5,
                   what="the raise logged")
        wait_until(lambda: "the gates may take 8256 connections but the limit is 4096"
                   in d.logtext(), 5, what="the warning about max_connections")


def test_ipv4_mapped_listen_addresses_are_bound(tmp_path: Path) -> None:
    """`[::ffff:127.0.0.1]:P`, which --check accepts, in every listen key (metrics, router,
    gate): the daemon starts and answers on each (binding that IPv6 form used to fail, exit
    2)."""
    mapped = "[::ffff:127.0.0.1]:{}"
    mport, rport, gport = free_port(), free_port(), free_port()
    doc = base_config(tmp_path, [fake_service("alpha", free_port(),
                                              gate={"listen": mapped.format(gport)})],
                      router={"listen": mapped.format(rport)})
    doc["metrics"]["listen"] = mapped.format(mport)
    with running(tmp_path, doc) as d:
        d.wait_state("alpha", "ready")
        assert http_get(f"http://127.0.0.1:{mport}/healthz")[0] == 200
        for port in (rport, gport):
            code, body = http_get(f"http://127.0.0.1:{port}/v1/models")
            assert code == 200 and '"object": "list"' in body, (port, code, body)
