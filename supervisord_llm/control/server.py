"""The control socket: a Unix stream server speaking `protocol`, with SO_PEERCRED checks.
What each command does is in `commands.py`.

Anyone who can open the socket (mode 0660, group `control_group`) may read; mutating commands
need uid 0, the daemon's own uid, or membership of `control_group`. Every malformed or hostile
message gets a `bad_request` reply; a connection's trouble never reaches the daemon.

What a stranger can make the daemon spend is bounded: MAX_CLIENTS connections at once (more are
answered `busy` and closed), a request line of at most MAX_MESSAGE bytes, IDLE_TIMEOUT_S to
send it, REPLY_TIMEOUT_S to take a reply (a client that does not read is dropped, so replies
never pile up). Running out of file descriptors costs one log line every few seconds, not a
traceback per accept: accepting pauses for ACCEPT_RETRY_S and the kernel keeps new
connections in the listen backlog (BACKLOG) meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import math
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import protocol as P
from ..errors import ControlError, StartupError

log = logging.getLogger(__name__)

BACKLOG = 512  # connections the kernel holds while the daemon cannot accept (EMFILE)
MAX_CLIENTS = 64  # control connections served at once
IDLE_TIMEOUT_S = 60.0  # to send a complete request line
REPLY_TIMEOUT_S = 10.0  # for a client to take its reply; then it is dropped
LOG_INTERVAL_S = 5.0  # at most one line per this for a repeated trouble (EMFILE, drops)
ACCEPT_RETRY_S = 0.5  # after a failed accept (EMFILE), try again after this


class _Throttle:
    """Lets a repeated message through at most once per interval, counting the rest."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.last = -math.inf
        self.suppressed = 0

    def allow(self) -> int | None:
        """None: stay quiet; else how many were suppressed since the last one let through."""
        now = time.monotonic()
        if now - self.last < self.interval_s:
            self.suppressed += 1
            return None
        self.last = now
        count, self.suppressed = self.suppressed, 0
        return count


class _Drop(Exception):
    """The client is dropped (it does not read its replies)."""


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    def groups(self) -> set[int]:
        """The peer's supplementary groups, from /proc (what the kernel checks)."""
        found = {self.gid}
        try:
            with open(f"/proc/{self.pid}/status") as fh:
                for line in fh:
                    if line.startswith("Groups:"):
                        found.update(int(g) for g in line.split()[1:])
                        break
        except (OSError, ValueError):
            pass
        return found


def peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


Dispatch = Callable[[P.Request, Peer], Awaitable[Any]]


class ControlServer:
    """The listener has its own accept loop rather than asyncio's: asyncio's keeps calling
    accept() after EMFILE (up to `backlog` times per wake-up, each with a logged traceback and
    a retry timer of its own). Here a failed accept pauses accepting for ACCEPT_RETRY_S, and
    past MAX_CLIENTS a connection gets a one-line `busy` answer and is closed at once."""

    def __init__(self, path: str, group: str | None, dispatch: Dispatch) -> None:
        self.path = path
        self.group = group
        self.dispatch = dispatch
        self._sock: socket.socket | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._clients: set[asyncio.Task[Any]] = set()
        self._accept_errors = _Throttle(LOG_INTERVAL_S)
        self._drops = _Throttle(LOG_INTERVAL_S)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def allowed_to_mutate(self, peer: Peer) -> bool:
        if peer.uid in (0, os.geteuid()):
            return True
        if self.group is None:
            return False
        # the group lookup (NSS: LDAP, sssd) and /proc are read off the loop
        return await asyncio.to_thread(self._in_group, peer, self.group)

    @staticmethod
    def _in_group(peer: Peer, group: str) -> bool:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            return False
        return gid in peer.groups()

    async def check_free(self) -> None:
        """StartupError if another daemon answers on the socket (before anything is done)."""
        path = Path(self.path)
        if _prepare_socket_path(path) and await _socket_answers(self.path):
            raise StartupError(f"control socket {path} is in use: is another "
                               "llm-supervisor running?")

    async def start(self) -> None:
        path = Path(self.path)
        if _prepare_socket_path(path):
            if await _socket_answers(self.path):
                raise StartupError(f"control socket {path} is in use: is another "
                                   "llm-supervisor running?")
            os.unlink(path)  # stale, from a daemon that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o117)
        try:
            sock.bind(self.path)
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot bind control socket {path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        sock.setblocking(False)
        self._sock = sock
        os.chmod(self.path, 0o660)
        if self.group is not None:
            try:
                os.chown(self.path, -1, grp.getgrnam(self.group).gr_gid)
            except (KeyError, OSError) as exc:
                log.error("cannot give %s to group %s: %s", self.path, self.group, exc)
        loop = self._loop = asyncio.get_running_loop()
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        sock, loop = self._sock, self._loop
        if sock is None or loop is None:
            return
        for _ in range(BACKLOG):  # what is waiting, within reason, per wake-up
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._accept_failed(exc)
                return
            if len(self._clients) >= MAX_CLIENTS:
                _refuse_busy(conn)
                continue
            conn.setblocking(False)
            task = loop.create_task(self._serve(conn))
            self._clients.add(task)
            task.add_done_callback(self._client_done)

    def _client_done(self, task: asyncio.Task[Any]) -> None:
        self._clients.discard(task)
        if self._retry is not None:  # paused by EMFILE: a descriptor was just freed
            self._retry.cancel()
            self._resume_accepting()

    def _accept_failed(self, exc: OSError) -> None:
        """Out of file descriptors (or another accept error): stop trying for a moment; the
        kernel keeps new connections in the listen backlog meanwhile."""
        assert self._sock is not None and self._loop is not None
        self._loop.remove_reader(self._sock.fileno())
        self._retry = self._loop.call_later(ACCEPT_RETRY_S, self._resume_accepting)
        suppressed = self._accept_errors.allow()
        if suppressed is not None:
            log.error("control socket: cannot accept connections: %s; new connections wait in "
                      "the listen backlog, accepting again every %g s (%d more failures since "
                      "the last message; is LimitNOFILE / ulimit -n too low?)",
                      exc.strerror or exc, ACCEPT_RETRY_S, suppressed)

    def _resume_accepting(self) -> None:
        self._retry = None
        if self._sock is not None and self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    async def close(self) -> None:
        sock, loop = self._sock, self._loop
        if sock is None or loop is None:
            return  # never bound: the path may belong to another daemon
        self._sock = None
        loop.remove_reader(sock.fileno())
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        sock.close()
        tasks = list(self._clients)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        self._loop = None

    async def _serve(self, conn: socket.socket) -> None:
        try:
            peer = peer_of(conn)
            reader, writer = await asyncio.open_unix_connection(sock=conn, limit=P.MAX_MESSAGE)
        except OSError:
            conn.close()
            return
        await self._client(reader, writer, peer)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      peer: Peer) -> None:
        try:
            while True:
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT_S):
                        line = await reader.readuntil(b"\n")
                except TimeoutError:
                    return  # idle (or trickling): the connection is closed
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        await self._answer(writer, exc.partial, peer)
                    return
                except asyncio.LimitOverrunError:
                    await self._send(writer, P.error_reply(
                        None, P.BAD_REQUEST, f"message longer than {P.MAX_MESSAGE} bytes"), peer)
                    return
                if not line.strip():
                    continue
                await self._answer(writer, line, peer)
        except (ConnectionError, OSError):
            return
        except _Drop:
            writer.transport.abort()
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _send(self, writer: asyncio.StreamWriter, data: bytes, peer: Peer) -> None:
        """Write a reply; a client that does not take it within REPLY_TIMEOUT_S is dropped."""
        writer.write(data)
        try:
            async with asyncio.timeout(REPLY_TIMEOUT_S):
                await writer.drain()
        except TimeoutError:
            suppressed = self._drops.allow()
            if suppressed is not None:
                log.warning("control: dropped a client (pid %d) that did not read its reply "
                            "within %g s (%d more since the last message)", peer.pid,
                            REPLY_TIMEOUT_S, suppressed)
            raise _Drop from None

    async def _answer(self, writer: asyncio.StreamWriter, line: bytes, peer: Peer) -> None:
        try:
            req = P.parse_request(line)
        except P.ProtocolError as exc:
            await self._send(writer, P.error_reply(exc.req_id, P.BAD_REQUEST, exc.message), peer)
            return
        try:
            if req.cmd not in P.COMMANDS:
                raise ControlError(P.UNKNOWN_COMMAND, f"unknown command {req.cmd[:64]!r} "
                                   f"(commands: {', '.join(sorted(P.COMMANDS))})")
            if req.cmd in P.MUTATING and not await self.allowed_to_mutate(peer):
                who = f"uid {peer.uid}"
                raise ControlError(P.PERMISSION_DENIED, f"{req.cmd} needs root or membership "
                                   f"of group {self.group or '(none configured)'}; {who} "
                                   "may only read status")
            data = await self.dispatch(req, peer)
            reply = P.ok_reply(req.id, data)
        except ControlError as exc:
            reply = P.error_reply(req.id, exc.code, exc.message)
        except Exception as exc:
            log.exception("control command %s failed", req.cmd)
            reply = P.error_reply(req.id, P.INTERNAL, f"{type(exc).__name__}: {exc}")
        await self._send(writer, reply, peer)


def _refuse_busy(conn: socket.socket) -> None:
    """Past MAX_CLIENTS: a one-line answer if the socket takes it at once, then close."""
    with contextlib.suppress(OSError):
        conn.setblocking(False)
        conn.send(P.error_reply(None, P.BUSY, f"too many control connections at once "
                                f"({MAX_CLIENTS}); try again"))
    conn.close()


def _prepare_socket_path(path: Path) -> bool:
    """Create the directory; True if a socket file is already there."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create {path.parent}: {exc.strerror}") from None
    if not (path.exists() or path.is_symlink()):
        return False
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise StartupError(f"{path} exists and is not a socket; remove it")
    return True


async def _socket_answers(path: str) -> bool:
    try:
        _r, w = await asyncio.wait_for(asyncio.open_unix_connection(path), 1.0)
    except (OSError, TimeoutError):
        return False
    w.close()
    return True
