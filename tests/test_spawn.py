"""The spawner with real processes: the launch marker, exits seen while escaped processes hold
the output pipe, the start-up sweep (only what is proven ours), the guardian, the record."""

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
from pathlib import Path
from typing import Any

import psutil
import pytest

from helpers import alive, async_wait_until, proc_environ, wait_until
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
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, service: str, line: str) -> None:
        self.lines.append(line)

    def pid(self, word: str) -> int:
        for line in self.lines:
            if line.startswith(word + " "):
                return int(line.split()[1])
        return 0


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
    proc = await sp.launch(LaunchSpec("svc", ("/bin/sleep", "60"), dict(PATH_ENV)))
    try:
        await async_wait_until(
            lambda: proc_environ(proc.pid).get(MARK_INSTANCE) == sp.instance_id, 5,
            what="the exec'd command's environment")
        env = proc_environ(proc.pid)
        assert env[MARK_SERVICE] == "svc" and env[MARK_LAUNCH] == proc.launch_id
        await sp.flush_state()
        doc = record(tmp_path)
        assert doc["boot_id"] == read_boot_id() and doc["instance"] == sp.instance_id
    finally:
        sp.kill_all()
        assert await asyncio.wait_for(proc.wait(), 5) == -signal.SIGKILL
        proc.release()
        await sp.close()


async def test_exit_is_seen_while_an_escaped_process_holds_the_pipe(
        tmp_path: Path, strays: list[int]) -> None:
    lines = Lines()
    sp = Spawner(tmp_path, use_guardian=False, on_output=lines)
    proc = await sp.launch(LaunchSpec("svc", (sys.executable, "-c", ESCAPING), dict(os.environ)))
    try:
        await async_wait_until(lambda: lines.pid("escaped") and lines.pid("main"), 5,
                               what="both pids")
        escaped = lines.pid("escaped")
        strays.append(escaped)  # whatever happens below, it does not outlive the test
        os.kill(proc.pid, signal.SIGKILL)
        # the old code awaited asyncio's Process.wait(), which also waits for the pipe
        assert await asyncio.wait_for(proc.wait(), 2) == -signal.SIGKILL
        assert not proc.group_alive()
        found = await proc.find_escaped()
        assert [(e.pid, e.ours) for e in found] == [(escaped, True)]
        assert "python" in found[0].cmd
        assert proc.signal_escapees(signal.SIGTERM) == 1
        await async_wait_until(lambda: not proc.escapees_alive(), 5, what="escapee gone")
        assert not alive(escaped)
        proc.release()  # closes our end of the pipe: the log forwarder ends
        assert proc.log_task is not None
        await asyncio.wait_for(proc.log_task, 2)
    finally:
        sp.kill_all()
        await sp.close()


async def test_last_output_before_an_exit_is_forwarded(tmp_path: Path) -> None:
    lines = Lines()
    sp = Spawner(tmp_path, use_guardian=False, on_output=lines)
    code = "import os; os.write(1, b'x' * 100000 + b'\\nlast words\\n'); os._exit(3)"
    proc = await sp.launch(LaunchSpec("svc", (sys.executable, "-c", code), dict(os.environ)))
    assert await asyncio.wait_for(proc.wait(), 5) == 3
    assert await proc.find_escaped() == []
    proc.release()  # what the actor does once the group is gone
    assert proc.log_task is not None
    await asyncio.wait_for(proc.log_task, 2)
    assert lines.lines[-1] == "last words"
    await sp.close()


async def test_a_pipe_holder_without_the_marker_is_found_but_never_signalled(
        tmp_path: Path, strays: list[int]) -> None:
    lines = Lines()
    sp = Spawner(tmp_path, use_guardian=False, on_output=lines)
    code = ESCAPING.replace("    while True:\n        time.sleep(3600)\n",
                            "    os.execve(sys.executable, [sys.executable, '-c', "
                            "'import time; time.sleep(60)'], {})\n")
    proc = await sp.launch(LaunchSpec("svc", (sys.executable, "-c", code), dict(os.environ)))
    try:
        await async_wait_until(lambda: lines.pid("escaped") and lines.pid("main"), 5,
                               what="both pids")
        escaped = lines.pid("escaped")
        strays.append(escaped)
        await async_wait_until(lambda: MARK_INSTANCE not in proc_environ(escaped), 5,
                               what="the escapee's exec with an empty environment")
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 2)
        found = await proc.find_escaped()
        assert [(e.pid, e.ours) for e in found] == [(escaped, False)]
        assert not found[0].signal(signal.SIGKILL)
        assert proc.signal_escapees(signal.SIGKILL) == 0
        proc.release()
        assert proc.log_task is not None
        await asyncio.wait_for(proc.log_task, 2)  # the pipe no longer keeps anything waiting
        assert alive(escaped) and found[0].alive()
        found[0].close()
    finally:
        sp.kill_all()
        await sp.close()


async def test_leftovers_of_an_earlier_run_are_stopped(tmp_path: Path) -> None:
    first = Spawner(tmp_path, use_guardian=False)
    proc = await first.launch(LaunchSpec("old", ("/bin/sleep", "60"), dict(PATH_ENV)))
    await first.flush_state()
    assert (tmp_path / "processes.json").exists()
    second = Spawner(tmp_path, use_guardian=False)
    found = await second.reap_leftovers(2.0)
    assert found == [f"old (pgid {proc.pgid})"]
    await proc.wait()
    assert not alive(proc.pid)
    assert await second.reap_leftovers(2.0) == []
    proc.release()


async def test_sweep_stops_a_marked_process_that_escaped_its_group(tmp_path: Path) -> None:
    lines = Lines()
    first = Spawner(tmp_path, use_guardian=False, on_output=lines)
    proc = await first.launch(LaunchSpec("old", (sys.executable, "-c", ESCAPING),
                                         dict(os.environ)))
    await async_wait_until(lambda: lines.pid("escaped") and lines.pid("main"), 5,
                           what="both pids")
    escaped = lines.pid("escaped")
    await first.flush_state()
    try:
        second = Spawner(tmp_path, use_guardian=False)
        found = await second.reap_leftovers(2.0)
        assert f"old (pgid {proc.pgid})" in found
        assert f"old (pid {escaped}, outside its group)" in found
        assert not alive(escaped) and not alive(proc.pid)
    finally:
        with contextlib.suppress(OSError):
            os.kill(escaped, signal.SIGKILL)
        first.kill_all()
        await proc.wait()
        proc.release()


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
    first = Spawner(tmp_path, use_guardian=False)
    proc = await first.launch(LaunchSpec("old", ("/bin/sleep", "60"), dict(PATH_ENV)))
    await first.flush_state()
    try:
        doc = record(tmp_path)
        assert doc["instance"] == first.instance_id  # marker and instance match: only the boot
        doc["boot_id"] = "00000000-0000-4000-8000-000000000000"
        (tmp_path / "processes.json").write_text(json.dumps(doc))
        with caplog.at_level(logging.WARNING, "supervisord_llm.spawn"):
            assert await Spawner(tmp_path, use_guardian=False).reap_leftovers(1.0) == []
        assert "before the last reboot" in caplog.text
        assert alive(proc.pid) and proc.returncode is None
        assert not (tmp_path / "processes.json").exists()
    finally:
        first.kill_all()
        await proc.wait()
        proc.release()


async def test_guardian_kills_marked_escapees_when_its_pipe_closes(tmp_path: Path) -> None:
    lines = Lines()
    sp = Spawner(tmp_path, use_guardian=True, on_output=lines)
    await sp.start()
    proc = await sp.launch(LaunchSpec("x", (sys.executable, "-c", ESCAPING), dict(os.environ)))
    await async_wait_until(lambda: lines.pid("escaped") and lines.pid("main"), 5,
                           what="both pids")
    escaped = lines.pid("escaped")
    try:
        assert sp._guardian_fd is not None  # what a SIGKILL of the daemon does to the pipe
        os.close(sp._guardian_fd)
        sp._guardian_fd = None
        await async_wait_until(lambda: not alive(proc.pid) and not alive(escaped), 3,
                               what="guardian kill")
    finally:
        with contextlib.suppress(OSError):
            os.kill(escaped, signal.SIGKILL)
        await proc.wait()
        proc.release()
        await sp.close()


async def test_removed_state_directory_is_created_again(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    sp = Spawner(state, use_guardian=False)
    one = await sp.launch(LaunchSpec("one", ("/bin/sleep", "60"), dict(PATH_ENV)))
    await sp.flush_state()
    shutil.rmtree(state)
    two = await sp.launch(LaunchSpec("two", ("/bin/sleep", "60"), dict(PATH_ENV)))
    try:
        await sp.flush_state()
        assert stat.S_IMODE(state.stat().st_mode) == 0o750 & ~_umask()
        assert {p["pgid"] for p in record(state)["processes"]} == {one.pgid, two.pgid}
    finally:
        sp.kill_all()
        for p in (one, two):
            await p.wait()
            p.release()
        await sp.close()
    assert record(state)["processes"] == []  # the last record is written at close


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

    def writers() -> int:  # asyncio.to_thread's workers (the child watcher has its own)
        return sum(t.name.startswith("asyncio_") for t in threading.enumerate())

    writers_before = writers()
    procs = []
    t0 = time.monotonic()
    try:
        for i in range(5):
            procs.append(await sp.launch(LaunchSpec(f"s{i}", ("/bin/sleep", "60"),
                                                    dict(PATH_ENV))))
        await asyncio.sleep(0.01)
        assert time.monotonic() - t0 < 1.5, "the loop waited for the state file"
        assert writers() <= writers_before + 1  # one writer thread at most
        release.set()
        await sp.flush_state()
        thread.join(5)
        assert len(first_write) == 1 and len(json.loads(first_write[0])["processes"]) == 1
        assert stat.S_ISREG((tmp_path / "processes.json").stat().st_mode)
        assert [p["service"] for p in record(tmp_path)["processes"]] == \
            [f"s{i}" for i in range(5)]
    finally:
        release.set()
        sp.kill_all()
        for p in procs:
            await p.wait()
            p.release()
        await sp.close()
    wait_until(lambda: record(tmp_path)["processes"] == [], 2, what="the final record")


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
