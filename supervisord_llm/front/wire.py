"""The control socket between the daemon and the front: SOCK_SEQPACKET, one JSON object per
message, file descriptors beside a message (SCM_RIGHTS). Both ends use `Channel`.

A request carries `id`; its answer carries `re` with the same number (answers may come in any
order: a wait for a gate to go idle is answered when it is idle). Messages without `re` are
events for `on_message`. What cannot be sent at once waits in a bounded queue; a peer that
reads nothing while it fills is dropped (the channel closes), never waited for.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import json
import os
import socket
from collections import deque
from collections.abc import Callable
from typing import Any, Final

MAX_MESSAGE: Final = 4 * 1024 * 1024
MAX_FDS: Final = 64
MAX_QUEUED: Final = 4096  # messages waiting to be sent before the peer is dropped
ASK_TIMEOUT_S: Final = 10.0
_BUFFER: Final = 8 * 1024 * 1024
_SO_SNDBUFFORCE: Final = 32
_SO_RCVBUFFORCE: Final = 33


class ChannelClosed(Exception):
    pass


Message = tuple[dict[str, Any], list[int]]


def tune(sock: socket.socket) -> None:
    """Buffers that take the largest message (root may go beyond the system's maximum)."""
    for force, plain in ((_SO_SNDBUFFORCE, socket.SO_SNDBUF),
                         (_SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, _BUFFER)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, _BUFFER)


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Channel:
    def __init__(self, sock: socket.socket, name: str,
                 on_message: Callable[[dict[str, Any], list[int]], None] | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        sock.setblocking(False)
        tune(sock)
        self.sock = sock
        self.name = name
        self.on_message = on_message
        self.on_close = on_close
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self._ids = itertools.count(1)
        self._asked: dict[int, asyncio.Future[Message]] = {}
        self._out: deque[tuple[bytes, list[tuple[int, int, bytes]], list[int]]] = deque()
        self._writing = False
        self.loop.add_reader(sock.fileno(), self._readable)

    # --- reading -----------------------------------------------------------------------------

    def _readable(self) -> None:
        for _ in range(64):
            try:
                data, anc, flags, _addr = self.sock.recvmsg(
                    MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, anc, flags = b"", [], 0
            fds: list[int] = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[:len(payload) - len(payload) % arr.itemsize])
                    fds.extend(arr)
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.set_inheritable(fd, False)
            if not data:
                close_fds(fds)
                self.close()
                return
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                close_fds(fds)
                continue
            try:
                doc = json.loads(data)
            except (ValueError, RecursionError):
                doc = None
            if not isinstance(doc, dict):
                close_fds(fds)
                continue
            re = doc.get("re")
            if isinstance(re, int):
                fut = self._asked.pop(re, None)
                if fut is not None and not fut.done():
                    fut.set_result((doc, fds))
                else:
                    close_fds(fds)
                continue
            if self.on_message is None:
                close_fds(fds)
                continue
            self.on_message(doc, fds)
            if self.closed:
                return

    # --- writing -----------------------------------------------------------------------------

    def send(self, doc: dict[str, Any], fds: tuple[int, ...] | list[int] = ()) -> None:
        """Queue one message (the fds are duplicated by the kernel when it is sent: the caller
        keeps its own). ChannelClosed if the channel is closed."""
        if self.closed:
            raise ChannelClosed(f"{self.name}: closed")
        data = json.dumps(doc, separators=(",", ":")).encode()
        if len(data) > MAX_MESSAGE:
            raise ValueError(f"{self.name}: message of {len(data)} bytes is too large")
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] \
            if fds else []
        held: list[int] = []
        if self._out or not self._try(data, anc):
            if len(self._out) >= MAX_QUEUED:
                self.close()
                raise ChannelClosed(f"{self.name}: the peer reads nothing")
            if fds:  # ours until sent: the caller may close its own meanwhile
                held = [os.dup(fd) for fd in fds]
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                        array.array("i", held).tobytes())]
            self._out.append((data, anc, held))
            if not self._writing:
                self._writing = True
                self.loop.add_writer(self.sock.fileno(), self._writable)

    def _try(self, data: bytes, anc: list[tuple[int, int, bytes]]) -> bool:
        try:
            self.sock.sendmsg([data], anc)
            return True
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self.close()
            raise ChannelClosed(f"{self.name}: closed") from None

    def _writable(self) -> None:
        while self._out:
            data, anc, held = self._out[0]
            try:
                if not self._try(data, anc):
                    return
            except ChannelClosed:
                return
            self._out.popleft()
            close_fds(held)
        self._writing = False
        self.loop.remove_writer(self.sock.fileno())

    async def ask(self, doc: dict[str, Any], fds: tuple[int, ...] | list[int] = (),
                  timeout_s: float | None = ASK_TIMEOUT_S) -> Message:
        """Send a request and wait for its answer (ChannelClosed if the channel closes first,
        TimeoutError after `timeout_s`)."""
        n = next(self._ids)
        fut: asyncio.Future[Message] = self.loop.create_future()
        self._asked[n] = fut
        try:
            self.send({**doc, "id": n}, fds)
            async with asyncio.timeout(timeout_s):
                return await fut
        finally:
            self._asked.pop(n, None)

    def answer(self, request: dict[str, Any], doc: dict[str, Any],
               fds: tuple[int, ...] | list[int] = ()) -> None:
        """Answer `request` (nothing if it carried no id, or the channel is gone)."""
        n = request.get("id")
        if isinstance(n, int) and not self.closed:
            with contextlib.suppress(ChannelClosed):
                self.send({**doc, "re": n}, fds)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())
            if self._writing:
                self.loop.remove_writer(self.sock.fileno())
        self.sock.close()
        for _data, _anc, held in self._out:
            close_fds(held)
        self._out.clear()
        for fut in self._asked.values():
            if not fut.done():
                fut.set_exception(ChannelClosed(f"{self.name}: closed"))
        self._asked.clear()
        if self.on_close is not None:
            self.on_close()
