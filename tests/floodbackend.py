"""A backend that floods: for the soak of hostile clients against the daemon.

    python tests/floodbackend.py --port N

`GET /health` and `GET /ok` answer a small 200 (keep-alive); `GET /flood` answers 200 with a
close-delimited body (no Content-Length, no chunking) as fast as the client side takes it;
`GET /sse` streams 20 SSE events, one every 20 ms, chunked; a request body is read and
dropped. Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

BLOCK = b"f" * 65536


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError,
                             asyncio.LimitOverrunError):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            low = head.lower()
            if b"content-length:" in low:
                await reader.readexactly(int(low.split(b"content-length:")[1].split(b"\r\n")[0]))
            elif b"transfer-encoding: chunked" in low:
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            path = head.split(b" ", 2)[1]
            if path == b"/flood":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                             b"Connection: close\r\n\r\n")
                while True:
                    writer.write(BLOCK)
                    await writer.drain()
            elif path == b"/sse":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
                for i in range(20):
                    event = b"data: {\"i\": %d}\n\n" % i
                    writer.write(b"%x\r\n%b\r\n" % (len(event), event))
                    await writer.drain()
                    await asyncio.sleep(0.02)
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
    writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    asyncio.run(main(ap.parse_args().port))
