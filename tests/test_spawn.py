"""The spawner with real processes: launches through keepers (the launch marker, output,
escaped processes, a relaunch in the same keeper, adoption by a second spawner), the start-up
sweep of what an older version left (only what is proven ours), the guardian, the record."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest

from helpers import alive, async_wait_until, proc_environ
from supervisord_llm.spawn import (
    MARK_INSTANCE,
    MARK_LAUNCH,
    MARK_SERVICE,
    LaunchSpec,
    Spawner,
    read_boot_id,
)

PATH_ENV = {"PATH": "/bin:/usr/bin"}

# A service whose child leaves the process group (setsid) keeping the inherited stdout, then
# writes its pid on stdout; the main process sleeps.
ESCAPING = """
import os, sys, time
pid = os.fork()
if pid == 0:
    os.setsid()
    os.write(1, f"escaped {os.getpid()}\\n".encode())
    while True:
        time.sleep(3600)
os.write(1, f"main {os.getpid()}\\n".encode())
time.sleep(3600)
"""


@pytest.fixture
def strays() -> Iterator[list[int]]:
    """Pids a test started outside any supervisor: killed at the end whatever happens."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def popens() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


class Lines:
    """What the keepers write (the models' output): a file given as their stderr."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    @property
    def lines(self) -> list[str]:
        return [line.split("] ", 1)[1] if line.startswith("[") else line
                for line in self.path.read_text(errors="replace").splitlines()]

    def pid(self, word: str) -> int:
        for line in self.lines:
            if line.startswith(word + " "):
                return int(line.split()[1])
        return 0

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def lines(tmp_path: Path) -> Iterator[Lines]:
    out = Lines(tmp_path / "models.log")
    yield out
    out.close()


def old_launch(tmp_path: Path, service: str, argv: list[str], instance: str = "older-run",
               ) -> subprocess.Popen[bytes]:
    """A service as an older version launched it (no keeper: in a session of its own, with
    the marker), on record in processes.json."""
    env = {**os.environ, MARK_INSTANCE: instance, MARK_SERVICE: service, MARK_LAUNCH: "1"}
    proc = subprocess.Popen(argv, start_new_session=True, env=env, stdout=subprocess.PIPE)
    (tmp_path / "processes.json").write_text(json.dumps({
        "daemon_pid": 1, "boot_id": read_boot_id(), "instance": instance,
        "processes": [{"service": service, "pid": proc.pid, "pgid": proc.pid,
                       "create_time": psutil.Process(proc.pid).create_time(), "launch": "1"}]}))
    return proc


def record(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((path / "processes.json").read_text())
    return doc


def unrelated_group(leader_exits: bool, popens: list[subprocess.Popen[bytes]]
                    ) -> tuple[int, int]:
    """A process group that has nothing to do with any supervisor: (pgid, a live member)."""
    code = ("import os, sys, time\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    time.sleep(60)\n"
            "    os._exit(0)\n"
            "print(pid, flush=True)\n"
            + ("os._exit(0)\n" if leader_exits else "time.sleep(60)\n"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_SUPERVISOR_")}
    leader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              start_new_session=True, env=env)
    popens.append(leader)
    assert leader.stdout is not None
    member = int(leader.stdout.readline())
    leader.stdout.close()
    if leader_exits:
        leader.wait()
        return leader.pid, member
    return leader.pid, leader.pid


async def test_launch_carries_the_marker_and_the_record_proves_it(tmp_path: Path) -> None:
    sp = Spawner(tmp_path, use_guardian=False)
    await sp.start()
    proc = await sp.launch(LaunchSpec("svc", ("/bin/sleep", "60"), dict(PATH_ENV)))
    try:
        await async_wait_until(lambda: exec_done(proc.pid), 5, what="the exec")
        env = proc_environ(proc.pid)
        # the keeper's id, not the daemon's: the daemon's guardian and sweep leave it alone
        assert env[MARK_INSTANCE] == proc.keeper_id != sp.instance_id
        assert env[MARK_SERVICE] == "svc" and env[MARK_LAUNCH] == proc.launch_id
        assert psutil.Process(proc.pid).ppid() == proc.keeper_pid
        assert os.getsid(proc.pid) == proc.pid  # a session and group of its own
        await sp.flush_state()
        doc = record(tmp_path)
        assert doc["boot_id"] == read_boot_id() and doc["instance"] == sp.instance_id
        launch = json.loads((tmp_path / "keep" / proc.keeper_id / "launch.json").read_text())
        assert launch["service"] == "svc" and launch["keeper_id"] == proc.keeper_id
    finally:
        sp.kill_all()
        assert await asyncio.wait_for(proc.wait(), 5) == -signal.SIGKILL
        proc.release()
        await sp.close()
    assert not (tmp_path / "keep" / proc.keeper_id).exists()  # the keeper gone with its dir


def exec_done(pid: int) -> bool:
    try:
        return "_keeper" not in " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


async def test_an_escaped_process_is_found_and_stopped(
        tmp_path: Path, strays: list[int], lines: Lines) -> None:
    sp = Spawner(tmp_path, use_guardian=False, output_fd=lines.fd)
    proc = await sp.launch(LaunchSpec("svc", (sys.executable, "-c", ESCAPING), dict(os.environ)))
    try:
        await async_wait_until(lambda: lines.pid("escaped") and lines.pid("main"), 5,
                               what="both pids")
        escaped = lines.pid("escaped")
        strays.append(escaped)  # whatever happens below, it does not outlive the test
        os.kill(proc.pid, signal.SIGKILL)
        assert await asyncio.wait_for(proc.wait(), 2) == -signal.SIGKILL
        assert not proc.group_alive()
        found = await proc.find_escaped()
        assert [(e.pid, e.ours) for e in found] == [(escaped, True)]
        assert "python" in found[0].cmd
        assert proc.signal_escapees(signal.SIGTERM) == 1
        await async_wait_until(lambda: not proc.escapees_alive(), 5, what="escapee gone")
        assert not alive(escaped)
        proc.release()
    finally:
        sp.kill_all()
        await sp.close()


async def test_last_output_before_an_exit_is_written_and_a_long_line_cut(
        tmp_path: Path, lines: Lines) -> None:
    sp = Spawner(tmp_path, use_guardian=False, output_fd=lines.fd)
    code = "import os; os.write(1, b'x' * 100000 + b'\\nlast words\\n'); os._exit(3)"
    proc = await sp.launch(LaunchSpec("svc", (sys.executable, "-c", code), dict(os.environ)))
    assert await asyncio.wait_for(proc.wait(), 5) == 3
    assert await proc.find_escaped() == []
    proc.release()  # what the actor does once the group is gone
    await sp.close()
    assert lines.lines[-2:] == ["x" * 3800 + " [line cut]", "last words"]


async def test_a_relaunch_of_the_same_launch_is_a_fork_in_its_keeper(tmp_path: Path) -> None:
    sp = Spawner(tmp_path, use_guardian=False)
    spec = LaunchSpec("svc", ("/bin/sleep", "60"), dict(PATH_ENV), gen=1, digest="d1")
    proc = await sp.launch(spec)
    try:
        keeper, first = proc.keeper_pid, proc.pid
        os.kill(first, signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 5)
        proc.release(keep=True)  # a restart follows
        again = await sp.launch(replace(spec, gen=2))
        assert again.keeper_pid == keeper and again.pid != first
        assert psutil.Process(again.pid).ppid() == keeper
        # another launch (the config changed) gets a keeper of its own; the idle one goes
        os.kill(again.pid, signal.SIGKILL)
        await asyncio.wait_for(again.wait(), 5)
        again.release(keep=True)
        other = await sp.launch(replace(spec, gen=3, digest="d2"))
        assert other.keeper_pid != keeper
        await async_wait_until(lambda: not alive(keeper), 5, what="the idle keeper gone")
    finally:
        sp.kill_all()
        await sp.close()


async def test_a_second_spawner_adopts_what_the_first_left(tmp_path: Path) -> None:
    """A daemon that hands over (or dies) leaves its keepers; the next one adopts their
    models (same pids) and gives each a new lease; its stop stops them."""
    first = Spawner(tmp_path, use_guardian=False, adopt_grace_s=20)
    proc = await first.launch(LaunchSpec("svc", ("/bin/sleep", "60"), dict(PATH_ENV), gen=4,
                                         port=1234, digest="dd"))
    pid, keeper = proc.pid, proc.keeper_pid
    first.handover = True
    await first.close()  # leases closed, keepers left
    assert alive(pid) and alive(keeper)
    second = Spawner(tmp_path, use_guardian=False)
    try:
        found = await second.adopt()
        assert len(found) == 1
        item = found[0]
        assert item.proc.pid == pid and item.proc.keeper_pid == keeper and item.gen == 4
        assert item.record.port == 1234 and item.record.digest == "dd" and item.proc.adopted
        snap = await item.proc.link.ask({"op": "hello", "proto": [1, 1]})
        assert snap["lease"] is True  # the new lease came
        assert snap["grace_s"] == 30.0  # this spawner's, not the first one's (20)
    finally:
        await second.close()
    assert not alive(pid) and not alive(keeper)


async def test_a_keeper_that_does_not_answer_is_killed_with_what_it_kept(
        tmp_path: Path) -> None:
    first = Spawner(tmp_path, use_guardian=False)
    proc = await first.launch(LaunchSpec("svc", ("/bin/sleep", "60"), dict(PATH_ENV)))
    pid, keeper = proc.pid, proc.keeper_pid
    await async_wait_until(lambda: exec_done(pid), 5, what="the exec")
    first.handover = True
    await first.close()
    os.kill(keeper, signal.SIGSTOP)  # a keeper that hangs
    second = Spawner(tmp_path, use_guardian=False)
    try:
        assert await second.adopt() == []
        await async_wait_until(lambda: not alive(keeper) and not alive(pid), 5,
                               what="the hung keeper and its model gone")
        assert not (tmp_path / "keep" / proc.keeper_id).exists()
    finally:
        with contextlib.suppress(OSError):
            os.kill(keeper, signal.SIGKILL)
        await second.close()


async def test_leftovers_of_an_older_version_are_stopped(tmp_path: Path) -> None:
    proc = old_launch(tmp_path, "old", ["/bin/sleep", "60"])
    second = Spawner(tmp_path, use_guardian=False)
    found = await second.reap_leftovers(2.0)
    assert found == [f"old (pgid {proc.pid})"]
    proc.wait(5)
    assert proc.stdout is not None
    proc.stdout.close()
    assert await second.reap_leftovers(2.0) == []


async def test_sweep_stops_a_marked_process_that_escaped_its_group(tmp_path: Path) -> None:
    proc = old_launch(tmp_path, "old", [sys.executable, "-c", ESCAPING])
    assert proc.stdout is not None
    pids = {}
    for _ in range(2):
        word, pid = proc.stdout.readline().split()
        pids[word.decode()] = int(pid)
    escaped = pids["escaped"]
    try:
        second = Spawner(tmp_path, use_guardian=False)
        found = await second.reap_leftovers(2.0)
        assert f"old (pgid {proc.pid})" in found
        assert f"old (pid {escaped}, outside its group)" in found
        proc.wait(5)
        await async_wait_until(lambda: not alive(escaped), 5, what="the escapee")
    finally:
        with contextlib.suppress(OSError):
            os.kill(escaped, signal.SIGKILL)
        proc.kill()
        proc.wait()
        proc.stdout.close()


async def test_sweep_never_kills_a_group_that_is_not_ours(
        tmp_path: Path, strays: list[int], popens: list[subprocess.Popen[bytes]],
        caplog: pytest.LogCaptureFixture) -> None:
    """The recorded groups now hold processes without our marker (pids and group ids reused
    after a crash): one whose leader is gone, one whose leader even has the recorded start
    time, and one carrying the marker of another instance. All are left alone."""
    gone_pgid, orphan = unrelated_group(True, popens)
    live_pgid, leader = unrelated_group(False, popens)
    live_member = [c.pid for c in psutil.Process(leader).children()]
    strays += [orphan, *live_member]
    env = {**PATH_ENV, MARK_INSTANCE: "another-instance", MARK_SERVICE: "old"}
    other = subprocess.Popen(["/bin/sleep", "60"], start_new_session=True, env=env)
    popens.append(other)
    (tmp_path / "processes.json").write_text(json.dumps({
        "daemon_pid": 1, "boot_id": read_boot_id(), "instance": "this-was-us",
        "processes": [
            {"service": "a", "pid": gone_pgid, "pgid": gone_pgid, "create_time": 1.0},
            {"service": "b", "pid": leader, "pgid": live_pgid,
             "create_time": psutil.Process(leader).create_time()},
            {"service": "old", "pid": other.pid, "pgid": other.pid,
             "create_time": psutil.Process(other.pid).create_time()},
        ]}))
    with caplog.at_level(logging.WARNING, "supervisord_llm.spawn"):
        found = await Spawner(tmp_path, use_guardian=False).reap_leftovers(1.0)
    assert found == []
    assert alive(orphan) and alive(leader) and alive(other.pid)
    assert all(alive(p) for p in live_member)
    assert f"process {orphan} " in caplog.text and "not proven ours" in caplog.text
    assert not (tmp_path / "processes.json").exists()


async def test_sweep_after_a_reboot_leaves_everything_alone(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    proc = old_launch(tmp_path, "old", ["/bin/sleep", "60"])
    try:
        doc = record(tmp_path)
        doc["boot_id"] = "00000000-0000-4000-8000-000000000000"
        (tmp_path / "processes.json").write_text(json.dumps(doc))
        with caplog.at_level(logging.WARNING, "supervisord_llm.spawn"):
            assert await Spawner(tmp_path, use_guardian=False).reap_leftovers(1.0) == []
        assert "before the last reboot" in caplog.text
        assert alive(proc.pid) and proc.poll() is None
        assert not (tmp_path / "processes.json").exists()
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


async def test_guardian_kills_marked_processes_when_its_pipe_closes(tmp_path: Path) -> None:
    """The daemon's own helpers carry its run's marker: when the daemon goes, the guardian
    kills them, tracked or not (an escaped one)."""
    sp = Spawner(tmp_path, use_guardian=True)
    await sp.start()
    env = {**PATH_ENV, MARK_INSTANCE: sp.instance_id, MARK_SERVICE: "checkpoint:x"}
    helper = subprocess.Popen(["/bin/sleep", "60"], start_new_session=True, env=env)
    try:
        assert sp._guardian_fd is not None  # what a SIGKILL of the daemon does to the pipe
        os.close(sp._guardian_fd)
        sp._guardian_fd = None
        await async_wait_until(lambda: helper.poll() is not None, 3, what="guardian kill")
    finally:
        helper.kill()
        helper.wait()
        await sp.close()


async def test_removed_state_directory_is_created_again(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    sp = Spawner(state, use_guardian=False)
    await sp.start()
    one = await sp.launch(LaunchSpec("one", ("/bin/sleep", "60"), dict(PATH_ENV)))
    await sp.flush_state()
    shutil.rmtree(state)
    sp.record_again()  # what the daemon's state-dir guard does
    two = await sp.launch(LaunchSpec("two", ("/bin/sleep", "60"), dict(PATH_ENV)))
    try:
        await sp.flush_state()
        assert stat.S_IMODE(state.stat().st_mode) == 0o750 & ~_umask()
        assert record(state)["instance"] == sp.instance_id
        assert (state / "keep" / two.keeper_id / "launch.json").exists()
    finally:
        sp.kill_all()
        for p in (one, two):
            await p.wait()
            p.release()
        await sp.close()
    assert record(state)["processes"] == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


async def test_the_record_is_written_off_the_loop_by_one_writer(tmp_path: Path) -> None:
    """A write that blocks (here: the temporary file is a FIFO nobody reads yet) neither stalls
    the event loop nor piles up writers; the latest record lands last."""
    os.mkfifo(tmp_path / "processes.tmp")
    release = threading.Event()
    first_write: list[bytes] = []

    def reader() -> None:  # opens the FIFO once told to, or after 3 s (a blocked loop)
        release.wait(3.0)
        with open(tmp_path / "processes.tmp", "rb") as fh:
            first_write.append(fh.read())

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    sp = Spawner(tmp_path, use_guardian=False)

    def writers() -> int:  # asyncio.to_thread's workers
        return sum(t.name.startswith("asyncio_") for t in threading.enumerate())

    writers_before = writers()
    t0 = time.monotonic()
    try:
        for _ in range(5):
            sp.record_again()
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        assert time.monotonic() - t0 < 1.5, "the loop waited for the state file"
        assert writers() <= writers_before + 1  # one writer thread at most
        release.set()
        await sp.flush_state()
        thread.join(5)
        assert len(first_write) == 1 and json.loads(first_write[0])["instance"] == \
            sp.instance_id
        assert stat.S_ISREG((tmp_path / "processes.json").stat().st_mode)
    finally:
        release.set()
        await sp.close()


async def test_a_hostile_process_record_is_refused_not_read(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    """processes.json is read like a config: a FIFO, a device, a huge or deeply nested file
    is refused at once (one line), never read into memory or waited on."""
    path = tmp_path / "processes.json"

    def huge() -> None:
        path.touch()
        os.truncate(path, 4 * 2**30)  # sparse: 4 GB that take no disk

    def deep() -> None:
        path.write_text("[" * 200_000)

    def fifo() -> None:
        os.mkfifo(path)

    def device() -> None:
        path.symlink_to("/dev/zero")

    for make in (fifo, device, huge, deep):
        name = make.__name__
        make()
        sp = Spawner(tmp_path, use_guardian=False)
        caplog.clear()
        assert await asyncio.wait_for(sp.reap_leftovers(1.0), 5) == [], name
        assert any("processes.json" in r.getMessage() for r in caplog.records), name
        assert all("\n" not in r.getMessage() for r in caplog.records)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
