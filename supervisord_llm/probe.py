"""Generation probes (`[service.probe] kind = "completion"`): `/health` says the HTTP server is
up, not that the model generates. A probe is a real 1-token request straight to the service's
port (around the gate: no admission slot, not a user request), sent only when the gate has
seen nothing of a 2xx answer from the service (a complete one, or the bytes of a stream that
is flowing) within `interval_s`; under load, and while a stream runs, it costs nothing.

- The model is `probe.model`, else the first id of the engine's `GET /v1/models` (asked once
  per launch; without an answer, the request goes without a model, which llama-server
  takes).
- `failures` failures in a row (an error status, a refused or reset connection, no answer
  within `timeout_s`, an answer that is not a completion) make the service hung: restarted
  with reason `hung`, as a hot swap when it has a gate and is ready (the requests in flight
  are not cut before the replacement serves), else a plain restart.
- Stalls: behind a gate, when every request in flight has had nothing from the server (no
  head, no byte) for `gate.stall_timeout_s` (a request paused because its client does not
  read is not silent), one probe is sent at once (with or without `[service.probe]`), and if
  it fails the service is hung at once. Long prompts take time before the first token: the
  timeout is generous, and a passing probe clears it.
- Only a `ready` service is probed, one probe at a time per service, none while an
  operation (a swap, a reload) involves it; the count starts afresh with each launch.
- At most 1 MiB of an answer is read; a 2xx answer longer than that is taken as generating.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from . import lifecycle as L
from .config import ProbeSection
from .errors import ControlError
from .health import client_session, read_bounded
from .logs import LogLimiter
from .states import RestartReason, State
from .ticks import sleep_to_tick

if TYPE_CHECKING:
    from .front.client import RemoteGate as Gate
    from .host import Host
    from .service import ServiceActor
    from .supervisor import Supervisor

log = logging.getLogger(__name__)

MAX_ANSWER = 1024 * 1024
TICK_S = 0.5
STALL_PROBE = ProbeSection()  # for a gated service without [service.probe]


@dataclass
class ProbeState:
    gen: int = -1  # the launch these figures are of
    model: str | None = None
    model_asked: bool = False
    last_at: float | None = None  # the last probe or gate success (monotonic)
    last_ok_at: float | None = None
    failures: int = 0  # in a row
    last_error: str | None = None
    probes: int = 0
    running: bool = False
    stall_probe_at: float | None = None  # the last probe a stall asked for


class GenerationProber:
    def __init__(self, sup: Supervisor, host: Host, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sup = sup
        self.host = host
        self._clock = clock
        self.states: dict[str, ProbeState] = {}
        self.results: dict[tuple[str, str], int] = {}  # (service, ok|failed) -> count
        self.hung: dict[str, int] = {}  # service -> times found hung
        self.limiter = LogLimiter(__name__)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def state_of(self, name: str) -> ProbeState:
        st = self.states.get(name)
        if st is None:
            st = self.states[name] = ProbeState()
        return st

    async def run(self) -> None:
        """Every TICK_S on the shared ticks while a service has a probe or a gate; asleep
        (woken by the registry's changes: a reload that adds one) while none has."""
        changed = asyncio.Event()
        self.sup.on_change(changed.set)
        while True:
            if not any(a.cfg.probe is not None or self.sup.gate_of(n) is not None
                       for n, a in self.sup.actors.items()):
                changed.clear()
                await changed.wait()
                continue
            try:
                await self.tick()
            except Exception:  # never let the probes die: the next tick tries again
                self.limiter.exception("tick", "generation probe: tick failed")
            await sleep_to_tick(TICK_S)

    async def tick(self) -> None:
        now = self._clock()
        for name in list(self.states):
            if name not in self.sup.actors:
                del self.states[name]
        for name, actor in list(self.sup.actors.items()):
            probe = actor.cfg.probe
            gate = self.sup.gate_of(name)
            if probe is None and gate is None:
                continue
            st = self.state_of(name)
            if st.gen != actor.gen:  # a new launch: its own count, its own model
                self.states[name] = st = ProbeState(gen=actor.gen, last_at=now)
            if st.running or actor.state is not State.READY or actor.port is None \
                    or name in self.host.ops or "*" in self.host.ops:
                continue
            seen = gate.last_ok if gate is not None else None
            if seen is not None and seen[0][1] == actor.port and \
                    (st.last_at is None or seen[1] > st.last_at):
                st.last_at = seen[1]  # the gate saw it answer: that is a success
                st.last_ok_at = seen[1]
                st.failures = 0
            stall = await self._stalled(name, actor, gate, st, now)
            # requests in flight through the gate: a model may think for long before its
            # first byte (one slot, a long prompt); that is the stall check's to judge, with
            # its generous timeout, not the interval's
            busy = gate is not None and gate.inflight > 0
            if not stall and (probe is None or busy or (st.last_at is not None
                                                        and now - st.last_at < probe.interval_s)):
                continue
            if probe is None:  # a stall, without [service.probe]: a probe of the defaults,
                # answered within the stall timeout when that is shorter
                assert actor.cfg.gate is not None
                probe = dataclasses.replace(STALL_PROBE, timeout_s=min(
                    STALL_PROBE.timeout_s, max(1.0, actor.cfg.gate.stall_timeout_s)))
            st.running = True
            task = asyncio.get_running_loop().create_task(
                self._probe(name, actor, st, probe, stall), name=f"probe-{name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _stalled(self, name: str, actor: ServiceActor, gate: Gate | None,
                       st: ProbeState, now: float) -> bool:
        """Every request in flight through the gate silent from the server for
        `stall_timeout_s` (once per stall_timeout_s): time for a probe that decides."""
        if gate is None or actor.cfg.gate is None or self.sup.gates is None \
                or gate.inflight == 0 or actor.port is None:
            return False
        limit = actor.cfg.gate.stall_timeout_s
        if st.stall_probe_at is not None and now - st.stall_probe_at < limit:
            return False
        silent = await gate.stalled_for(actor.port)
        if silent is None or silent < limit:
            return False
        st.stall_probe_at = now
        self.limiter.warning(f"stall-{name}", "%s: every request in flight has had nothing "
                             "from the server for %.0f s (stall_timeout_s %g s): probing it",
                             name, silent, limit)
        return True

    async def _probe(self, name: str, actor: ServiceActor, st: ProbeState,
                     probe: ProbeSection, stall: bool) -> None:
        assert actor.port is not None
        sent = self._clock()
        try:
            base = f"http://127.0.0.1:{actor.port}"
            if probe.model is None and not st.model_asked:
                st.model_asked = True
                st.model = await self._model(base, probe.timeout_s)
            error = await self._complete(base, probe.model or st.model, probe.endpoint,
                                         probe.timeout_s)
        finally:
            st.running = False
            st.last_at = self._clock()
            st.probes += 1
        if actor.gen != st.gen or self.sup.actors.get(name) is not actor:
            return  # relaunched or replaced meanwhile: this result is of the past
        gate = self.sup.gate_of(name)
        seen = gate.last_ok if gate is not None else None
        if error is not None and seen is not None and seen[0][1] == actor.port \
                and seen[1] >= sent:
            error = None  # the gate saw it generate while the probe waited: it is not hung
        if error is None:
            self.results[(name, "ok")] = self.results.get((name, "ok"), 0) + 1
            if st.failures:
                log.info("%s: generation probe ok again", name)
            st.failures, st.last_error, st.last_ok_at = 0, None, st.last_at
            return
        self.results[(name, "failed")] = self.results.get((name, "failed"), 0) + 1
        st.failures += 1
        st.last_error = error
        self.limiter.warning(f"fail-{name}", "%s: generation probe failed (%d of %d%s): %s",
                             name, st.failures, probe.failures,
                             ", after a stall: that is enough" if stall else "", error)
        if stall:
            error = f"requests stalled, and then {error}"
        if stall or st.failures >= probe.failures:
            st.failures = 0
            await self._hung(name, actor, error)

    async def _hung(self, name: str, actor: ServiceActor, error: str) -> None:
        if actor.state is not State.READY or name in self.host.ops or "*" in self.host.ops:
            # drained, stopping, held, or an operation on it began while the probe waited:
            # its requests are being let finish, or it is going down anyway; judge it again
            # once it is ready
            log.warning("%s: generation probe failed (%s), but it is %s now: not restarted",
                        name, error, actor.state.value)
            return
        self.hung[name] = self.hung.get(name, 0) + 1
        gated = self.sup.gate_of(name) is not None
        log.error("%s: hung: %s; %s", name, error,
                  "hot swap to a new instance" if gated else "restarting it")
        try:
            if gated:
                await self.host.swap(name, None)
                actor.counters.restart(RestartReason.HUNG)  # a swap counts nothing itself
            else:
                await self.host.command([name], L.Restart(RestartReason.HUNG))
        except ControlError as exc:
            log.error("%s: hung, and the %s was not done: %s", name,
                      "hot swap" if gated else "restart", exc.message)

    # --- the requests ----------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = client_session()
        return self._session

    async def _model(self, base: str, timeout_s: float) -> str | None:
        try:
            async with asyncio.timeout(timeout_s), \
                    self._client().get(base + "/v1/models") as r:
                body, more = await read_bounded(r, MAX_ANSWER)
                if r.status != 200 or more:
                    return None
            data = json.loads(body)
            models = data.get("data") if isinstance(data, dict) else None
            if isinstance(models, list) and models and isinstance(models[0], dict):
                mid = models[0].get("id")
                return mid if isinstance(mid, str) and 0 < len(mid) <= 256 else None
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            pass
        return None

    async def _complete(self, base: str, model: str | None, endpoint: str,
                        timeout_s: float) -> str | None:
        """None when the engine generated a token, else what went wrong."""
        body: dict[str, Any] = {"max_tokens": 1, "temperature": 0, "stream": False}
        if model:
            body["model"] = model
        if endpoint == "chat":
            path = "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": "Say OK."}]
        else:
            path = "/v1/completions"
            body["prompt"] = "OK"
        started = self._clock()
        try:
            async with asyncio.timeout(timeout_s), \
                    self._client().post(base + path, json=body,
                                        headers={"User-Agent": "llm-supervisor-probe"}) as r:
                answer, more = await read_bounded(r, MAX_ANSWER)
                status = r.status
        except TimeoutError:
            return f"no answer to POST {path} within {timeout_s:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return f"POST {path}: {type(exc).__name__}: {exc}".rstrip(": ")
        if not 200 <= status < 300:
            text = " ".join(answer[:200].decode("utf-8", "replace").split())
            return f"POST {path} answered HTTP {status}: {text}"
        if more:  # more than MAX_ANSWER of a 2xx answer: it generates, whatever it says
            return None
        try:
            data = json.loads(answer)
            ok = isinstance(data, dict) and isinstance(data.get("choices"), list) \
                and len(data["choices"]) > 0
        except ValueError:
            ok = False
        if not ok:
            return f"POST {path}: the answer is not a completion ({len(answer)} bytes)"
        log.debug("probe %s ok in %.3f s", base, self._clock() - started)
        return None

    def status(self, name: str, now: float) -> dict[str, Any] | None:
        st = self.states.get(name)
        actor = self.sup.actors.get(name)
        if actor is None or actor.cfg.probe is None:
            return None
        if st is None:
            st = ProbeState()
        return {
            "failures": st.failures,
            "last_error": st.last_error,
            "last_ok_s_ago": None if st.last_ok_at is None else round(now - st.last_ok_at, 1),
            "probes": st.probes,
            "hung": self.hung.get(name, 0),
        }

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

