"""The NUT test server itself (tests/nutserver.py), read through aionut as a client would:
upsd and dummy-ups for real, their state changed by rewriting the driver's file, and each of
them killed and started again."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aionut import AIONUTClient, NUTCommandError, NUTOSError
from nutserver import NutServer, NutServerError, require_nut

from helpers import alive, async_wait_until

require_nut()

pytestmark = pytest.mark.e2e

USERS = {"monitor": "s3cret-pw", "other": "another"}


@pytest.fixture
def ups(tmp_path: Path) -> Iterator[NutServer]:
    with NutServer(tmp_path, users=USERS) as server:
        yield server


@pytest.fixture
async def client(ups: NutServer) -> AsyncIterator[AIONUTClient]:
    c = AIONUTClient(ups.host, ups.port, timeout=2)
    try:
        yield c
    finally:
        c.shutdown()


async def read(ups: NutServer, username: str | None = None,
               password: str | None = None) -> dict[str, str]:
    """A fresh client's LIST VAR dummy."""
    c = AIONUTClient(ups.host, ups.port, username=username, password=password, timeout=2)
    try:
        return await c.list_vars(ups.name)
    finally:
        c.shutdown()


async def test_reads_the_initial_state(ups: NutServer, client: AIONUTClient) -> None:
    assert ups.ups == f"dummy@127.0.0.1:{ups.port}"
    assert ups.startup_s is not None and ups.startup_s < 10
    found = await client.list_vars("dummy")
    assert found["ups.status"] == "OL"
    assert found["battery.charge"] == "100"
    assert found["battery.runtime"] == "1200"
    assert ups.query("battery.charge") == "100"
    assert ups.query("ups.load") == "ERR VAR-NOT-SUPPORTED"
    assert await client.list_ups() == {"dummy": "llm-supervisor test UPS"}


async def test_initial_values_are_the_constructors(tmp_path: Path) -> None:
    with NutServer(tmp_path, status="OB DISCHRG", charge=87.5, runtime=600) as ups:
        found = await read(ups)
    assert (found["ups.status"], found["battery.charge"], found["battery.runtime"]) == (
        "OB DISCHRG", "87.5", "600")


async def test_set_is_seen_through_upsd(ups: NutServer, client: AIONUTClient) -> None:
    ups.set(status="OB LB", charge=12, **{"ups.load": "40"})
    assert ups.wait_status("OB LB") < 2.5
    found = await client.list_vars("dummy")
    assert found["ups.status"] == "OB LB"
    assert found["battery.charge"] == "12"
    assert found["battery.runtime"] == "1200"  # kept from before
    assert found["ups.load"] == "40"
    # two writes within the same second: dummy-ups compares the file's mtime in whole
    # seconds, and would ignore the second one without the helper's care
    ups.set(status="OL")
    ups.set(status="OB", runtime=300.5)
    ups.wait_status("OB")
    found = await client.list_vars("dummy")
    assert (found["ups.status"], found["battery.runtime"]) == ("OB", "300.5")


async def test_a_dead_driver_is_driver_not_connected(ups: NutServer) -> None:
    ups.kill_driver()

    async def refused() -> bool:
        try:
            await read(ups)
        except NUTCommandError as e:
            assert "DRIVER-NOT-CONNECTED" in str(e)
            return True
        return False

    await async_wait_until(refused, timeout=5, interval=0.05, what="DRIVER-NOT-CONNECTED")
    assert ups.query("ups.status") == "ERR DRIVER-NOT-CONNECTED"
    ups.set(status="OB")  # while it is down: the new driver reads it at start
    ups.start_driver()
    assert (await read(ups))["ups.status"] == "OB"


async def test_a_dead_upsd_refuses_and_comes_back_on_the_same_port(ups: NutServer) -> None:
    port = ups.port
    ups.kill_upsd()
    with pytest.raises(NUTOSError, match="Connect call failed"):
        await read(ups)
    with pytest.raises(ConnectionRefusedError):
        ups.query("ups.status")
    ups.set(status="OL CHRG", charge=50)
    ups.start_upsd()
    assert ups.port == port
    found = await read(ups)
    assert (found["ups.status"], found["battery.charge"]) == ("OL CHRG", "50")


async def test_login(ups: NutServer) -> None:
    assert (await read(ups, "monitor", "s3cret-pw"))["ups.status"] == "OL"
    assert ups.login("monitor", "s3cret-pw") == "OK"
    assert ups.login("other", "another") == "OK"
    # upsd answers OK to any USERNAME and PASSWORD and checks them only at LOGIN
    assert ups.login("monitor", "wrong") == "ERR ACCESS-DENIED"
    assert ups.login("nobody", "s3cret-pw") == "ERR ACCESS-DENIED"
    # aionut sends USERNAME and PASSWORD but never LOGIN, and reads need no login: a wrong
    # password goes unnoticed by its reads
    assert (await read(ups, "monitor", "wrong"))["ups.status"] == "OL"


def test_stop_leaves_no_process_even_when_the_test_fails(tmp_path: Path) -> None:
    server = NutServer(tmp_path)
    with pytest.raises(ZeroDivisionError), server:
        assert server.driver_running and server.upsd_running
        assert server._driver is not None and server._upsd is not None
        pids = [server._driver.pid, server._upsd.pid]
        _ = 1 / 0
    assert not any(alive(pid) for pid in pids)
    assert not server.driver_running and not server.upsd_running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.host, server.port), timeout=1).close()
    server.stop()  # again: nothing to do


def test_a_failed_start_says_why_and_cleans_up(tmp_path: Path) -> None:
    server = NutServer(tmp_path)
    server.etc.mkdir(parents=True)
    blocker = socket.socket()
    blocker.bind((server.host, server.port))  # upsd cannot listen there
    blocker.listen()
    try:
        t0 = time.monotonic()
        with pytest.raises(NutServerError, match=r"upsd exited with \d+(.|\n)*upsd\.log"):
            server.start()
        assert time.monotonic() - t0 < 10
    finally:
        blocker.close()
    assert not server.driver_running and not server.upsd_running
