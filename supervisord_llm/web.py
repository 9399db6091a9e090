"""The metrics listener: `/metrics` (Prometheus text) and `/healthz`."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from aiohttp import web

from .config import Listen
from .errors import StartupError
from .host import Host
from .logs import StrangerFilter
from .metrics import CONTENT_TYPE, make_registry, render
from .supervisor import Supervisor
from .systemd import Notifier

LOOP_STALE_S = 5.0
_http_log = logging.getLogger("supervisord_llm.metrics.http")
_http_log.addFilter(StrangerFilter("metrics listener"))


class MetricsServer:
    def __init__(self, sup: Supervisor, host: Host, listen: Listen,
                 clock: Callable[[], float], notifier: Notifier | None = None) -> None:
        self.sup = sup
        self.host = host
        self.listen = listen
        self._clock = clock
        self.registry = make_registry(sup, host, notifier)
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        return app

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=render(self.registry), headers={"Content-Type": CONTENT_TYPE})

    async def _healthz(self, request: web.Request) -> web.Response:
        sup = self.sup
        loop_age = self._clock() - sup.loop.last_tick
        failed = [a.name for a in sup.actors.values() if a.state.value == "failed"]
        healthy = loop_age < LOOP_STALE_S and not failed
        body = {
            "ok": healthy,
            "mode": self.host.mode.value,
            "loop_lag_s": round(sup.loop.lag_s, 6),
            "services": {a.name: a.state.value for a in sup.actors.values()},
            "failed": failed,
        }
        return web.Response(status=200 if healthy else 503, text=json.dumps(body),
                            content_type="application/json")

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                                     logger=_http_log)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.listen.host, self.listen.port,
                           reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise StartupError(f"cannot listen on metrics.listen {self.listen}: "
                               f"{exc.strerror or exc}") from None

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
