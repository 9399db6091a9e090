"""scripts/install.sh under a real systemd (tests/sdlab.sh): install, start, llmctl status as
root and as a member of the control group (and refused to a stranger), stop, an upgrade over
a running supervisor, uninstall (config and state kept), and the --dry-run and --uninstall
--purge paths. The script installs into directories of the test (--prefix, --bindir, --etc,
--unit-dir, --doc-dir); the system user and group it creates are real (`llm`, `llm-admin`)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_systemd import SDLAB, STATE_DIRECTORY, Lab, _why_not, kill_marked

from helpers import FAKE, fake_service, free_port, toml_dumps, wait_until

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "scripts" / "install.sh"
MEMBER = "llmsup-test-member"
# what the lab fixture found missing, so made by this test's install (the purge may remove it)
MADE_HERE: set[str] = set()

if (reason := _why_not()) is not None:
    pytest.skip(reason, allow_module_level=True)
if shutil.which("systemd-analyze") is None:
    pytest.skip("systemd-analyze is not installed", allow_module_level=True)


# The unit runs with PrivateTmp=yes: what it runs must not be under /tmp or /var/tmp (a
# checkout there, CI's clone or a newcomer's, would hide the install from the unit).
OUTSIDE_TMP = Path("/var/lib")


def outside_tmp(tag: str) -> Path:
    base = Path(tempfile.mkdtemp(prefix=f"llm-supervisor-test-{tag}-", dir=OUTSIDE_TMP))
    base.chmod(0o755)  # the control group's member and the service user go through it
    return base


def _exists(kind: str, name: str) -> bool:
    return subprocess.run(["getent", kind, name], capture_output=True,
                          check=False).returncode == 0


@pytest.fixture
def scratch() -> Iterator[Path]:
    base = outside_tmp("scratch")
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    base = outside_tmp(f"sdlab-{uuid.uuid4().hex[:8]}")
    lab = Lab(base)
    lab.units.mkdir(parents=True)
    # the accounts install.sh makes: a run that fails before --purge must not leave them
    accounts = [(k, n) for k, n in (("passwd", "llm"), ("group", "llm-admin"), ("group", "llm"))
                if not _exists(k, n)]
    # and the directories made outside the lab: the `llm` user's home (useradd --create-home)
    # and the unit's StateDirectory= (the lab's systemd shares the host's /var/lib)
    made_dirs = [d for d in (Path("/var/lib/llm"), STATE_DIRECTORY) if not d.exists()]
    MADE_HERE.clear()
    MADE_HERE.update([*(f"{k}:{n}" for k, n in accounts), *(str(d) for d in made_dirs)])
    lab.sh("start")
    try:
        # `systemctl enable` writes its links under /etc/systemd/system: in the lab's own
        # mount namespace that is the lab's unit directory, never the host's
        pid = lab_pid(lab)
        subprocess.run(["nsenter", "-t", pid, "-m", "--", "mount", "--bind", str(lab.units),
                        "/etc/systemd/system"], check=True, capture_output=True)
        yield lab
    finally:
        lab.sh("stop", check=False)
        kill_marked(str(base))
        shutil.rmtree(base, ignore_errors=True)
        subprocess.run(["userdel", MEMBER], capture_output=True, check=False)
        for kind, name in accounts:
            if _exists(kind, name):
                subprocess.run(["userdel" if kind == "passwd" else "groupdel", name],
                               capture_output=True, check=False)
        for d in made_dirs:
            shutil.rmtree(d, ignore_errors=True)


def status_json(lab: Lab, ctl: str) -> dict[str, Any] | None:
    r = in_lab(lab, ctl, "--json", "status")
    if r.returncode != 0:
        return None
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def paths(lab: Lab) -> dict[str, Path]:
    b = lab.base
    return {"prefix": b / "opt", "bindir": b / "bin", "etc": b / "etc", "unit_dir": lab.units,
            "doc_dir": b / "doc", "log_dir": b / "log", "logrotate_dir": b / "logrotate.d"}


def install(lab: Lab, *extra: str) -> subprocess.CompletedProcess[str]:
    p = paths(lab)
    env = {**lab.env, "SYSTEMCTL": f"{SDLAB} ctl"}
    return subprocess.run(
        [str(INSTALL), "--prefix", str(p["prefix"]), "--bindir", str(p["bindir"]), "--etc",
         str(p["etc"]), "--unit-dir", str(p["unit_dir"]), "--doc-dir", str(p["doc_dir"]),
         "--log-dir", str(p["log_dir"]), "--logrotate-dir", str(p["logrotate_dir"]),
         *extra], env=env, capture_output=True, text=True, timeout=600, check=False)


def lab_pid(lab: Lab) -> str:
    """The host pid of the lab's systemd."""
    return subprocess.run(["pgrep", "-P", (lab.dir / "unshare.pid").read_text().strip()],
                          capture_output=True, text=True, check=True).stdout.split()[0]


def in_lab(lab: Lab, *argv: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    """A command in the lab's namespaces (its /run holds the control socket)."""
    cmd = ["nsenter", "-t", lab_pid(lab), "-m", "-p", "--"]
    if user is not None:
        cmd += ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}",
                "--init-groups"]
    return subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=60,
                          check=False)


def config(lab: Lab) -> dict[str, Any]:
    return {
        "supervisor": {"control_group": "llm-admin", "state_dir": str(lab.base / "state"),
                       "log_format": "journal"},
        "metrics": {"listen": ""},
        "gpu": {"backend": "none"},
        "service": [served_from_the_lab(lab, fake_service("svc0", free_port()))],
    }


def served_from_the_lab(lab: Lab, svc: dict[str, Any]) -> dict[str, Any]:
    """The fake server run by the installed venv's python from a copy in the lab: the unit's
    PrivateTmp=yes hides a checkout (and its .venv) under /tmp."""
    fake = lab.base / "fakebackend.py"
    if not fake.exists():
        shutil.copy(FAKE, fake)
    svc["command"] = [str(paths(lab)["prefix"] / "bin" / "python"), str(fake),
                      *svc["command"][2:]]
    return svc


# three pip builds (each compiles the request path with mypyc: about 40 s on a busy 2-core
# machine), two daemon starts, an upgrade and an uninstall
@pytest.mark.timeout(360)
def test_install_start_status_upgrade_uninstall(lab: Lab) -> None:
    p = paths(lab)
    dry = install(lab, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "+ ln -sfn" in dry.stdout and not p["prefix"].exists()  # nothing done
    # an operator's config is never overwritten: write it first
    p["etc"].mkdir(parents=True)
    (p["etc"] / "config.toml").write_text(toml_dumps(config(lab)))
    r = install(lab, "--start")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "configuration" in r.stdout and ": ok" in r.stdout
    assert "keeping" in r.stdout and "never overwritten" in r.stdout
    assert "request path: compiled (mypyc)" in r.stdout  # built by pip from the copy
    for b in ("llm-supervisor", "llmctl"):
        assert os.readlink(p["bindir"] / b) == str(p["prefix"] / "bin" / b)
    unit = (p["unit_dir"] / "llm-supervisor.service").read_text()
    assert f"ExecStart={p['prefix']}/bin/llm-supervisor --config {p['etc']}/config.toml" in unit
    assert f"file://{p['doc_dir']}/README.md" in unit and (p["doc_dir"] / "README.md").exists()
    assert (p["doc_dir"] / "operations.md").exists()
    # the audit log's directory and its rotation (logrotate reads the file as written)
    assert stat.S_IMODE(p["log_dir"].stat().st_mode) == 0o750
    rotate = p["logrotate_dir"] / "llm-supervisor"
    assert f"{p['log_dir']}/*.log {{" in rotate.read_text()
    if shutil.which("logrotate"):
        lr = subprocess.run(["logrotate", "--debug", "--state", str(lab.base / "lr.state"),
                             str(rotate)], capture_output=True, text=True, check=False)
        assert lr.returncode == 0 and "error" not in lr.stderr.lower(), lr.stderr
    check = subprocess.run(["systemd-analyze", "verify", str(p["unit_dir"] /
                                                             "llm-supervisor.service")],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    assert pwd.getpwnam("llm").pw_shell == "/usr/sbin/nologin"
    wait_until(lambda: lab.show().get("ActiveState") == "active", 60,
               what=f"active ({lab.show()}, {lab.console()[-1500:]})")
    # enabled: multi-user.target wants it (what a boot starts)
    assert "llm-supervisor.service" in lab.ctl("show", "-p", "Wants", "multi-user.target")
    assert (p["unit_dir"] / "multi-user.target.wants" / "llm-supervisor.service").is_symlink()
    ctl = str(p["bindir"] / "llmctl")
    wait_until(lambda: "svc0" in in_lab(lab, ctl, "status").stdout, 30)
    # a member of the control group reads and acts; a stranger cannot even connect
    subprocess.run(["useradd", "--no-create-home", "-G", "llm-admin", MEMBER],
                   capture_output=True, check=False)
    member = in_lab(lab, ctl, "status", user=MEMBER)
    assert member.returncode == 0 and "svc0" in member.stdout, member.stderr
    restart = in_lab(lab, ctl, "restart", "svc0", user=MEMBER)
    assert restart.returncode == 0, restart.stderr
    stranger = in_lab(lab, ctl, "status", user="nobody")
    assert stranger.returncode in (3, 4), (stranger.stdout, stranger.stderr)
    assert "permission" in stranger.stderr.lower()
    # an upgrade over the running one: it keeps running (the old code) until a restart,
    # which reloads no model: the new daemon adopts them (same pids)
    pid = lab.show()["MainPID"]
    models = wait_until(lambda: (st := status_json(lab, ctl)) and all(
        x["state"] == "ready" for x in st["services"]) and
        {x["name"]: x["pid"] for x in st["services"]}, 30, what="the models ready")
    again = install(lab)
    assert again.returncode == 0, again.stderr
    assert "running the previous version" in again.stdout
    assert lab.show()["MainPID"] == pid
    again = install(lab, "--restart")
    assert again.returncode == 0, again.stderr
    wait_until(lambda: lab.show().get("ActiveState") == "active"
               and lab.show()["MainPID"] != pid, 60)
    after = wait_until(lambda: (st := status_json(lab, ctl)) and all(
        x["state"] == "ready" and x["adopted"] for x in st["services"]) and st, 30,
        what="the models adopted after the upgrade")
    assert {x["name"]: x["pid"] for x in after["services"]} == models
    lab.ctl("stop", "llm-supervisor.service")
    assert lab.show()["ActiveState"] == "inactive"
    # a stop leaves nothing: no keeper unit
    assert not lab.ctl("list-units", "--all", "--no-legend", "--plain", "llm-keep-*").strip()
    # uninstall: gone, but the config and the state stay
    gone = install(lab, "--uninstall")
    assert gone.returncode == 0, gone.stderr
    assert not p["prefix"].exists() and not (p["bindir"] / "llmctl").exists()
    assert not (p["unit_dir"] / "llm-supervisor.service").exists()
    assert not (p["unit_dir"] / "multi-user.target.wants" / "llm-supervisor.service").exists()
    assert (p["etc"] / "config.toml").exists() and (lab.base / "state").exists()
    assert not (p["logrotate_dir"] / "llm-supervisor").exists() and p["log_dir"].exists()
    assert "kept:" in gone.stdout
    again = install(lab, "--uninstall")  # idempotent
    assert again.returncode == 0, again.stderr
    # --purge: the config, the state, the users and the `llm` user's home go too (only where
    # this test made them: on a box with an `llm` user of its own, they are not the test's)
    ours = {"passwd:llm", "group:llm-admin", "/var/lib/llm", str(STATE_DIRECTORY)}
    if ours <= MADE_HERE:
        subprocess.run(["userdel", MEMBER], capture_output=True, check=False)
        purged = install(lab, "--uninstall", "--purge")
        assert purged.returncode == 0, purged.stderr
        assert not (p["etc"] / "config.toml").exists() and not p["log_dir"].exists()
        assert not _exists("passwd", "llm") and not _exists("group", "llm-admin")
        assert not _exists("group", "llm")
        assert not Path("/var/lib/llm").exists() and not STATE_DIRECTORY.exists()
        assert "rm -rf /var/lib/llm\n" in purged.stdout


def test_it_never_takes_or_removes_a_directory_it_did_not_make(scratch: Path) -> None:
    tmp_path = scratch
    keep = tmp_path / "data"
    keep.mkdir()
    (keep / "precious.txt").write_text("x")
    args = ["--prefix", str(keep), "--bindir", str(tmp_path / "bin"), "--etc",
            str(tmp_path / "etc"), "--unit-dir", str(tmp_path / "units"), "--doc-dir",
            str(keep), "--log-dir", str(tmp_path / "log"), "--logrotate-dir",
            str(tmp_path / "logrotate.d")]
    r = subprocess.run([str(INSTALL), *args], capture_output=True, text=True, check=False)
    assert r.returncode == 1 and "is not a virtual environment this script made" in r.stderr
    r = subprocess.run([str(INSTALL), "--uninstall", *args], capture_output=True,
                       text=True, check=False, env={**os.environ, "SYSTEMCTL": "false"})
    assert (keep / "precious.txt").exists(), r.stdout
    assert "not made by install.sh" in r.stdout
    r = subprocess.run([str(INSTALL), "--prefix", "/tmp/a b", "--dry-run"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 1 and "a path with blanks" in r.stderr


def test_bad_options_and_no_root_are_refused() -> None:
    r = subprocess.run([str(INSTALL), "--frobnicate"], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 2 and "unknown option --frobnicate" in r.stderr
    r = subprocess.run([str(INSTALL), "--purge"], capture_output=True, text=True, check=False)
    assert r.returncode == 1 and "--purge goes with --uninstall" in r.stderr
    r = subprocess.run([str(INSTALL), "--prefix", "relative/dir", "--dry-run"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 1 and "give an absolute path" in r.stderr
    for where in ("--prefix", "--etc"):
        r = subprocess.run([str(INSTALL), where, "/tmp/llm-supervisor", "--dry-run"],
                           capture_output=True, text=True, check=False)
        assert r.returncode == 1 and "PrivateTmp=yes" in r.stderr, r.stderr
    assert sys.executable  # the suite runs as root (CI); a user's run is refused:
    r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                        str(INSTALL)], capture_output=True, text=True, check=False)
    assert r.returncode == 1 and "run it as root" in r.stderr
