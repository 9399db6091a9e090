"""The gate's own upstream client, in the front process and in process, against servers that
send exactly what a test needs: chunk frames with extensions and trailers, close-delimited
bodies, large bodies read slowly (back-pressure), chunked uploads, HTTP/1.0 clients, and a
server that drops idle keep-alive connections."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from helpers import ANY_PATH, RawBackend, async_wait_until, free_port, front_host, read_request
from supervisord_llm.config import GateSection, parse_listen
from supervisord_llm.gate import GateHost


@pytest.fixture(params=["front", "in-process"])
async def gate_host(request: pytest.FixtureRequest
                    ) -> AsyncIterator[tuple[Any, Callable[[int], Awaitable[str]]]]:
    """Gates in the front process (as the daemon runs them), and on a loop of this process."""
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "front":
            host: Any = await stack.enter_async_context(front_host())
        else:
            host = GateHost()
            stack.push_async_callback(host.close)

        async def make(port: int) -> str:
            listen = parse_listen(f"127.0.0.1:{free_port()}")
            gate = await host.add(f"g{port}", GateSection(listen, allow_paths=ANY_PATH))
            host.call(gate.set_upstreams, ("127.0.0.1", port), None)
            await async_wait_until(lambda: gate.state == "open", 2, what="gate open")
            return f"127.0.0.1:{listen.port}"

        yield host, make


async def test_chunk_frames_extensions_and_trailers(gate_host: tuple[Any, Callable[[int],
                                                    Awaitable[str]]]) -> None:
    _host, make = gate_host

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                         b"Content-Type: text/plain\r\n\r\n")
            for part in (b"5;ext=1\r\nhello\r\n", b"1", b"\r\n", b" \r\n6\r\nworld!\r\n",
                         b"0\r\nX-Trailer: t\r\n\r\n"):
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.01)

    async with RawBackend(handler) as backend, aiohttp.ClientSession() as client:
        url = await make(backend.port)
        for _ in range(3):  # keep-alive on both sides
            async with client.get(f"http://{url}/x") as r:
                assert r.status == 200 and await r.read() == b"hello world!"
        assert backend.connections == 1


async def test_close_delimited_body(gate_host: tuple[Any, Callable[[int],
                                   Awaitable[str]]]) -> None:
    _host, make = gate_host

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        for i in range(5):
            writer.write(f"part{i};".encode())
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.close()

    async with RawBackend(handler) as backend, aiohttp.ClientSession() as client:
        url = await make(backend.port)
        async with client.get(f"http://{url}/x") as r:
            assert await r.read() == b"part0;part1;part2;part3;part4;"


async def test_large_body_to_a_slow_client(gate_host: tuple[Any, Callable[[int],
                                          Awaitable[str]]]) -> None:
    """Back-pressure: the upstream is paused while the client does not read."""
    _host, make = gate_host
    blob = os.urandom(8 * 1024 * 1024)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(blob)}\r\n\r\n".encode())
        for i in range(0, len(blob), 65536):
            writer.write(blob[i:i + 65536])
            await writer.drain()

    async with RawBackend(handler) as backend:
        url = await make(backend.port)
        host, port = url.split(":")
        reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
        writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.5)  # read nothing for a while
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"200" in head.split(b"\r\n")[0]
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        assert hashlib.sha256(body).digest() == hashlib.sha256(blob).digest()
        writer.close()


async def test_chunked_upload_and_http10_client(gate_host: tuple[Any, Callable[[int],
                                               Awaitable[str]]]) -> None:
    _host, make = gate_host
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _head, body = await read_request(reader)
            seen.append(body)
            reply = str(len(body)).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(reply)).encode()
                         + b"\r\n\r\n" + reply)
            await writer.drain()

    async def parts() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"z" * 1000
            await asyncio.sleep(0)

    async with RawBackend(handler) as backend, aiohttp.ClientSession() as client:
        url = await make(backend.port)
        async with client.post(f"http://{url}/up", data=parts()) as r:  # chunked upload
            assert await r.read() == b"10000"
        assert seen[-1] == b"z" * 10000
        host, port = url.split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /old HTTP/1.0\r\n\r\n")
        reply = await reader.read()  # the gate closes the connection after the response
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"\r\n\r\n0")
        assert b"\r\nConnection: close\r\n" in reply
        writer.close()


async def test_server_dropping_idle_connections(gate_host: tuple[Any, Callable[[int],
                                               Awaitable[str]]]) -> None:
    """A kept connection the server closed is never used for the next request."""
    _host, make = gate_host

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # no "Connection: close": it just drops the idle connection

    async with RawBackend(handler) as backend, aiohttp.ClientSession() as client:
        url = await make(backend.port)
        for _ in range(5):
            async with client.post(f"http://{url}/x", data=b"body") as r:
                assert r.status == 200 and await r.read() == b"ok"
            await asyncio.sleep(0.1)
        assert backend.connections == 5


async def test_interim_responses_are_skipped(gate_host: tuple[Any, Callable[[int],
                                            Awaitable[str]]]) -> None:
    _host, make = gate_host

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                     b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal")

    async with RawBackend(handler) as backend, aiohttp.ClientSession() as client:
        url = await make(backend.port)
        async with client.post(f"http://{url}/x", data=b"q",
                               headers={"Expect": "100-continue"}) as r:
            assert r.status == 200 and await r.read() == b"final"
