"""docs/power.md's recipe beside NUT's own upsmon, run for real: Debian's upsmon and upssched
(nut-client) with the files in docs/nut/ (the doc shows those very files), a real upsd +
dummy-ups, and the daemon with `source = "none"` (upsmon's events are all it hears). The UPS
goes OB, then OB LB: upssched's ONBATT and LOWBATT reach the daemon through llmctl, the
primary upsmon raises FSD and runs SHUTDOWNCMD, which waits for `powered_down` before it would
power the machine off. Here the power-off is a line in a file: the test checks that the
substitution is made before anything runs."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from nutserver import SETPRIV, NutServer, require_nut

from helpers import ROOT, base_config, fake_service, free_port, running, wait_until

RECIPE = ROOT / "docs" / "nut"
UPSMON = Path("/lib/nut/upsmon")  # /sbin/upsmon is Debian's wrapper that reads nut.conf
UPSSCHED = Path("/usr/sbin/upssched")
FILES = ("nut.conf", "upsd.users", "upsmon.conf", "upssched.conf", "llm-upssched-cmd",
         "llm-before-poweroff")


def test_the_doc_shows_the_recipe_files_as_they_are() -> None:
    doc = (ROOT / "docs" / "power.md").read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", doc, re.S)
    for name in FILES:
        text = (RECIPE / name).read_text()
        assert text in blocks, f"docs/power.md does not show docs/nut/{name} as it is"
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert "/usr/local/bin" in install  # where llmctl is linked: the recipe calls it there
    for name in ("llm-upssched-cmd", "llm-before-poweroff"):
        assert os.access(RECIPE / name, os.X_OK)


@pytest.fixture
def ups(tmp_path: Path) -> Iterator[NutServer]:
    require_nut()
    if not (UPSMON.exists() and UPSSCHED.exists()):
        if os.environ.get("LLM_SUPERVISOR_REQUIRE_E2E"):
            pytest.fail("upsmon/upssched (Debian's nut-client) are not installed")
        pytest.skip("upsmon/upssched (Debian's nut-client) are not installed")
    users = {"upsmon-local": "s3cret"}
    with NutServer(tmp_path / "nut", users=users, primaries=("upsmon-local",),
                   runtime=1200) as server:
        yield server


def recipe(tmp: Path, ups: NutServer, socket: str) -> dict[str, Any]:
    """The doc's files with this test's places put in: the UPS, the password, llmctl (with the
    daemon's socket), the scripts, upssched's pipe and lock, and the power-off (a line in a
    file). Checked: nothing that would power off or touch /etc, /run/nut is left."""
    etc, run = tmp / "upsmon-etc", tmp / "upsmon-run"
    etc.mkdir()
    run.mkdir()
    llmctl = tmp / "llmctl"
    llmctl.write_text(f"#!/bin/sh\nexec {sys.executable} -m supervisord_llm.ctl "
                      f"--socket {socket} \"$@\"\n")
    llmctl.chmod(0o755)
    poweroff = tmp / "poweroff"
    subs = {
        "/usr/local/bin/llmctl": str(llmctl),
        "/usr/local/sbin/": f"{etc}/",
        "/run/nut/": f"{run}/",
        "/sbin/shutdown -h +0": f"sh -c 'echo poweroff >> {poweroff}'",
        "ups@localhost": ups.ups,
        "<password>": "s3cret",
    }
    for name in FILES:
        text = (RECIPE / name).read_text()
        for old, new in subs.items():
            text = text.replace(old, new)
        assert "shutdown -h" not in text.replace(f"sh -c 'echo poweroff >> {poweroff}'", "")
        assert "/run/nut" not in text and "/usr/local/" not in text
        (etc / name).write_text(text)
        (etc / name).chmod((RECIPE / name).stat().st_mode & 0o777)
    # what upsmon.conf has besides the recipe's additions (Debian's file has these lines):
    # faster polls for the test, and the power-down flag off /etc
    with open(etc / "upsmon.conf", "a") as f:
        f.write(f"POLLFREQ 1\nPOLLFREQALERT 1\nHOSTSYNC 2\nPOWERDOWNFLAG {run}/killpower\n"
                )
    (etc / "upsmon.conf").chmod(0o600)
    return {"etc": etc, "run": run, "poweroff": poweroff}


def test_upsmon_and_upssched_power_the_daemon_down_through_the_recipe(
        tmp_path: Path, ups: NutServer) -> None:
    svc = fake_service("chat", free_port(), gpus=[0],
                       gate={"listen": f"127.0.0.1:{free_port()}", "drain_timeout_s": 5})
    doc = base_config(tmp_path, [svc], gpus=1, power={
        "source": "none", "on_battery_grace_s": 600, "drain_timeout_s": 2,
        "stop_timeout_s": 5})
    with running(tmp_path, doc) as d:
        d.wait_state("chat", "ready")
        places = recipe(tmp_path, ups, doc["supervisor"]["control_socket"])
        env = {**os.environ, "NUT_CONFPATH": str(places["etc"]),
               "NUT_STATEPATH": str(places["run"]), "NUT_ALTPIDPATH": str(places["run"])}
        argv = [str(UPSMON), "-F", "-p"]
        if SETPRIV is not None:
            argv = [SETPRIV, "--pdeathsig", "KILL", "--", *argv]
        log = open(tmp_path / "upsmon.log", "wb")  # noqa: SIM115 - closed below
        upsmon = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            def said(what: str) -> bool:
                return what in (tmp_path / "upsmon.log").read_text(errors="replace")

            wait_until(lambda: ups.query("ups.status") == "OL" and said("UPS: " + ups.ups),
                       15, what="upsmon watching")
            ups.set(status="OB DISCHRG")
            wait_until(lambda: d.status()["supervisor"]["mode"] == "on_battery", 20,
                       what=f"ONBATT through upssched ({d.logtext()[-1500:]})")
            assert d.service("chat")["state"] == "ready"  # the grace is long: nothing stops
            ups.set(status="OB LB", charge=8, runtime=90)
            wait_until(lambda: d.status()["supervisor"]["mode"] == "powered_down", 30,
                       what="powered down")
            st = d.service("chat")
            assert st["state"] == "stopped" and st["holds"] == ["powered_down"]
            # the primary upsmon raised FSD and ran SHUTDOWNCMD, which waited for us
            wait_until(places["poweroff"].exists, 30, what="SHUTDOWNCMD done")
            assert ups.query("ups.status").startswith("FSD")
            text = d.logtext()
            assert "power event from llmctl: on-battery" in text
            assert "power event from llmctl: low-battery" in text or \
                "power event from llmctl: fsd" in text
            upsmon.wait(30)  # upsmon exits after SHUTDOWNCMD
            # the machine stayed up: nothing tells a source = "none" daemon the power is back
            # but the operator (docs/power.md)
            ups.set(status="OL CHRG", charge=60, runtime=1200)
            assert d.llmctl("power-event", "on-line").returncode == 0
            d.wait_state("chat", "ready", 15)
        finally:
            if upsmon.poll() is None:
                os.killpg(upsmon.pid, signal.SIGKILL)
                upsmon.wait(5)
            log.close()
            for proc in psutil.process_iter():  # upssched's own daemon, if one was started
                with contextlib.suppress(psutil.Error):
                    if proc.environ().get("NUT_CONFPATH") == str(places["etc"]):
                        proc.kill()
