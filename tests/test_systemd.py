"""The unit file under a real systemd (PID 1 of private namespaces, tests/sdlab.sh):
Type=notify activation, the watchdog restarting a daemon whose loop is blocked, and
`systemctl stop` leaving no service process behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    ROOT,
    Streams,
    alive,
    fake_service,
    free_port,
    post,
    toml_dumps,
    wait_until,
)
from supervisord_llm import ctl

pytestmark = pytest.mark.e2e

SDLAB = Path(__file__).resolve().parent / "sdlab.sh"
UNIT = ROOT / "units" / "llm-supervisor.service"
# the unit's StateDirectory=: the lab's systemd makes it in the host's /var/lib (the lab has a
# /run of its own, not a /var/lib): a lab removes it afterwards if it was not there before
STATE_DIRECTORY = Path("/var/lib/llm-supervisor")


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (systemd as PID 1 in new namespaces)"
    for tool in ("unshare", "nsenter", "script"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is missing"
    if not Path("/lib/systemd/systemd").exists():
        return "the systemd package is not installed"
    return None


if (reason := _why_not()) is not None:
    pytest.skip(reason, allow_module_level=True)


class Lab:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.dir = base / "lab"
        self.units = self.dir / "units"
        self.env = {**os.environ, "SDLAB_DIR": str(self.dir), "SDLAB_UNITS": str(self.units),
                    "SDLAB_NET": "0"}

    def sh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(SDLAB), *args], env=self.env, capture_output=True, text=True,
                              check=check, timeout=60)

    def ctl(self, *args: str, check: bool = True) -> str:
        return self.sh("ctl", *args, check=check).stdout

    def show(self) -> dict[str, str]:
        out = self.ctl("show", "-p", "ActiveState,SubState,NRestarts,MainPID,StatusText,Result",
                       "llm-supervisor.service")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def console(self) -> str:
        path = self.dir / "console.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    # Not under /tmp: the unit's PrivateTmp=yes would hide the config from the daemon.
    base = ROOT / "build" / f"sdlab-{uuid.uuid4().hex[:8]}"
    base.mkdir(parents=True)
    lab = Lab(base)
    lab.units.mkdir(parents=True)
    made = [d for d in (STATE_DIRECTORY,) if not d.exists()]
    lab.sh("start")
    try:
        yield lab
    finally:
        lab.sh("stop", check=False)
        kill_marked(str(base))
        shutil.rmtree(base, ignore_errors=True)
        for d in made:
            shutil.rmtree(d, ignore_errors=True)


def marked(marker: str) -> list[int]:
    """Host pids of processes whose command line mentions `marker` (the lab's directory)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            ours = marker.encode() in cmd and b"/lab/" not in cmd  # not sdlab itself
            if ours and state != "Z" and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
    return pids


def describe(lab: Lab) -> str:
    out = []
    for pid in marked(str(lab.base)):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        out.append(f"{pid}: {cmd[:150]}")
    return "; ".join(out) + " | console: " + lab.console()[-1500:]


def kill_marked(marker: str) -> None:
    for pid in marked(marker):
        with contextlib.suppress(OSError):
            os.kill(pid, 9)


def install(lab: Lab, services: int = 2, grace_s: float = 30,
            service: list[dict[str, Any]] | None = None,
            **supervisor: Any) -> dict[str, Any]:
    tmp = lab.base
    doc: dict[str, Any] = {
        "supervisor": {"control_socket": str(tmp / "ctl.sock"), "state_dir": str(tmp / "state"),
                       "log_format": "journal", "adopt_grace_s": grace_s, **supervisor},
        "metrics": {"listen": ""},
        "gpu": {"backend": "none"},
        "service": service or [
            fake_service(f"svc{i}", free_port(), "--grandchild", "--ignore-term",
                         "--pidfile", str(tmp / f"svc{i}.pid"), stop={"timeout_s": 1})
            for i in range(services)],
    }
    (tmp / "config.toml").write_text(toml_dumps(doc))
    unit = UNIT.read_text().replace(
        "ExecStart=/usr/local/bin/llm-supervisor --config /etc/llm-supervisor/config.toml",
        f"ExecStart={sys.executable} -m supervisord_llm --config {tmp / 'config.toml'}")
    assert f"ExecStart={sys.executable}" in unit
    (lab.units / "llm-supervisor.service").write_text(unit)
    dropin = lab.units / "llm-supervisor.service.d"
    dropin.mkdir(exist_ok=True)
    # A checkout under /tmp (as a CI clone may be) would be hidden by the unit's
    # PrivateTmp=yes: bind it into the service's namespace, hardening left as it is.
    bind = f"BindPaths={ROOT}\n" if ROOT.is_relative_to("/tmp") or \
        ROOT.is_relative_to("/var/tmp") else ""
    (dropin / "test.conf").write_text(
        "[Service]\nWatchdogSec=2s\nRestartSec=200ms\n"
        f"Environment=LLM_SUPERVISOR_TEST_HOOKS=1 PYTHONPATH={ROOT}\n{bind}")
    lab.ctl("daemon-reload")
    return doc


def socket_status(doc: dict[str, Any]) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = ctl.call(doc["supervisor"]["control_socket"], "status", {}, 5)
    except ctl.CtlError:
        return None
    return data


def test_unit_active_only_after_ready(lab: Lab) -> None:
    doc = install(lab)
    lab.ctl("start", "--no-block", "llm-supervisor.service")
    seen: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = lab.show()["ActiveState"]
        if not seen or seen[-1] != state:
            seen.append(state)
        if state == "active":
            break
        time.sleep(0.01)
    assert seen[-1] == "active", (seen, lab.console()[-3000:])
    assert "activating" in seen
    # active means READY=1 was sent: the socket answers and every service has been launched
    data = socket_status(doc)
    assert data is not None
    assert all(s["pid"] for s in data["services"])
    wait_until(lambda: "services ready" in lab.show()["StatusText"], 10, what="STATUS=")
    lab.ctl("stop", "llm-supervisor.service")


def test_blocked_loop_gets_the_daemon_restarted_by_the_watchdog(lab: Lab) -> None:
    doc = install(lab)
    lab.ctl("start", "llm-supervisor.service")
    first = lab.show()
    assert first["ActiveState"] == "active"
    before = wait_until(lambda: (d := socket_status(doc)) and all(
        s["state"] == "ready" for s in d["services"]) and d, 20, what="services ready")
    old_pids = {s["pid"] for s in before["services"]}

    def block() -> None:
        with contextlib.suppress(ctl.CtlError):  # the daemon is killed before it answers
            ctl.call(doc["supervisor"]["control_socket"], "status",
                     {"debug_block_loop_s": 8}, 12)

    threading.Thread(target=block, daemon=True).start()
    wait_until(lambda: int(lab.show()["NRestarts"]) >= int(first["NRestarts"]) + 1, 15,
               what=f"watchdog restart ({lab.console()[-2000:]})")
    assert "watchdog" in lab.console().lower()
    after = wait_until(lambda: (d := socket_status(doc)) and all(
        s["state"] == "ready" for s in d["services"]) and d, 20, what="services back")
    assert after["supervisor"]["pid"] != before["supervisor"]["pid"]
    # the models outlived the killed daemon (their keepers are units of their own): adopted
    assert old_pids == {s["pid"] for s in after["services"]}
    assert all(s["adopted"] for s in after["services"])
    lab.ctl("stop", "llm-supervisor.service")
    wait_until(lambda: not keep_units(lab), 10, what="no keeper unit left")


def test_systemctl_stop_leaves_no_service_process(lab: Lab) -> None:
    doc = install(lab)
    lab.ctl("start", "llm-supervisor.service")
    wait_until(lambda: (d := socket_status(doc)) and all(
        s["state"] == "ready" for s in d["services"]), 20, what="services ready")
    for i in range(2):
        wait_until((lab.base / f"svc{i}.pid").exists, 5, what="pidfile")
    procs = marked(str(lab.base))
    assert len(procs) >= 7  # daemon, two keepers, two services, two grandchildren
    in_unit = unit_procs(lab)
    # the daemon and its guardian; the models are not in its cgroup: a unit each
    in_cmds = [Path(f"/proc/{p}/cmdline").read_bytes() for p in in_unit
               if Path(f"/proc/{p}").exists()]
    assert not [c for c in in_cmds if b"fakebackend" in c or b"_keeper" in c], in_cmds
    assert any(b"_guardian" in c for c in in_cmds), in_cmds
    assert len(keep_units(lab)) == 2
    # OOMScoreAdjust=-500 protects the supervisor (where this sandbox lets systemd set it);
    # its services reset theirs to 0
    adj = {pid: Path(f"/proc/{pid}/oom_score_adj").read_text().strip() for pid in procs}
    cmds = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in procs}
    daemon = [p for p in procs if b"-m\0supervisord_llm" in cmds[p]]
    assert len(daemon) == 1
    if adj[daemon[0]] == "-500":
        assert all(adj[p] == "0" for p in procs if b"fakebackend" in cmds[p]), adj
    lab.ctl("stop", "llm-supervisor.service")
    assert lab.show()["ActiveState"] in ("inactive", "failed")
    # when `systemctl stop` returns, nothing is left: no model, no keeper, no keeper unit
    assert not [p for p in procs if alive(p)], describe(lab)
    assert not keep_units(lab)
    wait_until(lambda: not marked(str(lab.base)) and not unit_procs(lab), 5,
               what=f"no process left: {describe(lab)}")


def keep_units(lab: Lab) -> list[str]:
    out = lab.ctl("list-units", "--all", "--no-legend", "--plain", "llm-keep-*")
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def test_the_models_outlive_a_restart_and_a_kill_of_the_daemon(lab: Lab) -> None:
    """`systemctl restart` and kill -9 of the daemon (Restart=on-failure): the models keep
    their pids (their keepers are units of their own, their leases in the daemon's fd
    store), the next daemon adopts them; `systemctl stop` then leaves nothing."""
    doc = install(lab)
    lab.ctl("start", "llm-supervisor.service")
    before = wait_until(lambda: (d := socket_status(doc)) and all(
        s["state"] == "ready" for s in d["services"]) and d, 20, what="services ready")
    pids = {s["pid"] for s in before["services"]}
    assert lab.ctl("show", "-p", "NFileDescriptorStore", "--value",
                   "llm-supervisor.service").strip() == "2"
    lab.ctl("restart", "llm-supervisor.service")
    after = wait_until(lambda: (d := socket_status(doc)) and d["supervisor"]["pid"] !=
                       before["supervisor"]["pid"] and all(
                           s["state"] == "ready" and s["adopted"] for s in d["services"])
                       and d, 20, what=f"adopted after the restart ({describe(lab)})")
    assert {s["pid"] for s in after["services"]} == pids
    main = int(lab.show()["MainPID"])
    inner_kill(lab, main)
    again = wait_until(lambda: (d := socket_status(doc)) and d["supervisor"]["pid"] !=
                       after["supervisor"]["pid"] and all(
                           s["state"] == "ready" and s["adopted"] for s in d["services"])
                       and d, 20, what=f"adopted after a kill ({describe(lab)})")
    assert {s["pid"] for s in again["services"]} == pids
    assert lab.ctl("show", "-p", "NFileDescriptorStore", "--value",
                   "llm-supervisor.service").strip() == "2"
    lab.ctl("stop", "llm-supervisor.service")
    assert not keep_units(lab)
    wait_until(lambda: not marked(str(lab.base)), 5, what=f"nothing left: {describe(lab)}")


def test_a_broken_config_at_the_restart_stops_the_models_after_the_grace(lab: Lab) -> None:
    """The upgrade broke the config: the new daemon exits 1, the unit fails, systemd closes
    its fd store, every lease ends; the models stop after adopt_grace_s."""
    doc = install(lab, grace_s=2)
    lab.ctl("start", "llm-supervisor.service")
    wait_until(lambda: (d := socket_status(doc)) and all(
        s["state"] == "ready" for s in d["services"]), 20, what="services ready")
    (lab.base / "config.toml").write_text("[supervisor\n")
    lab.ctl("restart", "llm-supervisor.service", check=False)
    wait_until(lambda: lab.show()["ActiveState"] == "failed", 10, what="the unit failed")
    t0 = time.monotonic()
    wait_until(lambda: not marked(str(lab.base)) and not keep_units(lab), 15,
               what=f"the models gone ({describe(lab)})")
    assert time.monotonic() - t0 < 2 + 1 + 8
    lab.ctl("reset-failed", "llm-supervisor.service", check=False)


def inner_kill(lab: Lab, pid_in_lab: int) -> None:
    """kill -9 of a process by its pid in the lab's pid namespace."""
    unshare = int((lab.dir / "unshare.pid").read_text())
    inner = int(Path(f"/proc/{unshare}/task/{unshare}/children").read_text().split()[0])
    subprocess.run(["nsenter", "-t", str(inner), "-m", "-p", "--", "kill", "-9",
                    str(pid_in_lab)], check=True, capture_output=True)


def unit_procs(lab: Lab) -> list[int]:
    """Host pids in the unit's cgroup (inside the lab's delegated cgroup tree)."""
    cg2 = next(line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
               if line.split(" - ")[1].startswith("cgroup2 "))
    path = Path(cg2) / f"sdlab_{lab.dir.name}" / "system.slice" / "llm-supervisor.service"
    try:
        return [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def test_the_start_limit_hit_stops_the_models_after_the_grace(lab: Lab) -> None:
    """A daemon that keeps dying: systemd gives up (start-limit-hit), closes the unit's fd
    store, and with it every lease: the models go after adopt_grace_s."""
    doc = install(lab, grace_s=2)
    lab.ctl("start", "llm-supervisor.service")
    wait_until(lambda: (d := socket_status(doc)) and all(
        s["state"] == "ready" for s in d["services"]), 20, what="services ready")
    for _ in range(12):  # more than StartLimitBurst (5 in 10 s by default)
        show = lab.show()
        if show["ActiveState"] == "failed" and int(show["NRestarts"]) >= 5:
            break
        main = int(show["MainPID"])
        if main:
            with contextlib.suppress(subprocess.CalledProcessError):
                inner_kill(lab, main)
        time.sleep(0.4)
    # (systemd 252 leaves Result at the last failure's, `signal`): failed, and no more
    # restarts coming
    wait_until(lambda: (sh := lab.show())["ActiveState"] == "failed"
               and int(sh["NRestarts"]) >= 5, 15, what=f"start-limit-hit ({lab.show()})")
    time.sleep(1.0)
    assert lab.show()["ActiveState"] == "failed" and lab.show()["MainPID"] == "0"
    wait_until(lambda: not marked(str(lab.base)) and not keep_units(lab), 15,
               what=f"the models gone ({describe(lab)})")
    lab.ctl("reset-failed", "llm-supervisor.service", check=False)


def front_units(lab: Lab) -> list[str]:
    out = lab.ctl("list-units", "--all", "--no-legend", "--plain", "llm-front-*")
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def gated_service(tmp: Path, *knobs: str, **gate: Any) -> tuple[dict[str, Any], int]:
    port = free_port()
    svc = fake_service("svc0", free_port(), *knobs, stop={"timeout_s": 1},
                       gate={"listen": f"127.0.0.1:{port}", "max_concurrency": 64, **gate})
    return svc, port


def test_streams_outlive_a_restart_of_the_daemon(lab: Lab) -> None:
    """`systemctl restart llm-supervisor` under 16 streams through the gate: none is cut (the
    front is a unit of its own, its lease in the daemon's fd store); the next daemon
    re-attaches to the same front; `systemctl stop` then leaves no front unit."""
    svc, port = gated_service(lab.base)
    doc = install(lab, service=[svc])
    lab.ctl("start", "llm-supervisor.service")
    before = wait_until(lambda: (d := socket_status(doc)) and d["services"][0]["state"] ==
                        "ready" and d, 20, what=f"ready ({describe(lab)})")
    front = before["front"]
    assert front["pid"] and len(front_units(lab)) == 1, (front, front_units(lab))
    streams = Streams(port, 16, 60, 0.05)
    wait_until(lambda: (d := socket_status(doc)) and d["services"][0]["inflight"] == 16, 10,
               what="16 in flight")
    lab.ctl("restart", "llm-supervisor.service")
    after = wait_until(lambda: (d := socket_status(doc)) and d["supervisor"]["pid"] !=
                       before["supervisor"]["pid"] and d["services"][0]["state"] == "ready"
                       and d, 20, what=f"back after the restart ({describe(lab)})")
    assert after["front"]["pid"] == front["pid"] and after["front"]["adopted"], after["front"]
    streams.join(30)
    assert (streams.done, streams.cut) == (16, 0)
    assert post(port, {"max_tokens": 1}, 10).startswith(b"HTTP/1.1 200")
    lab.ctl("stop", "llm-supervisor.service")
    wait_until(lambda: not front_units(lab), 10, what="no front unit left")
    wait_until(lambda: not marked(str(lab.base)), 5, what=f"nothing left: {describe(lab)}")
