"""The service actor with real processes (the fake backend) and real HTTP probes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from helpers import (
    FAKE,
    alive,
    async_wait_until,
    fake_service,
    free_port,
    proc_environ,
    proc_status,
    toml_dumps,
)
from supervisord_llm.config import parse_config
from supervisord_llm.health import HttpProber, ProbeResult
from supervisord_llm.plan import resolve_plan
from supervisord_llm.policy.backoff import FLOOR_S
from supervisord_llm.service import ServiceActor
from supervisord_llm.spawn import Spawner
from supervisord_llm.states import State

Factory = Callable[..., ServiceActor]


def exec_done(pid: int, argv0: str) -> bool:
    """The shim has exec'd the real command (its own argv also names the command)."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == argv0.encode()


@pytest.fixture
async def make(spawner: Spawner, prober: HttpProber) -> AsyncIterator[Factory]:
    actors: list[ServiceActor] = []

    def factory(svc: dict[str, Any]) -> ServiceActor:
        cfg = parse_config(toml_dumps({"gpu": {"backend": "none"}, "service": [svc]}))
        actor = ServiceActor(resolve_plan(cfg, [])[0], spawner, prober)
        actor.run()
        actors.append(actor)
        return actor

    yield factory
    for actor in actors:
        actor.kill_now()
        if actor.alive:
            with contextlib.suppress(TimeoutError):
                await actor.wait_stopped(5)
        await actor.shutdown()


async def state(actor: ServiceActor, want: State, timeout: float = 10) -> None:
    await async_wait_until(lambda: actor.state is want, timeout,
                           what=f"{actor.name} {want} (is {actor.state}, {actor.last_exit})")


async def knob(port: int, **kw: str) -> None:
    async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{port}/_ctl",
                                                   params=kw) as r:
        assert r.status == 200


async def test_start_loading_then_ready(make: Factory) -> None:
    port = free_port()
    a = make(fake_service("svc", port, "--load-s", "0.4"))
    await a.command("start")
    assert a.state is State.STARTING
    await async_wait_until(lambda: a.health.last_error == "HTTP 503 (loading)", 5,
                           what="a 503 seen as loading")
    assert a.state is State.STARTING and a.counters.health_failures == 0
    await state(a, State.READY)
    assert a.start_duration_s is not None and a.start_duration_s >= 0.4
    st = a.status()
    assert st["pid"] and st["health"]["ok"] is True and st["restarts"] == 0


async def test_services_are_probed_together_every_interval(spawner: Spawner,
                                                           prober: HttpProber) -> None:
    """Probes run on shared ticks: two services with the same interval are probed in the
    same pass of the loop, at the multiples of the interval, `interval_s` apart."""
    loop = asyncio.get_running_loop()
    seen: dict[str, list[float]] = {}

    class Recording:
        async def probe(self, url: str, timeout_s: float) -> ProbeResult:
            seen.setdefault(url, []).append(loop.time())
            return await prober.probe(url, timeout_s)

    ports = [free_port(), free_port()]
    cfg = parse_config(toml_dumps({"gpu": {"backend": "none"}, "service": [
        fake_service(f"svc{i}", port, health={"interval_s": 0.2, "timeout_s": 0.2})
        for i, port in enumerate(ports)]}))
    actors = [ServiceActor(plan, spawner, Recording()) for plan in resolve_plan(cfg, [])]
    try:
        for a in actors:
            a.run()
            await a.command("start")
        for a in actors:
            await state(a, State.READY)
        seen.clear()
        await asyncio.sleep(1.3)
        a_times, b_times = (seen[f"http://127.0.0.1:{port}/health"] for port in ports)
        assert len(a_times) >= 4 and abs(len(a_times) - len(b_times)) <= 1
        # the same pass of the loop: B's probe within microseconds of each of A's
        assert all(min(abs(ta - tb) for tb in b_times) < 0.01 for ta in a_times[:-1]), \
            (a_times, b_times)
        gaps = [t1 - t0 for t0, t1 in itertools.pairwise(a_times)]
        assert all(0.1 < g < 0.3 for g in gaps), gaps  # 0.2 s apart (a late timer aside)
        # at (or just after) a multiple of the interval on the loop's clock
        assert all(((t + 1e-3) / 0.2) % 1 < 0.5 for t in a_times), a_times
    finally:
        for a in actors:
            a.kill_now()
            with contextlib.suppress(TimeoutError):
                await a.wait_stopped(5)
            await a.shutdown()


async def test_exit_is_restarted_with_backoff(make: Factory) -> None:
    port = free_port()
    a = make(fake_service("svc", port))
    await a.command("start")
    await state(a, State.READY)
    assert a.proc is not None
    old = a.proc.pid
    os.kill(old, signal.SIGKILL)
    await async_wait_until(lambda: a.gen == 2 and a.state is State.READY, 10, what="restart")
    assert a.proc is not None and a.proc.pid != old
    assert a.last_exit == "killed by SIGKILL"
    assert a.counters.restarts == {"exit": 1} and a.restart_count == 1


async def test_health_failures_restart(make: Factory) -> None:
    port = free_port()
    a = make(fake_service("svc", port))
    await a.command("start")
    await state(a, State.READY)
    await knob(port, health_status="500")
    await async_wait_until(lambda: a.counters.restarts.get("health") == 1, 10, what="restart")
    assert a.counters.health_failures >= 2
    await state(a, State.READY)


async def test_sigstopped_backend_is_detected_and_replaced(make: Factory) -> None:
    port = free_port()
    a = make(fake_service("svc", port))
    await a.command("start")
    await state(a, State.READY)
    assert a.proc is not None
    old = a.proc.pid
    os.kill(old, signal.SIGSTOP)
    await async_wait_until(lambda: a.gen == 2 and a.state is State.READY, 10,
                           what="replacement ready")
    assert not alive(old)
    assert a.counters.restarts == {"health": 1}


async def test_hung_backend_ignoring_sigterm_is_killed_at_deadline(make: Factory) -> None:
    port = free_port()
    a = make(fake_service("svc", port, "--ignore-term", stop={"timeout_s": 0.5}))
    await a.command("start")
    await state(a, State.READY)
    assert a.proc is not None
    old = a.proc.pid
    await knob(port, health_hang="1")
    await state(a, State.STOPPING)
    t0 = time.monotonic()
    await async_wait_until(lambda: not alive(old), 5, what="SIGKILL")
    assert 0.35 <= time.monotonic() - t0 <= 2.0  # at the stop deadline, not before
    await async_wait_until(lambda: a.gen == 2 and a.state is State.READY, 10, what="replaced")


async def test_crash_loop_fails_and_reset_starts_again(make: Factory) -> None:
    port = free_port()
    a = make(fake_service("svc", port, "--exit-after", "0.05",
                          restart={"max_restarts": 3, "window_s": 60}))
    await a.command("start")
    await state(a, State.FAILED, 20)
    assert a.restart_count == 3 and a.last_exit == "exit 1"
    assert a.failed_reason is not None and "3 restarts within 60 s" in a.failed_reason
    assert a.proc is None
    await a.command("reset")
    assert a.state is State.STARTING
    await state(a, State.FAILED, 20)


async def test_startup_timeout_restarts(make: Factory) -> None:
    port = free_port()
    a = make(fake_service("svc", port, "--no-listen", health={"startup_timeout_s": 0.5},
                          restart={"max_restarts": 1}))
    await a.command("start")
    await state(a, State.FAILED, 10)
    assert a.counters.restarts == {"health": 1}


async def test_grandchild_is_stopped_with_the_group(make: Factory, tmp_path: Path) -> None:
    port = free_port()
    pidfile = tmp_path / "pids"
    a = make(fake_service("svc", port, "--grandchild", "--pidfile", str(pidfile),
                          stop={"timeout_s": 0.5}))
    await a.command("start")
    await state(a, State.READY)
    await async_wait_until(pidfile.exists, 5, what="pidfile")
    main, grandchild = map(int, pidfile.read_text().split())
    assert alive(grandchild)
    await a.command("stop")
    await state(a, State.STOPPED)
    assert not alive(main) and not alive(grandchild)


async def test_crash_leaving_grandchild_cleans_group_before_restart(
        make: Factory, tmp_path: Path) -> None:
    port = free_port()
    pidfile = tmp_path / "pids"
    a = make(fake_service("svc", port, "--grandchild", "--pidfile", str(pidfile),
                          stop={"timeout_s": 0.3}))
    await a.command("start")
    await state(a, State.READY)
    await async_wait_until(pidfile.exists, 5, what="pidfile")
    main, grandchild = map(int, pidfile.read_text().split())
    pidfile.unlink()
    os.kill(main, signal.SIGKILL)
    await async_wait_until(lambda: a.gen == 2, 10, what="relaunch")
    assert not alive(grandchild)  # gone before the replacement was launched


async def test_escaped_child_holding_the_pipe_does_not_wedge_the_service(
        make: Factory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A child that left the group (setsid) keeping stdout: the kill -9 of the main process is
    seen at once, the child (it carries the launch marker) is stopped, the service restarts."""
    port = free_port()
    pidfile = tmp_path / "pids"
    a = make(fake_service("svc", port, "--escape", "--pidfile", str(pidfile)))
    await a.command("start")
    await state(a, State.READY)
    await async_wait_until(pidfile.exists, 5, what="pidfile")
    main, _, escaped = map(int, pidfile.read_text().split())
    pidfile.unlink()
    try:
        with caplog.at_level(logging.WARNING, "supervisord_llm.service"):
            os.kill(main, signal.SIGKILL)
            await async_wait_until(lambda: a.gen == 2 and a.state is State.READY, 10,
                                   what="the restart")
        assert not alive(escaped)
        assert a.last_exit == "killed by SIGKILL" and a.counters.restarts == {"exit": 1}
        assert f"process {escaped} (" in caplog.text and "escaped its process group" in caplog.text
        assert a.status()["escaped"] == []  # stopped: nothing left to show
        await async_wait_until(pidfile.exists, 5, what="second pidfile")
        second = int(pidfile.read_text().split()[2])
        before = a.gen
        await a.command("restart")  # what `llmctl restart` waits for
        assert await a.wait_settled(before, 10) is State.READY
        assert not alive(second)
    finally:
        with contextlib.suppress(OSError):
            os.kill(escaped, signal.SIGKILL)


async def test_escaped_child_without_the_marker_is_stopped_by_its_keeper(
        make: Factory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    pidfile = tmp_path / "pids"
    a = make(fake_service("svc", port, "--escape", "--escape-clean-env", "--pidfile",
                          str(pidfile)))
    await a.command("start")
    await state(a, State.READY)
    await async_wait_until(pidfile.exists, 5, what="pidfile")
    main, _, escaped = map(int, pidfile.read_text().split())
    try:
        await async_wait_until(lambda: "LLM_SUPERVISOR_INSTANCE" not in proc_environ(escaped),
                               5, what="the escapee without the marker")
        with caplog.at_level(logging.WARNING, "supervisord_llm.service"):
            os.kill(main, signal.SIGKILL)
            await async_wait_until(lambda: a.gen == 2 and a.state is State.READY, 10,
                                   what="the restart")
        # no marker, but still below the keeper (its subreaper): ours by descent, so the
        # relaunch gets a new keeper and the old one stops it with itself
        assert f"{escaped})" in caplog.text and "still there" in caplog.text
        await async_wait_until(lambda: not alive(escaped), 10, what="the escapee stopped")
    finally:
        with contextlib.suppress(OSError):
            os.kill(escaped, signal.SIGKILL)
        # the restarted instance made an escapee of its own: the test leaves none behind
        with contextlib.suppress(AssertionError):
            await async_wait_until(lambda: int(pidfile.read_text().split()[0]) != main, 10,
                                   what="the restarted instance's pidfile")
        for pid in map(int, pidfile.read_text().split()[2:]):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    await async_wait_until(lambda: a.status()["escaped"] == [], 5, what="escaped cleared")


async def test_stop_takes_escaped_children_ignoring_sigterm_down_at_the_deadline(
        make: Factory, tmp_path: Path) -> None:
    port = free_port()
    pidfile = tmp_path / "pids"
    a = make(fake_service("svc", port, "--escape", "--ignore-term", "--pidfile", str(pidfile),
                          stop={"timeout_s": 0.5}))
    await a.command("start")
    await state(a, State.READY)
    await async_wait_until(pidfile.exists, 5, what="pidfile")
    main, _, escaped = map(int, pidfile.read_text().split())
    try:
        t0 = time.monotonic()
        await a.command("stop")
        assert await a.wait_stopped(5) is State.STOPPED
        assert 0.4 <= time.monotonic() - t0 <= 3.0
        assert not alive(main) and not alive(escaped)
    finally:
        with contextlib.suppress(OSError):
            os.kill(escaped, signal.SIGKILL)


async def test_crash_loop_with_zero_backoff_is_held_to_one_launch_a_second(
        make: Factory) -> None:
    a = make({"name": "crashy", "command": ["/bin/false"],
              "restart": {"backoff_initial_s": 0, "backoff_max_s": 0, "max_restarts": 1000,
                          "window_s": 60}})
    await a.command("start")
    await async_wait_until(lambda: a.gen >= 3, 5, what="three fast launches")
    gen0, launched0 = a.gen, a.model.launched_at
    await async_wait_until(lambda: a.gen >= gen0 + 2, 5, what="two more launches")
    gen1, launched1 = a.gen, a.model.launched_at
    assert launched0 is not None and launched1 is not None
    # without the floor: about 60 launches a second on two cores
    rate = (gen1 - gen0) / (launched1 - launched0)
    assert rate <= 1.0 / FLOOR_S, f"{gen1 - gen0} launches in {launched1 - launched0:.2f} s"
    assert a.model.budget.fast_runs >= 3


async def test_restart_policies(make: Factory) -> None:
    clean = make(fake_service("clean", free_port(), "--exit-after", "0.3", "--exit-code", "0"))
    never = make(fake_service("never", free_port(), "--exit-after", "0.3",
                              restart={"policy": "never"}))
    always = make(fake_service("always", free_port(), "--exit-after", "0.3", "--exit-code", "0",
                               restart={"policy": "always"}))
    for a in (clean, never, always):
        await a.command("start")
    await state(clean, State.STOPPED)
    assert clean.last_exit == "exit 0" and not clean.up
    await state(never, State.FAILED)
    await async_wait_until(lambda: always.restart_count >= 1, 10, what="always restarts")


async def test_missing_binary_backs_off_then_fails(make: Factory) -> None:
    a = make({"name": "nobin", "command": ["/nonexistent/server"],
              "restart": {"backoff_initial_s": 0.01, "max_restarts": 2}})
    await a.command("start")
    await state(a, State.FAILED)
    assert a.last_exit is not None and "command not found" in a.last_exit


async def test_no_health_check_is_ready_on_launch(make: Factory) -> None:
    a = make({"name": "sleeper", "command": ["/bin/sleep", "30"], "stop": {"timeout_s": 1}})
    await a.command("start")
    assert a.state is State.READY
    await a.command("stop")
    await state(a, State.STOPPED)
    assert a.last_exit == "killed by SIGTERM"


async def test_restart_command_and_waiting(make: Factory) -> None:
    port = free_port()
    a = make(fake_service("svc", port))
    await a.command("start")
    await state(a, State.READY)
    before = a.gen
    await a.command("restart")
    assert await a.wait_settled(before, 10) is State.READY
    assert a.gen == before + 1 and a.counters.restarts == {"manual": 1}


async def test_stop_during_backoff(make: Factory) -> None:
    a = make(fake_service("svc", free_port(), "--exit-after", "0.05",
                          restart={"backoff_initial_s": 5, "backoff_max_s": 5}))
    await a.command("start")
    await state(a, State.BACKOFF)
    await a.command("stop")
    assert a.state is State.STOPPED


async def test_launched_process_is_pinned(spawner: Spawner, prober: HttpProber) -> None:
    from supervisord_llm.config import SimGpu
    from supervisord_llm.sensors.sim import SimBackend

    gpus = SimBackend((SimGpu(uuid="GPU-00000000-0000-4000-8000-000000000001", numa_node=0),
                       )).discover()
    cfg = parse_config(toml_dumps({"gpu": {"backend": "none"}, "service": [
        {"name": "pinned", "command": ["/bin/sleep", "30"], "env": {"EXTRA": "{gpu_uuids}"}}]}))
    plan = resolve_plan(cfg, gpus, allowed_cpus={0})[0]
    # the config has no GPUs: give it the sim GPU directly through the plan
    from dataclasses import replace

    from supervisord_llm.plan import _pinning_env

    plan = replace(plan, gpus=tuple(gpus), numa_node=0, cpus=(0,), bind_memory=True,
                   env=plan.env + tuple(_pinning_env(tuple(gpus))))
    a = ServiceActor(plan, spawner, prober, base_env={"PATH": os.defpath,
                                                       "NOTIFY_SOCKET": "/x"})
    a.run()
    try:
        await a.command("start")
        assert a.proc is not None
        pid = a.proc.pid
        await async_wait_until(lambda: exec_done(pid, "/bin/sleep"), 5,
                               what="exec of the real command")
        st = proc_status(pid)
        assert st["Cpus_allowed_list"] == "0"
        assert st["Mems_allowed_list"] == "0"
        numa_maps = Path(f"/proc/{pid}/numa_maps").read_text()
        assert "bind:0" in numa_maps
        env = proc_environ(pid)
        assert env["CUDA_VISIBLE_DEVICES"] == gpus[0].uuid
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert env["EXTRA"] == gpus[0].uuid
        assert "NOTIFY_SOCKET" not in env
        assert os.getpgid(pid) == pid and os.getsid(pid) == pid
    finally:
        a.kill_now()
        await a.wait_stopped(5)
        await a.shutdown()


async def test_a_keeper_killed_takes_its_engine_with_it(spawner: Spawner) -> None:
    """The engine's parent is its keeper: a keeper that dies by SIGKILL takes its engine with
    it (the parent-death signal), and the exit is seen as a kill."""
    from supervisord_llm.spawn import LaunchSpec

    proc = await spawner.launch(LaunchSpec("x", ("/bin/sleep", "60"), {"PATH": "/bin:/usr/bin"}))
    await async_wait_until(lambda: exec_done(proc.pid, "/bin/sleep"), 5, what="exec")
    assert psutil.Process(proc.pid).ppid() == proc.keeper_pid
    os.kill(proc.keeper_pid, signal.SIGKILL)
    async with asyncio.timeout(5):
        assert await proc.wait() == -signal.SIGKILL
    await async_wait_until(lambda: not alive(proc.pid), 2, what="the engine gone")


async def test_guardian_kills_groups_when_its_pipe_closes(tmp_path: Path) -> None:
    """The guardian holds the daemon's own helpers (checkpoint hooks): when the daemon goes,
    however it ends, they go."""
    sp = Spawner(tmp_path, use_guardian=True)
    await sp.start()
    helper = subprocess.Popen([sys.executable, FAKE, "--port", str(free_port()),
                               "--ignore-term"], start_new_session=True)
    sp.track_group(helper.pid)
    guardian = sp.guardian_pid()
    assert guardian is not None
    # what a SIGKILL of the daemon does to the pipe: the write end closes
    assert sp._guardian_fd is not None
    os.close(sp._guardian_fd)
    sp._guardian_fd = None
    await async_wait_until(lambda: helper.poll() is not None, 3, what="guardian kill")
    await sp.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
async def test_service_runs_as_its_user_without_inheriting_oom_protection(
        spawner: Spawner, prober: HttpProber) -> None:
    cfg = parse_config(toml_dumps({"gpu": {"backend": "none"}, "service": [
        {"name": "as-nobody", "command": ["/bin/sleep", "30"], "user": "nobody"}]}))
    a = ServiceActor(resolve_plan(cfg, [])[0], spawner, prober,
                     base_env={"PATH": "/bin:/usr/bin", "HOME": "/root"})
    a.run()
    own = Path("/proc/self/oom_score_adj")
    saved = own.read_text().strip()
    try:
        own.write_text("-100")  # a protected supervisor ...
        protected = True
    except PermissionError:  # no CAP_SYS_RESOURCE in this sandbox
        protected = False
    try:
        await a.command("start")
        assert a.proc is not None
        pid = a.proc.pid
        await async_wait_until(lambda: exec_done(pid, "/bin/sleep"), 5, what="exec")
        st = proc_status(pid)
        assert st["Uid"].split()[:2] == ["65534", "65534"]
        assert st["Gid"].split()[0] == "65534"
        assert proc_environ(pid)["USER"] == "nobody"
        # ... whose services are not protected
        if protected:
            assert Path(f"/proc/{pid}/oom_score_adj").read_text().strip() == "0"
    finally:
        if protected:
            own.write_text(saved)
        a.kill_now()
        await a.wait_stopped(5)
        await a.shutdown()


async def test_a_killed_guardian_is_replaced(tmp_path: Path) -> None:
    sp = Spawner(tmp_path, use_guardian=True)
    await sp.start()
    helper = subprocess.Popen(["/bin/sleep", "60"], start_new_session=True)
    sp.track_group(helper.pid)
    first = sp.guardian_pid()
    assert first is not None
    os.kill(first, signal.SIGKILL)
    await async_wait_until(lambda: sp.guardian_pid() not in (None, first), 5,
                           what="a new guardian")
    # the new one knows the live group: closing its pipe (a daemon SIGKILL) kills it
    assert sp._guardian_fd is not None
    os.close(sp._guardian_fd)
    sp._guardian_fd = None
    await async_wait_until(lambda: helper.poll() is not None, 3, what="guardian kill")
    await sp.close()


def test_a_port_check_out_of_descriptors_cannot_tell(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of file descriptors, the port check cannot open a socket: it says "free" and lets
    the launch find out (a failed launch, then backoff), instead of raising in the actor."""
    import errno
    import socket

    from supervisord_llm import ports

    def no_socket(*_a: object, **_k: object) -> socket.socket:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(socket, "socket", no_socket)
    assert ports.port_free(12345) is True


def test_port_free_knows_ipv6_listeners() -> None:
    """A gate on [::1]:P: a reload asks whether P is free there, over IPv6 (an IPv4 probe
    said "in use" for every IPv6 port)."""
    import socket as sk

    from supervisord_llm import ports
    try:
        s = sk.socket(sk.AF_INET6)
        s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with s:
        s.listen()
        taken = s.getsockname()[1]
        assert not ports.port_free(taken, "::1")
        other = free_port()
        assert ports.port_free(other, "::1") and ports.port_free(other)
