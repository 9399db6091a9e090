"""The gate against hostile clients and broken backends, in process (GateHost on its own
thread, raw asyncio servers as backends, raw sockets as clients): bounded buffers whatever the
framing, strict parsing of what backends send, timeouts toward clients, the connection limit,
trailers, pipelining, a bounded rate of log lines."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collect import Wired
from helpers import ANY_PATH, RawBackend, async_stays, async_wait_until, free_port, front_host
from supervisord_llm.config import GateSection, RouterSection, parse_listen
from supervisord_llm.gate import GateHost
from supervisord_llm.gate.server import FRESH_GRACE_S


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


@dataclass
class Env:
    host: Any  # the front process (FrontClient), or the gate loop in this process (GateHost)
    gate: Any
    port: int

    @property
    def front(self) -> bool:
        return not isinstance(self.host, GateHost)

    def connections(self) -> int:
        """Client connections open on the gate's listener."""
        if self.front:
            return int(self.gate.connections)
        return len(self.host._listeners[self.gate.name].connections)


@pytest.fixture(params=["front", "in-process"])
async def host(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """Every test of this file runs against the front process (as the daemon runs it) and
    against the gate loop in this process (where the white-box checks can look inside)."""
    if request.param == "front":
        async with front_host() as h:
            yield h
    else:
        h = GateHost()
        try:
            yield h
        finally:
            await h.close()


@pytest.fixture
async def gate_env(host: Any) -> AsyncIterator[Callable[..., Awaitable[Env]]]:
    async def make(backend_port: int, **settings: object) -> Env:
        listen = parse_listen(f"127.0.0.1:{free_port()}")
        cfg = replace(GateSection(listen, allow_paths=ANY_PATH), **settings)  # type: ignore[arg-type]
        gate = await host.add(f"g{listen.port}", cfg)
        host.call(gate.set_upstreams, ("127.0.0.1", backend_port), None)
        await async_wait_until(lambda: gate.state == "open", 2, what="gate open")
        return Env(host, gate, listen.port)

    yield make


async def logged(env: Env, caplog: pytest.LogCaptureFixture,
                 needle: str) -> tuple[list[str], bool]:
    """The gate's log lines that hold `needle`, and whether anything came at ERROR or with a
    traceback: from this process's records, or from the front's log (written by its log
    thread, to its own file: read until a line has come, or 2 s)."""
    if not env.front:
        recs = [r for r in caplog.records if needle in r.getMessage()]
        bad = any(r.exc_info for r in recs) or any(r.levelno >= logging.ERROR
                                                   for r in caplog.records)
        return [r.getMessage() for r in recs], bad
    deadline = time.monotonic() + 2.0
    while True:
        text = env.host.test_log.read_text(errors="replace")
        lines = [line for line in text.splitlines() if needle in line]
        if lines or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    return lines, "Traceback" in text or " ERROR " in text


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)


async def get(port: int, request: bytes = b"GET /x HTTP/1.1\r\nHost: g\r\n\r\n",
              timeout: float = 5) -> tuple[int, bytes]:
    """Send one request on a new connection; (status, whole reply until close or length)."""
    reader, writer = await connect(port)
    writer.write(request)
    try:
        async with asyncio.timeout(timeout):
            head = await read_head(reader)
            status = int(head.split(b" ", 2)[1])
            rest = b""
            low = head.lower()
            if b"content-length:" in low:
                n = int(low.split(b"content-length:")[1].split(b"\r\n")[0])
                rest = await reader.readexactly(n)
            return status, head + rest
    finally:
        writer.close()


# --- back-pressure: a client that does not read costs a bounded amount ------------------------

FLOODS = {
    "close-delimited": b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    "length": b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\n",
}


@pytest.mark.parametrize("framing", list(FLOODS))
async def test_client_that_stops_reading_stops_the_backend(
        gate_env: Callable[..., Awaitable[Env]], framing: str) -> None:
    """The issue: a close-delimited stream to a client that read 1 KB took the daemon from
    40 MB to 4.4 GB in 8 s. Now the backend is paused: what it manages to send stops growing
    at a few socket buffers, and it learns the client left once the client goes."""
    block = b"x" * 65536

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(FLOODS[framing])
        while True:
            writer.write(b"10000\r\n" + block + b"\r\n" if framing == "chunked" else block)
            await writer.drain()
            backend.sent += len(block)

    async with RawBackend(flood) as backend:
        env = await gate_env(backend.port)
        reader, writer = await connect(env.port)
        writer.write(b"GET /flood HTTP/1.1\r\nHost: g\r\n\r\n")
        await reader.readexactly(1024)  # the client reads 1 KB, then nothing

        async def settled() -> bool:
            before = backend.sent
            await asyncio.sleep(0.5)
            return backend.sent == before

        await async_wait_until(settled, 10, what="the backend paused")
        assert backend.sent < 64 * 2**20, backend.sent  # a few socket buffers, not GBs
        assert env.gate.inflight == 1
        writer.close()  # the client goes away: slot freed, upstream connection closed
        await async_wait_until(lambda: env.gate.inflight == 0, 5, what="slot freed")
        await async_wait_until(lambda: backend.closed_connections == 1, 5,
                               what="the backend saw the end")
        assert env.gate.stats.requests.get("499") == 1


async def test_client_that_accepts_nothing_is_dropped(
        gate_env: Callable[..., Awaitable[Env]]) -> None:
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(FLOODS["chunked"])
        while True:
            writer.write(b"10000\r\n" + b"y" * 65536 + b"\r\n")
            await writer.drain()

    async with RawBackend(flood) as backend:
        env = await gate_env(backend.port, send_timeout_s=0.5)
        reader, writer = await connect(env.port)
        writer.write(b"GET /flood HTTP/1.1\r\nHost: g\r\n\r\n")
        await reader.readexactly(100)
        t0 = time.monotonic()
        await async_wait_until(lambda: env.gate.inflight == 0, 10, what="dropped")
        assert time.monotonic() - t0 < 5
        await async_wait_until(lambda: backend.closed_connections == 1, 5,
                               what="upstream closed")
        writer.close()


# --- what a broken backend sends -------------------------------------------------------------

BROKEN_HEADS = {
    "negative length": b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello",
    "two lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "length and chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "bare LF in the head": b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 5\r\n\r\nhello",
    "bare LF status line": b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello",
    "not HTTP": b"SSH-2.0-OpenSSH_9.2\r\n",
    "switching protocols": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
    "huge head": b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 200_000 + b"\r\n\r\n",
    "closed at once": b"",
}


@pytest.mark.parametrize("case", list(BROKEN_HEADS))
async def test_broken_backend_head_is_a_clean_502(
        gate_env: Callable[..., Awaitable[Env]], case: str,
        caplog: pytest.LogCaptureFixture) -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(BROKEN_HEADS[case])
            await writer.drain()
            if case == "closed at once":
                return
            await asyncio.sleep(0.05)

    caplog.set_level(logging.WARNING, logger="supervisord_llm.gate")
    async with RawBackend(broken) as backend:
        env = await gate_env(backend.port)
        for _ in range(12):
            status, reply = await get(env.port)
            assert status == 502, reply
            err = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
            assert err["code"] == "upstream_error" and err["type"] == "server_error"
        await async_wait_until(lambda: env.gate.inflight == 0, 5, what="slot freed")
        await async_wait_until(lambda: env.gate.stats.requests == {"502": 12}, 5,
                               what="every request counted once")
    lines, bad = await logged(env, caplog, "upstream")
    assert 1 <= len(lines) <= 5  # logged, at a bounded rate
    assert not bad


async def test_backend_breaking_framing_mid_body_is_cut(
        gate_env: Callable[..., Awaitable[Env]]) -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: text/event-stream\r\n\r\n"
                     b"c\r\ndata: one\n\n\r\nzz\r\nnot a chunk\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    async with RawBackend(broken) as backend:
        env = await gate_env(backend.port)
        reader, writer = await connect(env.port)
        writer.write(b"GET /s HTTP/1.1\r\nHost: g\r\n\r\n")
        async with asyncio.timeout(5):  # the gate ends the stream with an error event
            reply = await reader.readuntil(b"0\r\n\r\n")
        body = reply.split(b"\r\n\r\n", 1)[1]
        assert b"data: one\n\n" in body and b'"code": "upstream_cut"' in body
        # and the client's connection stays open: its head said keep-alive, and its next
        # request must not find it closed
        assert not reader.at_eof()
        await async_wait_until(lambda: env.gate.inflight == 0, 5, what="slot freed")
        await async_wait_until(lambda: env.gate.stats.rejected.get("upstream_cut") == 1, 5,
                               what="counted as cut")
        writer.write(b"GET /s HTTP/1.1\r\nHost: g\r\n\r\n")
        async with asyncio.timeout(5):
            again = await reader.readuntil(b"\r\n\r\n")
        assert again.startswith(b"HTTP/1.1 200")
        writer.close()


# --- timeouts and limits toward clients ------------------------------------------------------


async def ok_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     heads: list[bytes] | None = None) -> None:
    while True:
        head = await read_head(reader)
        if heads is not None:
            heads.append(head)
        low = head.lower()
        if b"content-length:" in low:
            n = int(low.split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(n)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()


async def test_slowloris_connections_are_closed(gate_env: Callable[..., Awaitable[Env]]) -> None:
    async with RawBackend(ok_backend) as backend:
        env = await gate_env(backend.port, header_timeout_s=0.4)
        conns = [await connect(env.port) for _ in range(100)]
        for i, (_r, w) in enumerate(conns):
            if i % 2:
                w.write(b"GET / HTTP/1.1\r\nX-Slow: ")  # a head that never ends
        t0 = time.monotonic()
        replies = await asyncio.gather(*(r.read() for r, _w in conns))
        assert time.monotonic() - t0 < 3
        # idle connections are closed silently; a begun head gets 408
        assert all(x == b"" for x in replies[::2])
        assert all(x.startswith(b"HTTP/1.1 408") for x in replies[1::2])
        for _r, w in conns:
            w.close()
        assert (await get(env.port))[0] == 200


async def test_trickling_bodies_take_no_admission_slots(
        gate_env: Callable[..., Awaitable[Env]]) -> None:
    """64 clients trickling request bodies used to take every slot, so real requests got 429.
    A body is read before the request takes a slot; a stalled body ends in 408."""
    async with RawBackend(ok_backend) as backend:
        env = await gate_env(backend.port, max_concurrency=2, max_queue=0, body_timeout_s=1.0)
        tricklers = []
        for _ in range(64):
            r, w = await connect(env.port)
            w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\n"
                    b"Content-Length: 1000\r\n\r\n{")
            tricklers.append((r, w))
        await async_stays(lambda: env.gate.inflight == 0, 0.3, "a trickler holds a slot")
        status, _ = await get(env.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\n"
                              b"Content-Length: 2\r\n\r\n{}")
        assert status == 200  # not 429: the tricklers hold no slot
        replies = await asyncio.gather(*(asyncio.wait_for(r.read(), 5) for r, _w in tricklers))
        assert all(x.startswith(b"HTTP/1.1 408") for x in replies)  # body stalled > 1 s
        for _r, w in tricklers:
            w.close()
        await async_wait_until(lambda: env.gate.stats.requests.get("408") == 64, 5,
                               what="408s counted")


async def test_max_connections_waits_in_the_backlog(
        gate_env: Callable[..., Awaitable[Env]]) -> None:
    async with RawBackend(ok_backend) as backend:
        env = await gate_env(backend.port, max_connections=3)
        idle = [await connect(env.port) for _ in range(3)]
        await async_wait_until(lambda: True, 0.1)
        reader, writer = await connect(env.port)  # the kernel accepts it into the backlog
        writer.write(b"GET /x HTTP/1.1\r\nHost: g\r\n\r\n")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)
        idle[0][1].close()  # one leaves: the waiting one is taken in
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        for _r, w in [*idle[1:], (reader, writer)]:
            w.close()


async def test_trailers_never_become_headers(gate_env: Callable[..., Awaitable[Env]]) -> None:
    heads: list[bytes] = []

    async def backend_(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await ok_backend(reader, writer, heads)

    async with RawBackend(backend_) as backend:
        env = await gate_env(backend.port)
        reader, writer = await connect(env.port)
        writer.write(b"POST /a HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"2\r\n{}\r\n0\r\nX-Leak: stolen\r\n\r\n"
                     b"GET /b HTTP/1.1\r\nHost: g\r\n\r\n")  # pipelined on the same connection
        replies = b""
        async with asyncio.timeout(5):
            while replies.count(b"\r\n\r\nok") < 2:
                replies += await reader.read(4096)
        writer.close()
        assert len(heads) == 2
        assert heads[0].startswith(b"POST /a ") and heads[1].startswith(b"GET /b ")
        assert all(b"x-leak" not in h.lower() for h in heads)


async def test_malformed_requests_get_400_and_few_log_lines(
        gate_env: Callable[..., Awaitable[Env]], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="supervisord_llm.gate")
    bad = [
        b"\x00\x01\x02 garbage\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\nHost: x\n\n",
        b"GET / HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 500 + b"\r\n",
    ]
    async with RawBackend(ok_backend) as backend:
        env = await gate_env(backend.port)
        for _ in range(5):
            for raw in bad:
                reader, writer = await connect(env.port)
                writer.write(raw)
                reply = await asyncio.wait_for(reader.read(), 5)
                assert reply.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), (raw[:40], reply)
                writer.close()
        assert (await get(env.port))[0] == 200
    lines, error = await logged(env, caplog, "bad request")
    assert 1 <= len(lines) <= 5 and not error


async def test_head_expect_and_http10(gate_env: Callable[..., Awaitable[Env]]) -> None:
    async def backend_(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_head(reader)
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
            else:
                low = head.lower()
                if b"content-length:" in low:
                    n = int(low.split(b"content-length:")[1].split(b"\r\n")[0])
                    await reader.readexactly(n)
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"3\r\nabc\r\n0\r\n\r\n")
            await writer.drain()

    async with RawBackend(backend_) as backend:
        env = await gate_env(backend.port)
        reader, writer = await connect(env.port)
        writer.write(b"HEAD /h HTTP/1.1\r\nHost: g\r\n\r\n")
        head = await asyncio.wait_for(read_head(reader), 5)
        assert b"Content-Length: 1234" in head  # no body follows a HEAD answer
        writer.write(b"POST /p HTTP/1.1\r\nHost: g\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 4\r\n\r\n")
        assert await asyncio.wait_for(read_head(reader), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"body")
        head = await asyncio.wait_for(read_head(reader), 5)
        assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head
        assert await reader.readexactly(13) == b"3\r\nabc\r\n0\r\n\r\n"
        writer.close()
        reader, writer = await connect(env.port)
        writer.write(b"GET /old HTTP/1.0\r\n\r\n")
        reply = await asyncio.wait_for(reader.read(), 5)
        assert reply.endswith(b"\r\n\r\nabc") and b"Connection: close" in reply
        writer.close()


# --- fuzz: whatever a backend sends, the client gets an answer and the slot comes back -------

_STATUS = st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.1 204 No Content", b"HTTP/1.0 200 OK",
                           b"HTTP/1.1 100 Continue", b"HTTP/1.1 103 Early Hints",
                           b"HTTP/1.1 304 Not Modified", b"HTTP/1.1 500 Oops",
                           b"HTTP/1.1 999 Odd", b"HTTP/1.1 abc", b"HTTP/2 200", b"ICY 200 OK"])
_HEADER = st.one_of(
    st.sampled_from([b"Content-Length: 5", b"Content-Length: 0", b"Content-Length: -1",
                     b"Content-Length: 99999999999999999999", b"Content-Length: 5, 5",
                     b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked",
                     b"Transfer-Encoding: chunked, gzip", b"Connection: close",
                     b"Connection: keep-alive", b"Content-Type: text/event-stream",
                     b"Trailer: X-T", b"X-Empty:", b": no-name", b"No-Colon",
                     b"X-Obs-Fold: a\r\n b"]),
    st.binary(max_size=40).map(lambda b: b"X-Fuzz: " + b),
)
_BODY = st.one_of(
    st.sampled_from([b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"5\r\nhel", b"zz\r\nbad\r\n",
                     b"0\r\nX-T: t\r\n\r\n", b"data: x\n\n", b"5;ext=1\r\nhello\r\n",
                     b"ffffffffffffffffff\r\n"]),
    st.binary(max_size=300),
)
_LINE_END = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])


@st.composite
def _responses(draw: st.DrawFn) -> list[bytes]:
    """A response as the backend writes it, in fragments: mostly HTTP-shaped, often broken."""
    out = []
    for _ in range(draw(st.integers(1, 2))):  # sometimes an interim response first
        end = draw(_LINE_END)
        head = draw(_STATUS) + end
        for h in draw(st.lists(_HEADER, max_size=5)):
            head += h + draw(_LINE_END)
        out.append(head + end)
    out += draw(st.lists(_BODY, max_size=4))
    if draw(st.booleans()):
        out = [draw(st.binary(min_size=1, max_size=200))]  # plain garbage
    return out


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(fragments=_responses(), method=st.sampled_from([b"GET", b"POST", b"HEAD"]),
       keep_open=st.booleans())
def test_fuzz_misbehaving_backend(fragments: list[bytes], method: bytes,
                                  keep_open: bool) -> None:
    asyncio.run(_fuzz_once(fragments, method, keep_open))


async def _fuzz_once(fragments: list[bytes], method: bytes, keep_open: bool) -> None:
    async def backend_(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        if b"Content-Length: 2" in head:
            await reader.readexactly(2)
        for part in fragments:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.001)
        if keep_open:
            await asyncio.sleep(0.3)  # then the connection closes (the gate has no
            # upstream deadline of its own yet: the backend ends every case)

    host = GateHost()
    try:
        async with RawBackend(backend_) as backend:
            listen = parse_listen(f"127.0.0.1:{free_port()}")
            gate = await host.add("fuzz", GateSection(listen, allow_paths=ANY_PATH))
            host.call(gate.set_upstreams, ("127.0.0.1", backend.port), None)
            await async_wait_until(lambda: gate.state == "open", 2, what="open")
            reader, writer = await connect(listen.port)
            body = b"{}" if method == b"POST" else b""
            length = b"Content-Length: 2\r\n" if body else b""
            writer.write(method + b" /f HTTP/1.1\r\nHost: g\r\n" + length + b"\r\n" + body)
            async with asyncio.timeout(10):
                reply = b""
                while True:
                    try:
                        data = await reader.read(65536)
                    except ConnectionResetError:
                        break
                    if not data:
                        break
                    reply += data
                    if _complete(reply, method):
                        break
            writer.close()
            if reply:  # whatever came is a well-formed status line from the gate
                assert reply.startswith(b"HTTP/1.1 "), reply[:80]
                assert int(reply[9:12]) in range(200, 600)
            await async_wait_until(lambda: gate.inflight == 0, 5, what="slot freed")
            await async_wait_until(lambda: sum(gate.stats.requests.values()) == 1, 5,
                                   what="counted once")
    finally:
        await host.close()


def _complete(reply: bytes, method: bytes) -> bool:
    """Enough of a reply to stop reading (the gate keeps a good connection open)."""
    head, sep, body = reply.partition(b"\r\n\r\n")
    if not sep:
        return False
    low = head.lower()
    if method == b"HEAD" or b" 204 " in head or b" 304 " in head:
        return True
    if b"content-length:" in low:
        n = int(low.split(b"content-length:")[1].split(b"\r\n")[0])
        return len(body) >= n
    if b"transfer-encoding: chunked" in low:
        return body.endswith(b"0\r\n\r\n")
    return False


# --- what an attack on the hardening found ------------------------------------------------------


async def test_a_client_that_closes_with_fin_is_gone(gate_env: Callable[..., Awaitable[Env]]
                                                     ) -> None:
    """A client that closes normally (FIN) while the backend thinks, or while it waits in the
    queue, or halfway through its body, is gone: its slot, its place in the queue and its
    connection are freed at once, and what never got a slot never reaches the backend."""
    heads: list[bytes] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await read_head(reader))
        await asyncio.wait_for(reader.read(), 60)  # thinks, until the gate closes on it

    async with RawBackend(silent) as backend:
        env = await gate_env(backend.port, max_concurrency=1, max_queue=2)
        first = await connect(env.port)
        first[1].write(b"GET /slow HTTP/1.1\r\nHost: g\r\n\r\n")
        await async_wait_until(lambda: env.gate.inflight == 1 and len(heads) == 1, 5,
                               what="first admitted")
        queued = [await connect(env.port) for _ in range(2)]
        for i, (_r, w) in enumerate(queued):
            w.write(b"GET /ghost%d HTTP/1.1\r\nHost: g\r\n\r\n" % i)
        await async_wait_until(lambda: env.gate.queued == 2, 5, what="two queued")
        for _r, w in queued:
            w.write_eof()  # FIN, not RST
        await async_wait_until(lambda: env.gate.queued == 0, 5, what="queue freed")
        assert env.gate.inflight == 1
        first[1].write_eof()
        await async_wait_until(lambda: env.gate.inflight == 0, 5, what="slot freed")
        await async_wait_until(lambda: backend.closed_connections == 1, 5,
                               what="the upstream request closed")
        assert [h.split(b" ")[1] for h in heads] == [b"/slow"]
        # half a body, then FIN: the connection is freed, not held for body_timeout_s
        half = [await connect(env.port) for _ in range(20)]
        for _r, w in half:
            w.write(b"POST /x HTTP/1.1\r\nHost: g\r\nContent-Length: 10\r\n\r\n12")
            w.write_eof()
        await async_wait_until(lambda: not env.connections(), 5, what="connections freed")
        for _r, w in [first, *queued, *half]:
            w.close()
        await async_wait_until(lambda: env.gate.stats.requests.get("499", 0) == 23, 5,
                               what="each counted as 499")


async def test_endless_chunk_framing_from_a_backend_is_a_502(
        gate_env: Callable[..., Awaitable[Env]]) -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(10_000):  # a chunk-size line that never ends: 640 MB of zeros
            writer.write(b"0" * 65536)
            await writer.drain()

    async with RawBackend(endless) as backend:
        env = await gate_env(backend.port)
        t0 = time.process_time()
        reader, writer = await connect(env.port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: g\r\n\r\n")
        async with asyncio.timeout(10):
            reply = await reader.read()  # cut: the head was sent, then the connection closed
        assert reply.startswith(b"HTTP/1.1 200") and not reply.endswith(b"0\r\n\r\n")
        await async_wait_until(lambda: env.gate.inflight == 0, 5, what="slot freed")
        assert time.process_time() - t0 < 5  # bounded work, not parsing for ever
        writer.close()


async def test_other_transfer_codings_and_a_closed_gate_with_expect(
        gate_env: Callable[..., Awaitable[Env]]) -> None:
    async def gzip_te(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                         b"3\r\nabc\r\n0\r\n\r\n")
            await writer.drain()

    async with RawBackend(gzip_te) as backend:
        env = await gate_env(backend.port)
        status, _reply = await get(env.port)
        assert status == 502  # never gzip bytes passed on as if they were the body
        await env.host.run(env.gate.drain, "operator")
        reader, writer = await connect(env.port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: g\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 100000\r\n\r\n")
        head = await asyncio.wait_for(read_head(reader), 2)  # at once, not after the body
        assert head.startswith(b"HTTP/1.1 503") and b"Connection: close" in head
        writer.close()


@pytest.mark.parametrize(("te", "status"), [
    (b"gzip", 501), (b"chunked;a=b", 501), (b"gzip, chunked", 501), (b"identity", 501),
    # chunked twice: llhttp refuses it as malformed
    (b"chunked, chunked", 400), (b"chunked\r\nTransfer-Encoding: chunked", 400)])
async def test_a_request_in_another_transfer_coding_is_refused_and_never_goes_up(
        gate_env: Callable[..., Awaitable[Env]], te: bytes, status: int) -> None:
    """Only `chunked` (once) frames a request body here. Another coding left the body's
    length unknown: the request went up without its body, then llhttp refused the body
    (or, with `gzip, chunked`, the coded bytes went up as if they were the body)."""
    seen: list[bytes] = []

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await read_head(reader))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with RawBackend(backend) as be:
        env = await gate_env(be.port)
        reader, writer = await connect(env.port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: " + te +
                     b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        head = await asyncio.wait_for(read_head(reader), 5)
        assert head.startswith(b"HTTP/1.1 %d" % status), head
        n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = json.loads(await reader.readexactly(n))
        assert body["error"]["code"] == ("not_implemented" if status == 501 else "bad_request")
        assert "Transfer-Encoding" in body["error"]["message"]
        assert await asyncio.wait_for(reader.read(), 5) == b""  # then closed
        writer.close()
        await async_stays(lambda: not seen, 0.3, "nothing reached the server")
        status, _ = await get(env.port)  # the gate serves on
        assert status == 200


async def test_a_pipelining_client_that_leaves_is_seen(
        gate_env: Callable[..., Awaitable[Env]]) -> None:
    """A second request pipelined behind one the model is thinking about, then FIN: the gate
    still reads, so it sees the client go (slot freed), also after more than PIPELINE_MAX
    pipelined requests or a pipelined request with a large body (which are refused in their
    turn: test_pipelined_requests_beyond_the_limit_are_answered_in_turn)."""
    from supervisord_llm.gate.server import PIPELINE_MAX

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await asyncio.wait_for(reader.read(), 60)

    async with RawBackend(silent) as backend:
        env = await gate_env(backend.port)
        for extra in (b"GET /echo HTTP/1.1\r\nHost: g\r\n\r\n",
                      b"GET /echo HTTP/1.1\r\nHost: g\r\n\r\n" * (PIPELINE_MAX + 1),
                      b"POST /big HTTP/1.1\r\nHost: g\r\nContent-Length: 200000\r\n\r\n"
                      + b"x" * 100_000):
            _reader, writer = await connect(env.port)
            writer.write(b"GET /think HTTP/1.1\r\nHost: g\r\n\r\n")
            await async_wait_until(lambda: env.gate.inflight == 1, 5, what="one in flight")
            writer.write(extra)
            writer.write_eof()  # after the extra bytes, as TCP delivers them
            await async_wait_until(lambda: env.gate.inflight == 0 and not env.connections(),
                                   5, what="slot and connection freed")
            writer.close()


async def test_head_of_a_204_has_no_length(gate_env: Callable[..., Awaitable[Env]]) -> None:
    async def no_content(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello")
        await writer.drain()

    async with RawBackend(no_content) as backend:
        env = await gate_env(backend.port)
        reader, writer = await connect(env.port)
        writer.write(b"HEAD /x HTTP/1.1\r\nHost: g\r\n\r\n")
        head = await asyncio.wait_for(read_head(reader), 5)
        assert head.startswith(b"HTTP/1.1 204") and b"content-length" not in head.lower()
        writer.close()


# --- the request path: upgrades, pipelining, bad chunk sizes, `model` twice ---------------------


@pytest.fixture
async def router_env(host: Any) -> AsyncIterator[Callable[..., Awaitable[Env]]]:
    """A router (model "m") in front of a gate without a listener of its own."""

    async def make(backend_port: int, **settings: object) -> Env:
        gate = await host.add("svc", GateSection(None))
        host.call(gate.set_upstreams, ("127.0.0.1", backend_port), None)
        await async_wait_until(lambda: gate.state == "open", 2, what="gate open")
        listen = parse_listen(f"127.0.0.1:{free_port()}")
        await host.set_router(RouterSection(listen, **{"allow_paths": ANY_PATH, **settings}),  # type: ignore[arg-type]
                              ({"m": "svc"}, [{"id": "m", "service": "svc"}]))
        return Env(host, gate, listen.port)

    yield make


@dataclass
class Seen:
    """What a recording backend received."""

    heads: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)  # bodies that came whole
    cut: int = 0  # requests whose connection closed before their body was whole


async def read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    low = head.lower()
    if b"transfer-encoding: chunked" in low:
        out = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                return out
            out += (await reader.readexactly(size + 2))[:-2]
    if b"content-length:" in low:
        return await reader.readexactly(int(low.split(b"content-length:")[1].split(b"\r\n")[0]))
    return b""


def recorder(seen: Seen, hold: asyncio.Event | None = None
             ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A backend that records each request, answers (once `hold` is set) with the size of
    the body it got and its path."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await read_head(reader)
            except asyncio.IncompleteReadError:
                return
            seen.heads.append(head)
            try:
                body = await read_body(reader, head)
            except asyncio.IncompleteReadError:
                seen.cut += 1
                return
            seen.bodies.append(body)
            if hold is not None:
                await hold.wait()
            reply = b"%s got %d" % (head.split(b" ")[1], len(body))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(reply), reply))
            await writer.drain()

    return serve


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    """One response: (status, head, body) with a Content-Length or chunked body."""
    async with asyncio.timeout(10):
        head = await read_head(reader)
        return int(head.split(b" ", 2)[1]), head, await read_body(reader, head)


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


UPGRADES = {
    # what `curl --http2 -d ... http://` sends
    "h2c": b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
           b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n",
    "websocket": b"Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n"
                 b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
}


@pytest.mark.parametrize("framing", ["length", "chunked", "none"])
@pytest.mark.parametrize("upgrade", list(UPGRADES))
@pytest.mark.parametrize("via", ["gate", "router"])
async def test_an_upgrade_is_not_made_and_the_body_goes_through(
        gate_env: Callable[..., Awaitable[Env]], router_env: Callable[..., Awaitable[Env]],
        via: str, upgrade: str, framing: str) -> None:
    """A POST asking for h2c or websocket used to lose its body (llhttp skips the body of an
    upgrade): the engine got `Content-Length: 0`, the router answered 400 missing_model. The
    upgrade is not made; the request goes on as HTTP/1.1, body and all, without the upgrade
    headers, and the connection serves the next request."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    if framing == "none" and via == "router":
        pytest.skip("the router routes by the body")
    framed = {
        "length": b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
        "chunked": b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body[:10], body[10:]),
        "none": b"\r\n",
    }[framing]
    sent = body if framing != "none" else b""
    seen = Seen()
    async with RawBackend(recorder(seen)) as backend:
        env = await (router_env if via == "router" else gate_env)(backend.port)
        reader, writer = await connect(env.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\n" + UPGRADES[upgrade]
                     + framed + b"POST /v1/next HTTP/1.1\r\nHost: g\r\nContent-Length: %d\r\n"
                     b"\r\n%s" % (len(body), body))
        first = await read_response(reader)
        second = await read_response(reader)
        writer.close()
    assert first[0] == 200 and first[2] == b"/v1/chat/completions got %d" % len(sent), first
    assert second[0] == 200 and second[2] == b"/v1/next got %d" % len(body), second
    assert seen.bodies == [sent, body]
    forwarded = seen.heads[0].lower()
    assert b"upgrade" not in forwarded and b"http2-settings" not in forwarded, forwarded


async def test_connect_is_refused(gate_env: Callable[..., Awaitable[Env]]) -> None:
    seen = Seen()
    async with RawBackend(recorder(seen)) as backend:
        env = await gate_env(backend.port)
        status, reply = await get(env.port, b"CONNECT example.com:443 HTTP/1.1\r\n"
                                            b"Host: example.com:443\r\n\r\n\x16\x03\x01")
        assert status == 501 and b'"code": "not_implemented"' in reply
    assert not seen.heads


TWICE = ('{"model": "m", "messages": [{"role": "user", "content": "%s"}], '
         '"stream": false, "mod\\u0065l": "hidden"}')


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("pad", [0, 300_000], ids=["small", "large"])
async def test_a_body_with_model_twice_never_reaches_the_server(
        router_env: Callable[..., Awaitable[Env]], pad: int, framing: str) -> None:
    """Routed by the first `model`, read by the server by the last: a client could reach a
    model (a LoRA adapter, say) the operator never listed. Refused with 400 invalid_body,
    also when the second comes after the body has begun to stream to the server: the
    server never gets the body whole."""
    body = (TWICE % ("x" * pad)).encode()
    assert json.loads(body)["model"] == "hidden"  # what a server reads
    seen = Seen()
    async with RawBackend(recorder(seen)) as backend:
        env = await router_env(backend.port)
        reader, writer = await connect(env.port)
        cut = len(body) - 50 if pad else len(body)  # the second `model` comes after it
        if framing == "length":
            parts = [b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:cut]), body[cut:]]
        else:
            parts = [b"Transfer-Encoding: chunked\r\n\r\n" + chunked(
                *(body[i:min(i + 5000, cut)] for i in range(0, cut, 5000)))[:-5],
                chunked(body[cut:]) if cut < len(body) else b"0\r\n\r\n"]
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\n" + parts[0])
        if pad:  # the body streams to the server before the second `model` comes
            await async_wait_until(lambda: len(seen.heads) == 1, 5, what="streaming upstream")
        writer.write(parts[1])
        status, _head, reply = await read_response(reader)
        assert status == 400, reply
        err = json.loads(reply)["error"]
        assert err["code"] == "invalid_body" and err["type"] == "invalid_request_error"
        assert "more than one top-level `model`" in err["message"]
        writer.close()
        await async_wait_until(lambda: backend.connections == backend.closed_connections, 5,
                               what="no upstream request left open")
        assert seen.bodies == []  # never whole: nothing for the server to run
        assert seen.cut == (1 if pad else 0)  # the large one had begun to stream
        await async_wait_until(lambda: env.gate.inflight == 0, 5, what="slot freed")
        # `model` once (and twice in a nested object) goes through
        good = json.dumps({"model": "m", "messages": [{"content": "x" * pad}],
                           "tools": [{"model": 1}]}).encode()
        status, _reply = await get(env.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: g"
                                   b"\r\nContent-Length: %d\r\n\r\n%s" % (len(good), good))
        assert status == 200
    assert seen.bodies == [good]


async def test_pipelined_requests_beyond_the_limit_are_answered_in_turn(
        gate_env: Callable[..., Awaitable[Env]]) -> None:
    """More than PIPELINE_MAX pipelined requests dropped the connection with no answer at
    all, not even for the request being answered. Now: every request admitted is answered in
    order, the first one beyond gets 503 `pipeline_full`, and the connection closes."""
    from supervisord_llm.gate.server import PIPELINE_MAX

    release = asyncio.Event()
    seen = Seen()
    async with RawBackend(recorder(seen, hold=release)) as backend:
        env = await gate_env(backend.port)
        if env.front:
            pytest.skip("white-box: waits on the refusal inside the connection (in process)")
        listener = env.host._listeners[env.gate.name]
        reader, writer = await connect(env.port)
        writer.write(b"GET /first HTTP/1.1\r\nHost: g\r\n\r\n")
        await async_wait_until(lambda: len(seen.heads) == 1, 5, what="the first admitted")
        writer.write(b"".join(b"GET /p%d HTTP/1.1\r\nHost: g\r\n\r\n" % i
                              for i in range(PIPELINE_MAX + 3)))
        await async_wait_until(lambda: any(c._final for c in listener.connections), 5,
                               what="the one beyond the limit refused")
        release.set()
        replies = [await read_response(reader) for _ in range(PIPELINE_MAX + 2)]
        assert await asyncio.wait_for(reader.read(), 5) == b""  # then it closes
        writer.close()
    assert [r[2] for r in replies[:-1]] == [b"/first got 0"] + [
        b"/p%d got 0" % i for i in range(PIPELINE_MAX)]
    status, head, body = replies[-1]
    assert status == 503 and b"Connection: close" in head
    assert json.loads(body)["error"]["code"] == "pipeline_full"
    assert len(seen.heads) == PIPELINE_MAX + 1  # none beyond the limit reached the backend


@pytest.mark.parametrize("extra", ["large body", "bad head"])
async def test_what_follows_a_pipelined_request_is_refused_after_its_answer(
        gate_env: Callable[..., Awaitable[Env]], extra: str) -> None:
    """A pipelined request with a body over 64 KiB (it cannot be held while another is
    answered), or a malformed one, used to drop the connection (or close it) without an
    answer for the requests before it."""
    release = asyncio.Event()
    seen = Seen()
    async with RawBackend(recorder(seen, hold=release)) as backend:
        env = await gate_env(backend.port)
        if env.front:
            pytest.skip("white-box: waits on the refusal inside the connection (in process)")
        listener = env.host._listeners[env.gate.name]
        reader, writer = await connect(env.port)
        writer.write(b"GET /first HTTP/1.1\r\nHost: g\r\n\r\n")
        await async_wait_until(lambda: len(seen.heads) == 1, 5, what="the first admitted")
        writer.write(b"GET /second HTTP/1.1\r\nHost: g\r\n\r\n")
        writer.write(b"POST /big HTTP/1.1\r\nHost: g\r\nContent-Length: 200000\r\n\r\n"
                     + b"x" * 100_000 if extra == "large body" else b"\x00\x01 garbage\r\n\r\n")
        await async_wait_until(lambda: any(c._final for c in listener.connections), 5,
                               what="refused in turn")
        release.set()
        replies = [await read_response(reader) for _ in range(3)]
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert [(r[0], r[2]) for r in replies[:2]] == [(200, b"/first got 0"),
                                                    (200, b"/second got 0")]
    status, _head, body = replies[2]
    code = json.loads(body)["error"]["code"]
    assert (status, code) == ((503, "pipeline_full") if extra == "large body"
                              else (400, "bad_request"))


BAD_CHUNK_SIZES = {"overflow": b"ffffffffffffffffff", "0x": b"0x10", "negative": b"-5",
                   "absurdly long": b"1" * 300, "space": b"5 "}


@pytest.mark.parametrize("size", list(BAD_CHUNK_SIZES))
@pytest.mark.parametrize("via", ["gate", "router"])
async def test_a_bad_chunk_size_gets_the_json_400(
        gate_env: Callable[..., Awaitable[Env]], router_env: Callable[..., Awaitable[Env]],
        via: str, size: str) -> None:
    """It used to close the connection with no answer at all."""
    seen = Seen()
    async with RawBackend(recorder(seen)) as backend:
        env = await (router_env if via == "router" else gate_env)(backend.port)
        reader, writer = await connect(env.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n12\r\n{\"model\": \"m\", \"a\"\r\n"
                     + BAD_CHUNK_SIZES[size] + b"\r\n: 1}\r\n0\r\n\r\n")
        reply = await asyncio.wait_for(reader.read(), 5)  # then it closes
        writer.close()
        status, head, body = await read_response(_reader_of(reply))
        assert status == 400 and b"Connection: close" in head, reply
        err = json.loads(body)["error"]
        assert err["code"] == "bad_request" and err["type"] == "invalid_request_error"
        assert err["message"].startswith("bad request: invalid HTTP"), err
        await async_wait_until(lambda: env.gate.inflight == 0, 5, what="no slot held")
    assert seen.bodies == []


async def test_a_bad_chunk_size_while_the_body_streams_upstream(
        gate_env: Callable[..., Awaitable[Env]]) -> None:
    """Past the 64 KiB held before admission the body streams to the server: a bad chunk
    size then still gets the 400, and the server never gets the body whole."""
    seen = Seen()
    async with RawBackend(recorder(seen)) as backend:
        env = await gate_env(backend.port)
        reader, writer = await connect(env.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: g\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n"
                     + chunked(*[b"y" * 16384] * 8)[:-5])  # no last chunk yet
        await async_wait_until(lambda: len(seen.heads) == 1, 5, what="streaming upstream")
        writer.write(b"0x4000\r\n" + b"y" * 16384 + b"\r\n0\r\n\r\n")
        reply = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert reply.startswith(b"HTTP/1.1 400") and b'"code": "bad_request"' in reply, reply
        await async_wait_until(lambda: seen.cut == 1, 5, what="the upstream request cut")
        await async_wait_until(lambda: env.gate.inflight == 0, 5, what="slot freed")
        await async_wait_until(lambda: env.gate.stats.requests == {"400": 1}, 5,
                               what="counted once")
    assert seen.bodies == []


def _reader_of(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_the_header_timeout_counts_from_the_last_answer(
        gate_env: Callable[..., Awaitable[Env]]) -> None:
    """A keep-alive connection busy for longer than header_timeout_s is not cut; once idle,
    it is closed header_timeout_s after its last answer, not before."""
    async with RawBackend(ok_backend) as backend:
        env = await gate_env(backend.port, header_timeout_s=1.0)
        reader, writer = await connect(env.port)
        t0 = time.monotonic()
        sent = t0
        while time.monotonic() - t0 < 2.5:  # busy for 2.5 timeouts, one request at a time
            sent = time.monotonic()
            writer.write(b"GET /x HTTP/1.1\r\nHost: g\r\n\r\n")
            head = await asyncio.wait_for(read_head(reader), 5)
            assert head.startswith(b"HTTP/1.1 200")
            await reader.readexactly(2)
            await asyncio.sleep(0.1)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # then closed, silently
        # not before the timeout: counted from the last answer, which came after it was sent
        # (a small margin: the loop's clock is read once per turn)
        assert time.monotonic() - sent >= 0.95
        writer.close()


async def test_a_kept_connection_closed_at_the_next_request_is_retried_anew(
        gate_env: Callable[..., Awaitable[Env]]) -> None:
    """The server closes a kept-alive connection as the next request arrives on it, before
    answering anything: the gate sends the request again on a new connection (once)."""
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_head(reader)  # the next request on it: dropped unanswered

    async with RawBackend(once) as backend:
        env = await gate_env(backend.port)
        reader, writer = await connect(env.port)
        for _ in range(3):
            writer.write(b"POST /x HTTP/1.1\r\nHost: g\r\nContent-Length: 2\r\n\r\n{}")
            head = await asyncio.wait_for(read_head(reader), 5)
            assert head.startswith(b"HTTP/1.1 200"), head
            await reader.readexactly(2)
        assert backend.connections == 3
        await async_wait_until(lambda: env.gate.inflight == 0
                               and env.gate.stats.requests == {"200": 3}, 5,
                               what="three answered, slots freed")
        writer.close()


async def test_a_large_body_that_came_with_its_head_leaves_the_connection_read(
        gate_env: Callable[..., Awaitable[Env]]) -> None:
    """A body over the gate's buffer that arrives in the read of its head filled the buffer
    and paused reading, and its end did not resume it: the next request on the connection
    was never read (nginx in front got a reset after header_timeout_s), and a client that
    left during the answer was not seen."""
    hung = asyncio.Event()

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_head(reader)
            n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]) \
                if b"content-length:" in head.lower() else 0
            await reader.readexactly(n)
            if head.startswith(b"POST /hang"):
                hung.set()
                await asyncio.sleep(30)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (
                len(str(n)), n))
            await writer.drain()

    async with RawBackend(backend) as be:
        env = await gate_env(be.port)
        reader, writer = await connect(env.port)
        body = b"a" * 70000
        writer.write(b"POST /big HTTP/1.1\r\nHost: g\r\nContent-Length: 70000\r\n\r\n" + body)
        head = await asyncio.wait_for(read_head(reader), 5)
        assert head.startswith(b"HTTP/1.1 200")
        assert await reader.readexactly(5) == b"70000"
        writer.write(b"GET /after HTTP/1.1\r\nHost: g\r\n\r\n")  # read at once, answered
        head = await asyncio.wait_for(read_head(reader), 5)
        assert head.startswith(b"HTTP/1.1 200")
        await reader.readexactly(1)
        # the same body to an upstream that hangs; the client leaves: seen, slot freed
        writer.write(b"POST /hang HTTP/1.1\r\nHost: g\r\nContent-Length: 70000\r\n\r\n" + body)
        await asyncio.wait_for(hung.wait(), 5)
        writer.close()
        await async_wait_until(lambda: env.gate.inflight == 0
                               and env.gate.stats.requests.get("499") == 1, 5,
                               what="the client's leaving seen, its slot freed")


async def test_pipelined_requests_of_a_client_that_leaves_are_counted(
        gate_env: Callable[..., Awaitable[Env]]) -> None:
    """Every request is counted once: those queued behind the one in progress when the
    client leaves count as 499 too."""
    started = asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        started.set()
        await asyncio.sleep(30)

    async with RawBackend(hang) as backend:
        env = await gate_env(backend.port)
        _reader, writer = await connect(env.port)
        writer.write(b"GET /a HTTP/1.1\r\nHost: g\r\n\r\n" * 4)
        await asyncio.wait_for(started.wait(), 5)
        writer.transport.abort()
        await async_wait_until(lambda: env.gate.inflight == 0
                               and env.gate.stats.requests == {"499": 4}, 5,
                               what="four requests, each counted 499")


async def test_a_request_whose_client_leaves_before_its_task_begins_is_counted() -> None:
    """The answer to a pipelined request and the client's reset come in one turn of the
    loop: the next request's task (its body is still coming) is cancelled before it begins.
    Its coroutine is closed (no "never awaited"), and it is counted 499."""
    w = Wired()
    gate, conn, up, client, upstream = w.gate, w.conn, w.up, w.client, w.upstream
    conn.data_received(b"GET /a HTTP/1.1\r\nHost: g\r\n\r\n"
                       b"POST /b HTTP/1.1\r\nHost: g\r\nContent-Length: 10\r\n\r\n12345")
    assert upstream.out and upstream.out[-1].startswith(b"GET /a ")  # by callbacks, at once
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # the next one's task
    assert client.out[-1].endswith(b"\r\n\r\nok")
    conn.connection_lost(ConnectionResetError())  # in the same turn of the loop
    await async_wait_until(lambda: gate.stats.requests == {"200": 1, "499": 1}, 5,
                           what="the second request counted 499")
    assert gate.inflight == 0 and gate.active == 0


async def test_headers_named_in_connection_stay_with_the_hop() -> None:
    """What `Connection` names is hop-by-hop too, wherever it comes in the head; the client's
    X-Forwarded-For is kept, with the peer added."""
    w = Wired()
    w.conn.data_received(b"GET /a HTTP/1.1\r\nHost: g\r\nX-Secret: 1\r\nX-Forwarded-For: 10.0.0.9"
                         b"\r\nConnection: keep-alive, X-Secret\r\nX-Kept: 2\r\n\r\n")
    head = w.upstream.out[-1].lower()
    assert b"x-secret" not in head and b"connection:" not in head, head
    assert b"x-kept: 2\r\n" in head and b"x-forwarded-for: 10.0.0.9, 127.0.0.1\r\n" in head



async def answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A backend that answers every request on its connection with 200 "ok"."""
    while True:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()


def test_a_request_that_came_while_the_loop_was_busy_is_answered_at_a_close() -> None:
    """The listener closes (a hand-over to a new front): a connection accepted a moment
    before gets a grace for its first request. On a loaded machine the request came in time
    but the front's loop (uvloop: its timers run before its reads in a turn), busy, ran the
    grace's timer first: the connection was closed over the unread request, and the client
    got a reset. Now the request is answered, and told it is the last on the connection."""
    import uvloop

    from supervisord_llm.gate.proxy import Gate
    from supervisord_llm.gate.server import open_listener
    from supervisord_llm.gate.upstream import UpstreamPool

    port = free_port()
    up: dict[str, Any] = {}
    ready, busy = threading.Event(), threading.Event()
    poke, poked = socket.socketpair()

    async def front() -> None:
        loop = up["loop"] = asyncio.get_running_loop()
        up["stop"] = stop = asyncio.Event()
        async with RawBackend(answer_ok) as backend:
            pool = UpstreamPool()
            gate = Gate("g", GateSection(None), pool)
            gate.set_upstreams(("127.0.0.1", backend.port), None)
            listener = up["listener"] = open_listener(gate, "127.0.0.1", port, "the gate")

            def close_then_busy() -> None:
                # in a read callback, as on a busy loop: the timers run next, then the reads
                loop.remove_reader(poked.fileno())
                for conn in list(listener.connections):
                    conn.close_when_idle()  # what the listener's close does to each
                busy.set()
                time.sleep(FRESH_GRACE_S + 0.5)  # the request comes meanwhile, unread

            loop.add_reader(poked.fileno(), close_then_busy)
            ready.set()
            await stop.wait()
            await listener.close(1.0)
            pool.close()

    thread = threading.Thread(target=uvloop.run, args=(front(),))
    thread.start()
    try:
        assert ready.wait(10)
        with poke, poked, socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            deadline = time.monotonic() + 5
            while not up["listener"].connections:
                assert time.monotonic() < deadline, "not accepted"
                time.sleep(0.01)
            poke.send(b"!")
            assert busy.wait(5)
            client.sendall(b"GET /x HTTP/1.1\r\nHost: g\r\n\r\n")
            answer = b""
            while chunk := client.recv(4096):  # a reset raises here
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert b"connection: close" in answer.lower()  # the last: the listener is closing
        assert answer.endswith(b"\r\n\r\nok")
    finally:
        up["loop"].call_soon_threadsafe(up["stop"].set)
        thread.join(10)


def test_a_connection_accepted_as_the_listener_closes_is_answered() -> None:
    """A connection accepted a moment before the listener closed, its transport made after
    (uvloop makes it in a task): it was closed at once, over the request that had come, and
    the client got a reset (seen as the upgrade test's other reset); the close did not wait
    for it either. Now it gets the grace of the others, and its request is answered."""
    import uvloop

    from supervisord_llm.gate.proxy import Gate
    from supervisord_llm.gate.server import open_listener
    from supervisord_llm.gate.upstream import UpstreamPool

    port = free_port()
    up: dict[str, Any] = {}
    ready, sent = threading.Event(), threading.Event()

    async def front() -> None:
        loop = asyncio.get_running_loop()
        async with RawBackend(answer_ok) as backend:
            pool = UpstreamPool()
            gate = Gate("g", GateSection(None), pool)
            gate.set_upstreams(("127.0.0.1", backend.port), None)
            listener = open_listener(gate, "127.0.0.1", port, "the gate")
            listener._pause_accepting()  # the client waits in the backlog meanwhile
            sock = listener._socks[0]
            ready.set()
            await loop.run_in_executor(None, sent.wait, 10)
            listener._accept(sock)  # accepted: its transport is made by a task, later
            up["pending"] = listener._pending
            await listener.close(5.0)  # in the same turn: before the transport is made
            pool.close()

    thread = threading.Thread(target=uvloop.run, args=(front(),))
    thread.start()
    try:
        assert ready.wait(10)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"GET /x HTTP/1.1\r\nHost: g\r\n\r\n")
            sent.set()
            answer = b""
            while chunk := client.recv(4096):  # a reset raises here
                answer += chunk
        assert up["pending"] == 1
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert b"connection: close" in answer.lower() and answer.endswith(b"\r\n\r\nok")
    finally:
        sent.set()
        thread.join(10)
