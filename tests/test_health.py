"""The HTTP prober: classification, keep-alive across server restarts, odd servers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from helpers import free_port
from supervisord_llm.health import HttpProber, ProbeKind

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(port: int, answer: bytes, *, close: bool = False, count: list[int] | None = None
                ) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if count is not None:
            count.append(1)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(answer)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)


async def test_statuses_and_keep_alive() -> None:
    port = free_port()
    conns: list[int] = []
    server = await serve(port, b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{\"status\":\"ok\"}",
                         count=conns)
    p = HttpProber()
    url = f"http://127.0.0.1:{port}/health"
    for _ in range(5):
        r = await p.probe(url, 1)
        assert r.kind is ProbeKind.OK and r.detail == "HTTP 200"
    assert len(conns) == 1  # one kept connection for five probes
    # the server restarts: the kept connection is dead, the probe still succeeds
    server.close()
    await server.wait_closed()
    for w in list(p._idle.values()):
        w.close()  # what the old process's exit does to our side, eventually
    server = await serve(port, b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    r = await p.probe(url, 1)
    assert r.kind is ProbeKind.LOADING
    server.close()
    await server.wait_closed()
    for w in list(p._idle.values()):
        w.close()
    r = await p.probe(url, 1)
    assert r.kind is ProbeKind.REFUSED
    await p.close()


async def test_a_kept_connection_outlives_its_probes_deadline() -> None:
    """A probe's deadline is a timer on the connection: once the answer is in, the timer is
    gone, and the kept connection serves the next probe long after that deadline."""
    port = free_port()
    conns: list[int] = []
    server = await serve(port, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", count=conns)
    p = HttpProber()
    url = f"http://127.0.0.1:{port}/health"
    assert (await p.probe(url, 0.1)).ok
    await asyncio.sleep(0.3)
    assert (await p.probe(url, 0.1)).ok
    assert len(conns) == 1
    await p.close()
    await asyncio.sleep(0.05)  # the server's side sees the close and closes too
    server.close()
    await server.wait_closed()


async def test_chunked_close_delimited_and_errors() -> None:
    p = HttpProber()
    cases = [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nok!!\r\n0\r\n\r\n",
         ProbeKind.OK),
        (b"HTTP/1.0 200 OK\r\n\r\nbody until close", ProbeKind.OK),
        (b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 2\r\n\r\nno", ProbeKind.ERROR),
        (b"SSH-2.0-OpenSSH\r\n", ProbeKind.ERROR),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", ProbeKind.ERROR),
        # framing llhttp refuses: never "ok", whatever the status says
        (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", ProbeKind.ERROR),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", ProbeKind.ERROR),
        (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", ProbeKind.ERROR),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 100_000 + b"\r\n\r\n", ProbeKind.ERROR),
        # a /health that floods: refused after 64 KiB, not read until the probe's deadline
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"f" * 1_000_000,
         ProbeKind.ERROR),
    ]
    for answer, kind in cases:
        port = free_port()
        server = await serve(port, answer, close=True)
        r = await p.probe(f"http://127.0.0.1:{port}/health", 1)
        assert r.kind is kind, (answer, r)
        server.close()
        await server.wait_closed()
    await p.close()


async def test_silent_server_times_out() -> None:
    port = free_port()

    done = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await done.wait()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(silent, "127.0.0.1", port)
    p = HttpProber()
    r = await p.probe(f"http://127.0.0.1:{port}/health", 0.2)
    assert r.kind is ProbeKind.TIMEOUT and not r.ok and r.not_yet
    done.set()
    server.close()
    await server.wait_closed()
    await p.close()


async def test_a_timeout_our_own_loop_explains_is_probed_again() -> None:
    """The server answers at once (from its own thread), but the daemon's loop is starved
    for longer than the timeout: the answer waits unread and the timer fires late. That is
    no verdict on the server: the probe is made again, and succeeds."""
    import socket
    import threading
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve_forever() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _a = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                while True:
                    try:
                        data = conn.recv(4096)
                    except OSError:
                        break
                    if not data:
                        break
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve_forever, daemon=True)
    thread.start()
    p = HttpProber()
    try:
        url = f"http://127.0.0.1:{port}/health"
        loop = asyncio.get_running_loop()
        probe = asyncio.create_task(p.probe(url, 0.1))
        await asyncio.sleep(0)  # the probe has sent its request
        loop.call_soon(time.sleep, 0.4)  # then the loop is starved (not the server)
        r = await probe
        assert r.kind is ProbeKind.OK, r
        # a server that really does not answer still times out (twice the wait at most)
        stop.set()
        thread.join(2)
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with silent:
            r = await p.probe(f"http://127.0.0.1:{silent.getsockname()[1]}/health", 0.1)
            assert r.kind is ProbeKind.TIMEOUT
    finally:
        stop.set()
        listener.close()
        await p.close()
