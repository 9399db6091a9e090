"""The metrics listener: `/metrics` (Prometheus text) and `/healthz`, on the same HTTP/1.1
server as the gates (`gate/server.py`: llhttp, deadlines for heads and bodies, a connection
limit, bad requests answered 400 and logged in one line at a bounded rate), on the
supervisor's loop. A scrape renders the last snapshots; it does no I/O."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from . import http1
from .config import Listen
from .gate.server import ClientConnection, Listener, Request, ResponseWriter, open_listener
from .host import Host
from .logs import LogLimiter
from .metrics import CONTENT_TYPE, make_registry, render
from .supervisor import Supervisor
from .systemd import Notifier

LOOP_STALE_S = 5.0


@dataclass(frozen=True)
class MetricsLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    send_timeout_s: float = 30.0
    max_connections: int = 64  # Prometheus needs one; beyond, they wait in the backlog


class MetricsServer:
    name = "metrics"

    def __init__(self, sup: Supervisor, host: Host, listen: Listen,
                 clock: Callable[[], float], notifier: Notifier | None = None) -> None:
        self.sup = sup
        self.host = host
        self.listen = listen
        self.cfg = MetricsLimits()
        self.limiter = LogLimiter("supervisord_llm.metrics")
        self._clock = clock
        self.registry = make_registry(sup, host, notifier)
        self._listener: Listener | None = None

    def count(self, code: int) -> None:
        return None

    async def handle(self, req: Request, conn: ClientConnection) -> bool:
        writer = ResponseWriter(conn, req)
        path = req.target.split(b"?", 1)[0]
        if req.method not in (b"GET", b"HEAD"):
            writer.simple(405, http1.error_body("use GET", "invalid_request_error",
                                                "method_not_allowed"),
                          [(b"Allow", b"GET, HEAD")])
            return False
        if path == b"/metrics":
            writer.simple(200, render(self.registry), content_type=CONTENT_TYPE.encode())
        elif path == b"/healthz":
            healthy, body = self.healthz()
            writer.simple(200 if healthy else 503, json.dumps(body).encode())
        else:
            writer.simple(404, http1.error_body("not found: /metrics and /healthz are served "
                                                "here", "invalid_request_error", "not_found"))
        return writer.keep_alive

    def healthz(self) -> tuple[bool, dict[str, object]]:
        sup = self.sup
        loop_age = self._clock() - sup.loop.last_tick
        failed = [a.name for a in sup.actors.values() if a.state.value == "failed"]
        healthy = loop_age < LOOP_STALE_S and not failed
        return healthy, {
            "ok": healthy,
            "mode": self.host.mode.value,
            "loop_lag_s": round(sup.loop.lag_s, 6),
            "services": {a.name: a.state.value for a in sup.actors.values()},
            "failed": failed,
        }

    async def start(self) -> None:
        self._listener = open_listener(self, self.listen.host, self.listen.port,
                                       f"metrics.listen {self.listen}", backlog=128)

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.close(1.0)
            self._listener = None
