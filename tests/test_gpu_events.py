"""Health beyond heat in the hub (a slower poll on each GPU's own thread) and GPU events:
Lost/Back merged from the hub's reads, Xid events (tests/test_nvml.py drives those through the
scripted NVML) and udev. udev is tested with REAL kernel uevents: an `ifb` network link added
and deleted (root; the `net` subsystem, matched by name) stands in for a GPU's PCI device."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from helpers import SIM_UUID, async_wait_until
from supervisord_llm.errors import GpuLostError, SensorError
from supervisord_llm.sensors.base import GpuHealth, GpuInfo, GpuReading
from supervisord_llm.sensors.events import (
    NVIDIA_RESET_XIDS,
    Back,
    EventSink,
    GpuEvent,
    GpuEvents,
    Lost,
)
from supervisord_llm.sensors.hub import GpuHub
from supervisord_llm.sensors.udev import UdevSource, pci_slot


def info(i: int, pci: str = "") -> GpuInfo:
    return GpuInfo(i, SIM_UUID.format(i), "g", pci, "nvidia", -1, 1, 300.0, 100.0, 300.0, 89.0,
                   95.0)


class Board:
    """A scripted backend: per GPU, reads and health calls are logged with their times; a GPU
    can hang (health or read), be lost, or report memory trouble."""

    name = "board"

    def __init__(self, health_s: float = 0.0) -> None:
        self.health_s = health_s
        self.lock = threading.Lock()
        self.reads: dict[int, list[float]] = {}
        self.healths: dict[int, list[float]] = {}
        self.calls: dict[int, list[float]] = {}
        self.busy: dict[int, int] = {}
        self.max_busy = 0
        self.hang_health: dict[int, threading.Event] = {}
        self.lost: set[int] = set()
        self.health_error: dict[int, Exception] = {}
        self.trouble: set[int] = set()
        self.temps: dict[int, float] = {}  # a temperature to report instead of 40 + index

    def discover(self) -> list[GpuInfo]:
        return []

    def _enter(self, gpu: GpuInfo, log: dict[int, list[float]]) -> None:
        with self.lock:
            log.setdefault(gpu.index, []).append(time.monotonic())
            self.busy[gpu.index] = self.busy.get(gpu.index, 0) + 1
            self.max_busy = max(self.max_busy, self.busy[gpu.index])

    def _leave(self, gpu: GpuInfo) -> None:
        with self.lock:
            self.busy[gpu.index] -= 1

    def read(self, gpu: GpuInfo) -> GpuReading:
        self._enter(gpu, self.reads)
        try:
            if gpu.index in self.lost:
                raise GpuLostError(f"GPU{gpu.index} is lost")
            return GpuReading(temperature_c=self.temps.get(gpu.index, 40.0 + gpu.index))
        finally:
            self._leave(gpu)

    def read_health(self, gpu: GpuInfo) -> GpuHealth:
        self._enter(gpu, self.healths)
        try:
            hang = self.hang_health.get(gpu.index)
            if hang is not None:
                hang.wait(10)
            elif self.health_s:
                time.sleep(self.health_s)  # a slow call on the GPU's thread
            if gpu.index in self.lost:
                raise GpuLostError(f"GPU{gpu.index} is lost")
            error = self.health_error.get(gpu.index)
            if error is not None:
                raise error
            return GpuHealth(clock_events=("gpu_idle",), pcie_gen=5, pcie_gen_max=5,
                             ecc_uncorrected_volatile=1 if gpu.index in self.trouble else 0)
        finally:
            self._leave(gpu)

    def set_power_limit(self, gpu: GpuInfo, watts: float) -> None:
        self._enter(gpu, self.calls)
        self._leave(gpu)

    def close(self) -> None:
        for ev in self.hang_health.values():
            ev.set()

    def n(self, log: dict[int, list[float]], i: int) -> int:
        with self.lock:
            return len(log.get(i, []))


@contextlib.asynccontextmanager
async def running(hub: GpuHub) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(hub.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await hub.aclose()


# --- the hub's health poll ----------------------------------------------------------------


async def test_health_poll_is_slower_and_does_not_delay_reads() -> None:
    board = Board(health_s=0.01)
    hub = GpuHub(board, [info(0), info(1)], 0.02, 0.5, health_interval_s=0.25)
    assert [h.status for h in hub.health_snapshots()] == ["unknown", "unknown"]
    async with running(hub):
        await async_wait_until(lambda: board.n(board.healths, 0) >= 4
                               and hub.health_snapshots()[1].status == "ok", 10,
                               what="four health polls")
        reads = board.n(board.reads, 0)
        snaps = hub.health_snapshots()
    assert all(s.status == "ok" and s.health is not None for s in snaps)
    assert snaps[0].health is not None and snaps[0].health.clock_events == ("gpu_idle",)
    age = snaps[0].age_s(time.monotonic())
    assert age is not None and 0 <= age < 1.0
    # about 12 reads per health poll: the reads keep their own (faster) schedule
    assert reads >= 4 * 6, (reads, board.healths[0])
    health_times = board.healths[0]
    gaps = [b - a for a, b in itertools.pairwise(health_times)]
    # the slower interval, on its ticks: no more polls than ticks in the time they took (a
    # poll that a loaded machine made late is followed by one on the next tick, which may
    # come at once: the schedule does not drift)
    assert len(gaps) <= (health_times[-1] - health_times[0]) / 0.25 + 1, gaps
    read_times = board.reads[0]
    read_gaps = [b - a for a, b in itertools.pairwise(read_times)]
    # no read waited for a health call: each tick reads on time (generous bound for a
    # loaded 2-core machine; a tick skipped behind a 10 ms health call would still pass, so
    # count: at most one slow gap per health poll)
    assert sum(g > 0.1 for g in read_gaps) <= len(health_times), read_gaps
    assert board.max_busy == 1  # never a health call beside a read of the same GPU


async def test_hung_health_call_is_unresponsive_without_pile_up() -> None:
    board = Board()
    release = threading.Event()
    board.hang_health[0] = release
    hub = GpuHub(board, [info(0), info(1)], 0.02, 0.1, health_interval_s=0.1)
    try:
        async with running(hub):
            await async_wait_until(
                lambda: hub.health_snapshots()[0].status == "unresponsive"
                and hub.snapshots()[0].status == "unresponsive", 5, what="GPU0 unresponsive")
            reads0 = board.n(board.reads, 0)
            healths1 = board.n(board.healths, 1)
            # several more health polls of GPU1: GPU0 gets no new call, health or read
            await async_wait_until(lambda: board.n(board.healths, 1) >= healths1 + 3, 5,
                                   what="GPU1 health polls")
            assert board.n(board.healths, 0) == 1 and board.n(board.reads, 0) == reads0
            assert hub.health_snapshots()[1].status == "ok"
            assert hub.snapshots()[1].status == "ok"
            assert "sensor call" in (hub.health_snapshots()[0].error or "")
            assert hub.errors_total.get("gpu_timeout", 0) >= 1
            release.set()  # the call returns: GPU0 is read again
            board.hang_health.pop(0)
            await async_wait_until(
                lambda: hub.snapshots()[0].status == "ok"
                and hub.health_snapshots()[0].status == "ok", 5, what="GPU0 back to ok")
    finally:
        release.set()
    assert board.max_busy == 1


async def test_a_call_waits_for_a_health_read_instead_of_busy() -> None:
    """A power limit set while the health is read waits for it (as for a read)."""
    board = Board(health_s=0.15)
    hub = GpuHub(board, [info(0)], 0.02, 1.0, health_interval_s=10)
    polling = asyncio.create_task(hub.poll_health_once())
    await async_wait_until(lambda: board.n(board.healths, 0) == 1, 5, what="a health read")
    await hub.set_power_limit(info(0), 200)  # no SensorBusyError
    await polling
    assert board.n(board.calls, 0) == 1 and board.calls[0][0] > board.healths[0][0]
    assert hub.health_snapshots()[0].status == "ok" and board.max_busy == 1
    await hub.aclose()


async def test_health_errors_and_lost() -> None:
    board = Board()
    hub = GpuHub(board, [info(0), info(1)], 0.02, 0.5, health_interval_s=10)
    await hub.poll_once()
    await hub.poll_health_once()
    good = hub.health_snapshots()[0]
    assert good.status == "ok"
    board.health_error[0] = SensorError("NVML: health of GPU0: Unknown Error")
    board.lost.add(1)
    await hub.poll_health_once()
    h0, h1 = hub.health_snapshots()
    assert (h0.status, h0.error) == ("error", "SensorError: NVML: health of GPU0: Unknown Error")
    assert h0.health == good.health and h0.read_at == good.read_at  # the last good one, kept
    assert h1.status == "lost" and hub.snapshots()[1].status == "lost"  # lost is lost
    assert hub.errors_total["gpu_health"] == 1
    await hub.aclose()


# --- merging events -----------------------------------------------------------------------


class ThreadSource:
    """An event source that reports from a thread of its own, as the Xid watcher does."""

    name = "thread"

    def __init__(self) -> None:
        self.sink: EventSink | None = None
        self.closed = False

    def start(self, sink: EventSink) -> None:
        self.sink = sink

    def report(self, *calls: tuple[str, str, Any]) -> None:
        def run() -> None:
            assert self.sink is not None
            for kind, uuid, arg in calls:
                getattr(self.sink, f"report_{kind}")(uuid, arg)

        t = threading.Thread(target=run)
        t.start()
        t.join(5)

    def close(self) -> None:
        self.closed = True

    def join(self, timeout_s: float) -> bool:
        return True


async def test_events_once_per_transition_from_a_thread() -> None:
    gpus = [info(0), info(1)]
    u0, u1 = gpus[0].uuid, gpus[1].uuid
    got: list[GpuEvent] = []
    on_loop: list[bool] = []
    loop_thread = threading.get_ident()

    def on_event(ev: GpuEvent) -> None:
        on_loop.append(threading.get_ident() == loop_thread)
        got.append(ev)

    src = ThreadSource()
    events = GpuEvents(gpus, on_event, sources=[src])
    events.start()
    src.report(("lost", u0, "udev: pci device 0000:41:00.0: remove"),
               ("lost", u0, "NVML: GPU0 is lost (Xid event wait)"),
               ("back", u1, "udev: pci device 0000:42:00.0: add"),  # not lost: nothing
               ("xid", u1, 31), ("xid", u1, 31), ("xid", u1, 13),  # application faults
               ("lost", "GPU-unknown", "x"), ("xid", "GPU-unknown", 79))
    await async_wait_until(lambda: sum(events.xid_errors_total[u1].values()) == 3, 5,
                           what="the reports")
    assert got == [Lost(u0, "udev: pci device 0000:41:00.0: remove")]
    assert events.lost_why(u0) == "udev: pci device 0000:41:00.0: remove"
    assert events.xid_errors_total == {u0: {}, u1: {31: 2, 13: 1}}
    src.report(("back", u0, "udev: pci device 0000:41:00.0: add"),
               ("back", u0, "udev: pci device 0000:41:00.0: add"),
               ("xid", u1, 48), ("xid", u1, 48))
    await async_wait_until(lambda: len(got) == 3, 5, what="Back and Lost")
    assert got[1:] == [Back(u0, "udev: pci device 0000:41:00.0: add"),
                       Lost(u1, "Xid 48: double-bit ECC error")]
    assert all(on_loop) and events.is_lost(u1) and not events.is_lost(u0)
    assert events.xid_errors_total[u1][48] == 2
    await events.aclose()
    assert src.closed
    src.report(("lost", u0, "after close"))  # dropped, not raised
    assert len(got) == 3


def test_reset_xids_are_documented() -> None:
    assert set(NVIDIA_RESET_XIDS) == {48, 63, 64, 74, 79, 92, 94, 95, 119, 120}


async def test_a_failing_callback_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    def boom(ev: GpuEvent) -> None:
        raise RuntimeError("host is busy")

    src = ThreadSource()
    events = GpuEvents([info(0)], boom, sources=[src])
    events.start()
    src.report(("lost", info(0).uuid, "udev: gone"))
    await async_wait_until(lambda: events.is_lost(info(0).uuid), 5, what="lost")
    assert "GPU event callback failed" in caplog.text
    events.close()


async def test_reads_lost_and_back_and_the_re_probe() -> None:
    board = Board()
    gpus = [info(0), info(1)]
    u0, u1 = gpus[0].uuid, gpus[1].uuid
    hub = GpuHub(board, gpus, 0.02, 0.2, health_interval_s=10)
    got: list[GpuEvent] = []
    src = ThreadSource()
    events = GpuEvents(gpus, got.append, hub=hub, sources=[src])
    events.start()
    await hub.poll_once()
    assert got == []
    board.lost.add(0)
    await hub.poll_once()
    await hub.poll_once()
    assert got == [Lost(u0, "read: GPU0 is lost")]
    board.lost.discard(0)
    await hub.poll_once()  # a read answers again: the loss only reads saw is over
    assert got[1:] == [Back(u0, "a read answered again")]
    # lost by an Xid: reads that answer do not end it; the re-probe does, without trouble
    src.report(("xid", u1, 79))
    await async_wait_until(lambda: len(got) == 3, 5, what="Lost by Xid")
    assert got[2] == Lost(u1, "Xid 79: GPU has fallen off the bus")
    await hub.poll_once()
    assert events.is_lost(u1)
    board.trouble.add(1)  # uncorrected ECC since the driver loaded: needs a reset
    assert not await events.probe_back(gpus[1])
    board.trouble.discard(1)
    assert await events.probe_back(gpus[1])
    assert got[3:] == [Back(u1, "re-probe: the GPU answers again")]
    assert await events.probe_back(gpus[1]) and len(got) == 4  # not lost: no event
    # a lost GPU that does not answer
    board.lost.add(0)
    await hub.poll_once()
    assert got[4:] == [Lost(u0, "read: GPU0 is lost")]
    src.report(("lost", u0, "udev: pci device: remove"))  # a more specific cause: no event
    board.lost.discard(0)
    await hub.poll_once()
    assert len(got) == 5 and events.lost_why(u0) == "udev: pci device: remove"
    board.lost.add(0)
    assert not await events.probe_back(gpus[0])
    # the re-probe of a GPU whose call hangs answers False at once (no pile-up)
    board.hang_health[0] = threading.Event()
    board.lost.discard(0)
    started = time.monotonic()
    assert not await events.probe_back(gpus[0])  # the health call overruns the deadline
    assert not await events.probe_back(gpus[0])  # busy: refused at once
    assert time.monotonic() - started < 1.0
    board.hang_health[0].set()
    await events.aclose()
    await hub.aclose()


async def test_an_implausible_reading_neither_ends_a_loss_nor_answers_a_re_probe() -> None:
    board = Board()
    gpus = [info(0), info(1)]
    u0, u1 = gpus[0].uuid, gpus[1].uuid
    hub = GpuHub(board, gpus, 0.02, 0.2, health_interval_s=10)
    got: list[GpuEvent] = []
    src = ThreadSource()
    events = GpuEvents(gpus, got.append, hub=hub, sources=[src])
    events.start()
    await hub.poll_once()
    board.lost.add(0)
    await hub.poll_once()
    assert got == [Lost(u0, "read: GPU0 is lost")]
    board.lost.discard(0)
    board.temps[0] = 1e308  # it reads again, nonsense: an error, not back
    await hub.poll_once()
    assert hub.snapshots()[0].status == "error" and got[1:] == []
    src.report(("xid", u1, 79))
    await async_wait_until(lambda: len(got) == 2, 5, what="Lost by Xid")
    board.temps[1] = -1000.0
    assert not await events.probe_back(gpus[1])
    board.temps.clear()
    assert await events.probe_back(gpus[1])
    await hub.poll_once()
    assert got[2:] == [Back(u1, "re-probe: the GPU answers again"),
                       Back(u0, "a read answered again")]
    await events.aclose()
    await hub.aclose()


async def test_probe_back_needs_a_hub() -> None:
    events = GpuEvents([info(0)], lambda ev: None)
    with pytest.raises(RuntimeError, match="hub"):
        await events.probe_back(info(0))


# --- udev -----------------------------------------------------------------------------------


def test_pci_slot_forms() -> None:
    assert pci_slot("00000000:41:00.0") == "0000:41:00.0"  # NVML
    assert pci_slot("0000:41:00.0") == "0000:41:00.0"  # the kernel
    assert pci_slot("41:00.0") == "0000:41:00.0"
    assert pci_slot("0000:C1:00.1") == "0000:c1:00.1"
    assert pci_slot("eth0") == "eth0"
    assert pci_slot("zz:yy:00.0") == "zz:yy:00.0"


class FakeMonitor:
    """A pyudev Monitor stand-in with a real file descriptor (a socket pair) for add_reader."""

    def __init__(self) -> None:
        self.a, self.b = socket.socketpair()
        self.devices: list[Any] = []
        self.filters: list[str] = []
        self.raise_on_poll: OSError | None = None

    def filter_by(self, subsystem: str) -> None:
        self.filters.append(subsystem)

    def start(self) -> None:
        return None

    def fileno(self) -> int:
        return self.a.fileno()

    def push(self, *devices: Any) -> None:
        self.devices.extend(devices)
        self.b.send(b"x")

    def poll(self, timeout: float) -> Any:
        assert timeout == 0
        if self.raise_on_poll is not None:
            exc, self.raise_on_poll = self.raise_on_poll, None
            raise exc
        if not self.devices:
            with contextlib.suppress(BlockingIOError):
                self.a.recv(4096, socket.MSG_DONTWAIT)
            return None
        return self.devices.pop(0)

    def close(self) -> None:
        self.a.close()
        self.b.close()


def fake_pyudev(monitor: FakeMonitor | Exception) -> Any:
    def from_netlink(context: Any, source: str) -> FakeMonitor:
        assert source == "kernel"
        if isinstance(monitor, Exception):
            raise monitor
        return monitor

    return SimpleNamespace(Context=object,
                           Monitor=SimpleNamespace(from_netlink=from_netlink))


def uevent(action: str, name: str, subsystem: str = "pci") -> Any:
    return SimpleNamespace(action=action, sys_name=name, subsystem=subsystem)


async def test_udev_pci_remove_and_add_match_nvml_bus_ids() -> None:
    gpus = [info(0, "00000000:41:00.0"), info(1, "00000000:C1:00.0")]
    mon = FakeMonitor()
    src = UdevSource(fake_pyudev(mon), {g.pci_bus_id: g.uuid for g in gpus})
    got: list[GpuEvent] = []
    events = GpuEvents(gpus, got.append, sources=[src])
    try:
        events.start()
        assert src.active and mon.filters == ["pci"]
        mon.push(uevent("remove", "0000:41:00.1"),  # the board's audio function: not ours
                 uevent("change", "0000:c1:00.0"),
                 uevent("remove", "0000:c1:00.0"))
        await async_wait_until(lambda: got, 5, what="Lost")
        mon.raise_on_poll = OSError(105, "No buffer space available")  # an overrun: logged
        mon.push(uevent("add", "0000:c1:00.0"))
        mon.push()
        await async_wait_until(lambda: len(got) == 2, 5, what="Back")
        assert got == [Lost(gpus[1].uuid, "udev: pci device 0000:c1:00.0: remove"),
                       Back(gpus[1].uuid, "udev: pci device 0000:c1:00.0: add")]
        assert src.seen == 3
    finally:
        await events.aclose()
        mon.close()
    assert not src.active


async def test_udev_monitor_that_cannot_be_created_is_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    src = UdevSource(fake_pyudev(PermissionError(1, "Operation not permitted")), {"x": "u"})
    events = GpuEvents([info(0)], lambda ev: None, sources=[src])
    with caplog.at_level(logging.WARNING):
        events.start()
    assert not src.active and src.error is not None and "Operation not permitted" in src.error
    assert "udev: no kernel uevent monitor" in caplog.text
    await events.aclose()


@pytest.fixture
def ifb_name() -> Iterator[str]:
    """A name for an ifb link, and the means to add one here (or a skip saying why not)."""
    ip = shutil.which("ip")
    if ip is None:
        pytest.skip("no `ip` command (iproute2) on this machine")
    name = f"lsv{os.getpid() % 100000}"
    probe = subprocess.run([ip, "link", "add", name, "type", "ifb"], capture_output=True,
                           text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"`ip link add {name} type ifb` failed (needs root and the ifb module): "
                    f"{probe.stderr.strip()}")
    subprocess.run([ip, "link", "del", name], capture_output=True, check=False)
    try:
        yield name
    finally:
        subprocess.run([ip, "link", "del", name], capture_output=True, check=False)


def ip_link(*args: str) -> None:
    subprocess.run(["ip", "link", *args], check=True, capture_output=True)


async def test_udev_real_kernel_uevents(ifb_name: str) -> None:
    """Real uevents from the kernel's netlink socket, read on the loop: an ifb link stands in
    for a GPU's device (subsystem `net`, matched by interface name)."""
    pyudev = pytest.importorskip("pyudev")
    gpu = info(0)
    src = UdevSource(pyudev, {ifb_name: gpu.uuid}, subsystem="net", key=str)
    got: list[GpuEvent] = []
    events = GpuEvents([gpu], got.append, sources=[src])
    events.start()
    if not src.active:
        pytest.skip(f"no kernel uevent monitor here: {src.error}")
    try:
        ip_link("add", ifb_name, "type", "ifb")  # added while not lost: no event
        ip_link("del", ifb_name)
        await async_wait_until(lambda: got, 5, what="Lost from a real remove uevent")
        assert got == [Lost(gpu.uuid, f"udev: net device {ifb_name}: remove")]
        ip_link("add", ifb_name, "type", "ifb")
        await async_wait_until(lambda: len(got) == 2, 5, what="Back from a real add uevent")
        assert got[1] == Back(gpu.uuid, f"udev: net device {ifb_name}: add")
        ip_link("del", ifb_name)
        await async_wait_until(lambda: len(got) == 3, 5, what="Lost again")
        assert got[2] == Lost(gpu.uuid, f"udev: net device {ifb_name}: remove")
        assert src.seen == 4
    finally:
        await events.aclose()
