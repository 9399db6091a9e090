"""What each control command does. Every argument is checked (`protocol.parse_args`) and
every service name resolved before a command acts; everything that acts goes through the host
actor, which refuses what conflicts with an operation in progress."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from .. import keys as K
from .. import lifecycle as L
from .. import protocol as P
from ..errors import ConfigError, ControlError
from ..parts import Parts
from ..states import RestartReason, State
from ..status import status
from ..supervisor import SETTLE_GRACE_S
from .server import Peer

log = logging.getLogger(__name__)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


class Commands:
    def __init__(self, parts: Parts, clock: Callable[[], float]) -> None:
        self.parts = parts
        self.sup = parts.sup
        self.host = parts.host
        self._clock = clock

    async def dispatch(self, req: P.Request, peer: Peer) -> Any:
        try:
            args = P.parse_args(req.cmd, req.args)
        except P.ProtocolError as exc:
            raise ControlError(P.BAD_REQUEST, exc.message) from None
        handler = getattr(self, "cmd_" + req.cmd.replace("-", "_"), None)
        if handler is None:
            raise ControlError(P.UNSUPPORTED, f"{req.cmd} is not available in this version "
                               "of llm-supervisor")
        log.debug("control: %s %s from pid %d uid %d", req.cmd, args, peer.pid, peer.uid)
        result: Any = await handler(args)
        return result

    # --- helpers -------------------------------------------------------------------------------

    def _services(self, a: P.Args) -> list[str]:
        """The services named (all of them for `all`); unknown_service before anything."""
        if a.all:
            return list(self.sup.actors)
        for name in a.services:
            self.sup.actor(name)
        return list(a.services)

    def _gated(self, a: P.Args) -> list[str]:
        names = self._services(a)
        if a.all:
            return [n for n in names if self.sup.gate_of(n) is not None]
        for name in names:  # refuse before acting on any of them
            if self.sup.gate_of(name) is None:
                raise ControlError(P.FAILED, f"{name} has no gate ([service.gate] in the "
                                   "config)")
        return names

    async def _brief(self, names: list[str]) -> dict[str, Any]:
        """The services' states, once their gates have followed them."""
        await self.sup.gates_settled()
        out = []
        for n in names:
            if n in self.sup.actors:
                actor = self.sup.actors[n]
                item: dict[str, Any] = {"name": n, "state": actor.state.value}
                if actor.holds:
                    item["holds"] = sorted(actor.holds)
                gate = self.sup.gate_of(n)
                if gate is not None:
                    item["gate"] = gate.state
                    item["inflight"] = gate.inflight
                out.append(item)
        return {"services": out}

    # --- the commands ----------------------------------------------------------------------------

    async def cmd_status(self, a: P.Args) -> Any:
        if self.parts.sup.gates is not None:
            await self.parts.sup.gates.refresh()
        return status(self.parts, self._clock(), a.service)

    async def cmd_start(self, a: P.Args) -> Any:
        names = self._services(a)
        await self.host.command(names, L.Start())
        swapper = self.parts.swapper
        # on demand: loaded now (room made like for a request) and kept loaded
        try:
            await swapper.start(swapper.on_demand_names(names))
        except ControlError as exc:  # say what did start, not only what did not
            brief = await self._brief(names)
            done = ", ".join(f"{s['name']} {s['state']}" for s in brief["services"])
            raise ControlError(exc.code, f"{exc.message}. The services now: {done}"
                               ) from None
        return await self._brief(names)

    async def cmd_stop(self, a: P.Args) -> Any:
        names = self._services(a)
        actors = [self.sup.actor(n) for n in names]
        self.parts.swapper.unpin(names)
        timeout = a.timeout_s or max((x.cfg.stop.timeout_s for x in actors),
                                     default=0) + SETTLE_GRACE_S
        gated = [n for n in names if self.sup.gate_of(n) is not None]
        if a.wait and gated:
            # no request cut off: the gates close to new ones and what is in flight finishes
            # (at most drain_timeout_s), then the services stop
            drain_s = max((g.drain_timeout_s for n in gated
                           if (g := self.sup.actor(n).cfg.gate)), default=0.0)
            inflight = await self.host.drain(gated, "stop", drain_s)
            if inflight:
                log.warning("stopping with requests still in flight after %g s: %s", drain_s,
                            ", ".join(f"{n} {c}" for n, c in inflight.items()))
        try:
            await self.host.command(names, L.Stop("operator"))
        finally:
            if gated:
                await self.host.resume(gated, "stop")  # closed now: the service is stopped
        if a.wait:
            try:
                async with asyncio.timeout(timeout):
                    for actor in actors:
                        await actor.wait_stopped(None)
            except TimeoutError:
                left = [x.name for x in actors if x.state is not State.STOPPED]
                raise ControlError(P.TIMEOUT, f"not stopped after {timeout:g} s: "
                                   f"{', '.join(left)}") from None
        return await self._brief(names)

    async def cmd_restart(self, a: P.Args) -> Any:
        names = self._services(a)
        actors = [self.sup.actor(n) for n in names]
        timeout = a.timeout_s or max(
            (x.cfg.stop.timeout_s + x.cfg.health.startup_timeout_s for x in actors),
            default=0) + SETTLE_GRACE_S
        gens = await self.host.restart(names, RestartReason.MANUAL)
        if not a.wait:
            return await self._brief(names)
        try:
            async with asyncio.timeout(timeout):
                for actor in actors:
                    await actor.wait_settled(gens[actor.name], None)
        except TimeoutError:
            left = [f"{x.name} ({x.state})" for x in actors
                    if x.state not in (State.READY, State.DRAINING)]
            raise ControlError(P.TIMEOUT, f"not ready after {timeout:g} s: {', '.join(left)}; "
                               "see `llmctl status`") from None
        bad = [x for x in actors if x.state not in (State.READY, State.DRAINING)]
        if bad:
            raise ControlError(P.FAILED, "; ".join(
                f"{x.name} is {x.state}" + (f": {x.failed_reason}" if x.failed_reason else "")
                + (f" (held: {', '.join(sorted(x.holds))})" if x.holds else "")
                for x in bad))
        return await self._brief(names)

    async def cmd_reset(self, a: P.Args) -> Any:
        names = self._services(a)
        swapper = self.parts.swapper
        demand = swapper.on_demand_names(names)
        if demand:
            # on demand again: unpinned, and a stopped or failed one waits for a request
            swapper.unpin(demand)
            down = [n for n in demand if self.sup.actor(n).state in (State.STOPPED,
                                                                      State.FAILED)]
            if down:
                await self.host.command(down, L.Stop("idle"))
        await self.host.command(names, L.Reset())
        if demand:
            await self.host.command(demand, L.Start())
        return await self._brief(names)

    async def cmd_drain(self, a: P.Args) -> Any:
        names = self._gated(a)
        timeout = a.timeout_s or max(
            (g.drain_timeout_s for n in names if (g := self.sup.actor(n).cfg.gate)),
            default=60.0)
        left = await self.host.drain(names, "operator", timeout)
        if left:
            raise ControlError(P.TIMEOUT, f"still in flight after {timeout:g} s: " + ", ".join(
                f"{n} {_plural(c, 'request')}" for n, c in left.items())
                + " (the gate stays closed to new requests; `llmctl resume` reopens it)")
        return await self._brief(names)

    async def cmd_resume(self, a: P.Args) -> Any:
        names = self._gated(a)
        await self.host.resume(names, "operator")
        return await self._brief(names)

    async def cmd_swap(self, a: P.Args) -> Any:
        assert a.service is not None  # parse_args requires it
        self.sup.actor(a.service)  # unknown_service
        return await self.host.swap(a.service, a.timeout_s)

    async def cmd_reload(self, a: P.Args) -> Any:
        return await self.host.reload()

    async def cmd_handover(self, a: P.Args) -> Any:
        return self.host.handover()

    async def cmd_checkpoint(self, a: P.Args) -> Any:
        power = self.parts.power
        if not power.checkpoints.hooks:
            raise ControlError(P.FAILED, "no checkpoint is configured ([[checkpoint]] in the "
                               "config)")
        results = await power.checkpoints.run([a.name] if a.name else None, "operator")
        now = time.time()
        return {"checkpoints": [r.as_dict(now) for r in results],
                "ok": all(r.result == "ok" for r in results)}

    async def cmd_power_event(self, a: P.Args) -> Any:
        assert a.event is not None  # parse_args requires it
        return await self.parts.power.event(a.event, a.force)

    # --- API keys ------------------------------------------------------------------------------

    async def _keys(self, fn: Any) -> tuple[K.ApiKey, ...]:
        try:
            result: tuple[K.ApiKey, ...] = await self.parts.access.change(fn)
        except ValueError as exc:
            raise ControlError(P.FAILED, str(exc)) from None
        except ConfigError as exc:
            raise ControlError(P.CONFIG_ERROR, "the keys file is broken as it is now (fix it "
                               "first; the keys in force stay): " + "; ".join(exc.problems[:5])
                               ) from None
        except OSError as exc:
            raise ControlError(P.FAILED, f"cannot write the keys file: {exc.strerror or exc}"
                               ) from None
        return result

    def _key_doc(self, k: K.ApiKey) -> dict[str, Any]:
        return {"id": k.id, "models": list(k.models), "rpm": k.requests_per_minute,
                "tpm": k.tokens_per_minute, "concurrency": k.max_concurrency,
                "expires": k.expires, "previous_until": k.previous_until}

    async def cmd_key_new(self, a: P.Args) -> Any:
        assert a.key_id is not None
        expires = None
        if a.expires is not None:
            try:
                expires = K.parse_expires(a.expires, time.time())
            except ValueError as exc:
                raise ControlError(P.BAD_REQUEST, str(exc)) from None
            if expires <= time.time():
                raise ControlError(P.BAD_REQUEST, "--expires: that moment is past")
        served = self.parts.access.models
        unknown = [m for m in a.models if m != "*" and m not in served]
        if unknown:
            raise ControlError(P.BAD_REQUEST, f"no service serves model(s) {', '.join(unknown[:5])}"
                               f" (the models: {', '.join(sorted(served)[:20]) or 'none'})")
        secret = K.new_secret()
        key = K.ApiKey(a.key_id, K.hash_secret(secret), a.models, a.rpm, a.tpm,
                       a.concurrency, expires)
        await self._keys(lambda keys, _now: K.add_key(keys, key))
        log.info("key %s made (models %s)", key.id, ", ".join(key.models))
        return {**self._key_doc(key), "secret": secret}

    async def cmd_key_revoke(self, a: P.Args) -> Any:
        assert a.key_id is not None
        key_id = a.key_id
        await self._keys(lambda keys, _now: K.revoke_key(keys, key_id))
        log.info("key %s revoked", key_id)
        return {"id": key_id, "revoked": True}

    async def cmd_key_rotate(self, a: P.Args) -> Any:
        assert a.key_id is not None
        key_id, overlap = a.key_id, a.overlap_s
        secret = K.new_secret()
        digest = K.hash_secret(secret)
        keys = await self._keys(lambda keys, now: K.rotate_key(keys, key_id, digest, overlap,
                                                               now))
        key = next(k for k in keys if k.id == key_id)
        log.info("key %s rotated (the old secret valid %g s more)", key_id, overlap)
        return {**self._key_doc(key), "secret": secret}

    async def cmd_key_list(self, a: P.Args) -> Any:
        access = self.parts.access
        front = self.sup.gates
        if front is not None:
            await front.refresh()
        live = front.door_stats.get("keys", {}) if front is not None else {}
        out = []
        for k in access.keys:
            doc = self._key_doc(k)
            used = live.get(k.id) if isinstance(live, dict) else None
            if isinstance(used, dict):
                doc.update(requests=sum(v for v in (used.get("requests") or {}).values()
                                        if isinstance(v, int)),
                           prompt_tokens=used.get("prompt_tokens"),
                           completion_tokens=used.get("completion_tokens"),
                           last_used=used.get("last_used"), inflight=used.get("inflight"),
                           rejected=used.get("rejected"))
            out.append(doc)
        return {"auth": access.keys_file is not None, "keys_file": access.keys_file,
                "keys": out}
