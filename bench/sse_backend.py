"""A fast HTTP/1.1 backend for proxy benchmarks (raw asyncio protocol, keep-alive):

    python bench/sse_backend.py --port N

- `GET|POST /small`: a 60-byte JSON body with Content-Length (a small non-streamed request);
- `GET|POST /stream?n=N&gap_us=G`: Server-Sent Events, N chunks G microseconds apart (0: as
  fast as possible), each carrying the CLOCK_MONOTONIC time it was written, then
  `data: [DONE]`; chunked transfer encoding, like llama.cpp and vLLM;
- `GET /health`: 200.
It is cheap per request and per chunk, so that what a benchmark measures is the proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from urllib.parse import parse_qs, urlsplit

SMALL = b'{"object":"list","data":[{"id":"bench","object":"model"}],"ok":1}'
SMALL_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                  + str(len(SMALL)).encode() + b"\r\n\r\n" + SMALL)
HEALTH = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n" \
         b'{"status":"ok"}'
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache"
               b"\r\nTransfer-Encoding: chunked\r\n\r\n")
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def chunk(payload: bytes) -> bytes:
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


class Handler(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.body_left = 0
        self.paused = asyncio.Event()
        self.paused.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def pause_writing(self) -> None:
        self.paused.clear()

    def resume_writing(self) -> None:
        self.paused.set()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.process()

    def process(self) -> None:
        while not self.busy:
            if self.body_left:
                take = min(self.body_left, len(self.buf))
                self.buf = self.buf[take:]
                self.body_left -= take
                if self.body_left:
                    return
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buf = self.buf[:end], self.buf[end + 4:]
            lines = head.split(b"\r\n")
            _method, target, _ = lines[0].split(b" ", 2)
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    self.body_left = int(value)
            take = min(self.body_left, len(self.buf))
            self.buf = self.buf[take:]
            self.body_left -= take
            self.respond(target.decode())

    def respond(self, target: str) -> None:
        assert self.transport is not None
        url = urlsplit(target)
        if url.path == "/small":
            self.transport.write(SMALL_RESPONSE)
        elif url.path == "/health":
            self.transport.write(HEALTH)
        elif url.path == "/stream":
            q = parse_qs(url.query)
            self.busy = True
            asyncio.get_running_loop().create_task(
                self.stream(int(q.get("n", ["100"])[0]), int(q.get("gap_us", ["0"])[0])))
        else:
            self.transport.write(NOT_FOUND)

    async def stream(self, n: int, gap_us: int) -> None:
        assert self.transport is not None
        t = self.transport
        t.write(STREAM_HEAD)
        try:
            for i in range(n):
                if t.is_closing():
                    return
                payload = f"data: {{\"i\":{i},\"t\":{time.monotonic_ns()}}}\n\n".encode()
                t.write(chunk(payload))
                if gap_us:
                    await asyncio.sleep(gap_us / 1e6)
                else:
                    await self.paused.wait()
                    if i % 16 == 15:
                        await asyncio.sleep(0)
            t.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        finally:
            self.busy = False
            if not t.is_closing():
                self.process()

    def connection_lost(self, exc: Exception | None) -> None:
        self.paused.set()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    a = ap.parse_args()
    server = await asyncio.get_running_loop().create_server(Handler, a.host, a.port,
                                                            backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
