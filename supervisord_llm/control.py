"""The control socket: a Unix stream server speaking `protocol`, with SO_PEERCRED checks.

Anyone who can open the socket (mode 0660, group `control_group`) may read; mutating commands
need uid 0, the daemon's own uid, or membership of `control_group`. Every malformed or hostile
message gets a `bad_request` reply; a connection's trouble never reaches the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import protocol as P
from .errors import ControlError, StartupError
from .states import State
from .supervisor import Supervisor

log = logging.getLogger(__name__)


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
    def __init__(self, path: str, group: str | None, dispatch: Dispatch) -> None:
        self.path = path
        self.group = group
        self.dispatch = dispatch
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    def allowed_to_mutate(self, peer: Peer) -> bool:
        if peer.uid in (0, os.geteuid()):
            return True
        if self.group is None:
            return False
        try:
            gid = grp.getgrnam(self.group).gr_gid
        except KeyError:
            return False
        return gid in peer.groups()

    async def start(self) -> None:
        path = Path(self.path)
        if _prepare_socket_path(path):
            if await _socket_answers(self.path):
                raise StartupError(f"control socket {path} is in use: is another "
                                   "llm-supervisor running?")
            os.unlink(path)  # stale, from a daemon that died
        old_umask = os.umask(0o117)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=self.path,
                                                           limit=P.MAX_MESSAGE)
        except OSError as exc:
            raise StartupError(f"cannot bind control socket {path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o660)
        if self.group is not None:
            try:
                os.chown(self.path, -1, grp.getgrnam(self.group).gr_gid)
            except (KeyError, OSError) as exc:
                log.error("cannot give %s to group %s: %s", self.path, self.group, exc)

    async def close(self) -> None:
        if self._server is None:
            return  # never bound: the path may belong to another daemon
        self._server.close()
        for task in list(self._clients):
            task.cancel()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            sock = writer.get_extra_info("socket")
            peer = peer_of(sock) if sock is not None else Peer(0, -1, -1)
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        await self._answer(writer, exc.partial, peer)
                    return
                except asyncio.LimitOverrunError:
                    writer.write(P.error_reply(None, P.BAD_REQUEST,
                                               f"message longer than {P.MAX_MESSAGE} bytes"))
                    await writer.drain()
                    return
                if not line.strip():
                    continue
                await self._answer(writer, line, peer)
        except (ConnectionError, OSError):
            return
        finally:
            if task is not None:
                self._clients.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, line: bytes, peer: Peer) -> None:
        try:
            req = P.parse_request(line)
        except P.ProtocolError as exc:
            writer.write(P.error_reply(exc.req_id, P.BAD_REQUEST, exc.message))
            await writer.drain()
            return
        try:
            if req.cmd not in P.COMMANDS:
                raise ControlError(P.UNKNOWN_COMMAND, f"unknown command {req.cmd!r} "
                                   f"(commands: {', '.join(sorted(P.COMMANDS))})")
            if req.cmd in P.MUTATING and not self.allowed_to_mutate(peer):
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
        writer.write(reply)
        await writer.drain()


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


# --- the commands ------------------------------------------------------------------------------


def _arg_services(args: dict[str, Any], sup: Supervisor, *, allow_all: bool = True) -> list[str]:
    raw_all = args.get("all", False)
    if not isinstance(raw_all, bool):
        raise ControlError(P.BAD_REQUEST, "args.all must be true or false")
    raw = args.get("services", [])
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
        raise ControlError(P.BAD_REQUEST, "args.services must be a list of service names")
    if raw_all and allow_all:
        if raw:
            raise ControlError(P.BAD_REQUEST, "give service names or all, not both")
        return list(sup.actors)
    if not raw:
        raise ControlError(P.BAD_REQUEST, "name at least one service (or all: true)")
    for name in raw:
        sup.actor(name)  # raises unknown_service
    return list(dict.fromkeys(raw))


def _arg_bool(args: dict[str, Any], key: str, default: bool) -> bool:
    value = args.get(key, default)
    if not isinstance(value, bool):
        raise ControlError(P.BAD_REQUEST, f"args.{key} must be true or false")
    return value


def _arg_timeout(args: dict[str, Any], default: float) -> float:
    value = args.get("timeout_s", default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
        raise ControlError(P.BAD_REQUEST, "args.timeout_s must be a number of seconds in "
                           "(0, 86400]")
    return float(value)


class Commands:
    """What each control command does, over the supervisor."""

    def __init__(self, sup: Supervisor, reload_fn: Callable[[], Awaitable[dict[str, Any]]]
                 ) -> None:
        self.sup = sup
        self.reload_fn = reload_fn

    async def dispatch(self, req: P.Request, peer: Peer) -> Any:
        handler = getattr(self, "cmd_" + req.cmd.replace("-", "_"), None)
        if handler is None:
            raise ControlError(P.UNSUPPORTED, f"{req.cmd} is not available in this version "
                               "of llm-supervisor")
        log.debug("control: %s %s from pid %d uid %d", req.cmd, req.args, peer.pid, peer.uid)
        result: Any = await handler(req.args)
        return result

    def _brief(self, names: list[str]) -> dict[str, Any]:
        out = []
        for n in names:
            if n in self.sup.actors:
                item: dict[str, Any] = {"name": n, "state": self.sup.actor(n).state.value}
                gate = self.sup.gate_of(n)
                if gate is not None:
                    item["gate"] = gate.state
                    item["inflight"] = gate.inflight
                out.append(item)
        return {"services": out}

    async def cmd_status(self, args: dict[str, Any]) -> Any:
        service = args.get("service")
        if service is not None and not isinstance(service, str):
            raise ControlError(P.BAD_REQUEST, "args.service must be a service name")
        extra = set(args) - {"service"}
        if extra:
            raise ControlError(P.BAD_REQUEST, f"unknown args: {', '.join(sorted(extra))}")
        return self.sup.status(service)

    async def cmd_start(self, args: dict[str, Any]) -> Any:
        names = _arg_services(args, self.sup)
        for name in names:
            await self.sup.actor(name).command("start")
        return self._brief(names)

    async def cmd_stop(self, args: dict[str, Any]) -> Any:
        names = _arg_services(args, self.sup)
        wait = _arg_bool(args, "wait", True)
        actors = [self.sup.actor(n) for n in names]
        for actor in actors:
            await actor.command("stop")
        if wait:
            timeout = _arg_timeout(args, max(a.cfg.stop.timeout_s for a in actors) + 5.0)
            try:
                async with asyncio.timeout(timeout):
                    for actor in actors:
                        await actor.wait_stopped(None)
            except TimeoutError:
                left = [a.name for a in actors if a.state is not State.STOPPED]
                raise ControlError(P.TIMEOUT, f"not stopped after {timeout:g} s: "
                                   f"{', '.join(left)}") from None
        return self._brief(names)

    async def cmd_restart(self, args: dict[str, Any]) -> Any:
        names = _arg_services(args, self.sup)
        wait = _arg_bool(args, "wait", True)
        actors = [self.sup.actor(n) for n in names]
        gens = {}
        for actor in actors:
            gens[actor.name] = actor.gen
            await actor.command("restart")
        if not wait:
            return self._brief(names)
        default = max(a.cfg.stop.timeout_s + a.cfg.health.startup_timeout_s for a in actors) + 5
        timeout = _arg_timeout(args, default)
        try:
            async with asyncio.timeout(timeout):
                for actor in actors:
                    await actor.wait_settled(gens[actor.name], None)
        except TimeoutError:
            left = [f"{a.name} ({a.state})" for a in actors if a.state is not State.READY]
            raise ControlError(P.TIMEOUT, f"not ready after {timeout:g} s: {', '.join(left)}; "
                               "see `llmctl status`") from None
        bad = [a for a in actors if a.state is not State.READY]
        if bad:
            raise ControlError(P.FAILED, "; ".join(
                f"{a.name} is {a.state}" + (f": {a.failed_reason}" if a.failed_reason else "")
                for a in bad))
        return self._brief(names)

    async def cmd_reset(self, args: dict[str, Any]) -> Any:
        names = _arg_services(args, self.sup)
        for name in names:
            await self.sup.actor(name).command("reset")
        return self._brief(names)

    async def cmd_drain(self, args: dict[str, Any]) -> Any:
        names = _arg_services(args, self.sup)
        if args.get("all") is True:
            names = [n for n in names if self.sup.gate_of(n) is not None]
        timeout = _arg_timeout(args, self.sup.cfg.power.drain_timeout_s)
        left = await self.sup.drain(names, timeout)
        if left:
            raise ControlError(P.TIMEOUT, f"still in flight after {timeout:g} s: " + ", ".join(
                f"{n} {c} request{'s' if c != 1 else ''}" for n, c in left.items())
                + " (the gate stays closed to new requests; `llmctl resume` reopens it)")
        return self._brief(names)

    async def cmd_resume(self, args: dict[str, Any]) -> Any:
        names = _arg_services(args, self.sup)
        if args.get("all") is True:
            names = [n for n in names if self.sup.gate_of(n) is not None]
        await self.sup.resume(names)
        return self._brief(names)

    async def cmd_swap(self, args: dict[str, Any]) -> Any:
        name = args.get("service")
        if not isinstance(name, str):
            raise ControlError(P.BAD_REQUEST, "args.service must be a service name")
        timeout = args.get("timeout_s")
        if timeout is not None:
            timeout = _arg_timeout(args, 0)
        return await self.sup.swap(name, None, timeout)

    async def cmd_reload(self, args: dict[str, Any]) -> Any:
        if args:
            raise ControlError(P.BAD_REQUEST, "reload takes no arguments")
        return await self.reload_fn()
