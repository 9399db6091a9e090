"""The metrics listener: `/metrics` (Prometheus text), `/healthz`, `/sd` (Prometheus HTTP
service discovery of the engines' metrics) and `/services/NAME/metrics` (an engine's metrics,
labelled), on the same HTTP/1.1
server as the gates (`gate/server.py`: llhttp, deadlines for heads and bodies, a connection
limit, bad requests answered 400 and logged in one line at a bounded rate), on the
supervisor's loop. A scrape renders the last snapshots; it does no I/O."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

import aiohttp

from . import http1
from .config import Listen
from .gate.server import ClientConnection, Listener, Request, ResponseWriter, open_listener
from .health import client_session, read_bounded
from .host import Host
from .logs import LogLimiter
from .metrics import CONTENT_TYPE, make_registry, render
from .supervisor import Supervisor
from .systemd import Notifier

LOOP_STALE_S = 5.0
ENGINE_TIMEOUT_S = 5.0
MAX_ENGINE_METRICS = 16 * 1024 * 1024
MAX_FETCHES_PER_ENGINE = 4
JSON = b"application/json"
_NAME = re.compile(rb"[A-Za-z_:][A-Za-z0-9_:]*")
_PAIR = re.compile(rb'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"(?:[^"\\]|\\.)*"\s*,?')


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
        self._session: aiohttp.ClientSession | None = None
        self._hostname = socket.gethostname()
        self._fetching: dict[str, int] = {}  # service -> engine scrapes in progress

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
        elif path == b"/sd":
            writer.simple(200, json.dumps(self.service_discovery()).encode())
        elif path.startswith(b"/services/") and path.endswith(b"/metrics") \
                and path.count(b"/") == 3:
            name = path[len(b"/services/"):-len(b"/metrics")].decode("utf-8", "replace")
            code, text, ctype = await self.engine_metrics(name)
            writer.simple(code, text, content_type=ctype)
        else:
            writer.simple(404, http1.error_body(
                "not found: /metrics, /healthz, /sd and /services/NAME/metrics are served "
                "here", "invalid_request_error", "not_found"))
        return writer.keep_alive

    # --- the engines' metrics ----------------------------------------------------------------

    def _labels(self, name: str) -> dict[str, str]:
        actor = self.sup.actors[name]
        gpus = actor.plan.gpus
        return {"service": name, "gpu": ",".join(str(g.index) for g in gpus),
                "uuid": ",".join(g.uuid for g in gpus),
                "instance": f"{self._hostname}:{actor.port}" if actor.port else self._hostname}

    def service_discovery(self) -> list[dict[str, object]]:
        """Prometheus HTTP service discovery: one target per service with a metrics URL,
        labelled so that the engines' series join the supervisor's and dcgm-exporter's."""
        out: list[dict[str, object]] = []
        for name, actor in self.sup.actors.items():
            url = actor.plan.metrics_url(actor.port)
            if url is None:
                continue
            try:
                parts = urlsplit(url)
                port = parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError:
                continue  # the config's rules refuse such a URL; never one for all
            if not parts.hostname:
                continue
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            labels = {**self._labels(name), "__metrics_path__": parts.path or "/metrics",
                      "__scheme__": parts.scheme}
            for key, value in parse_qsl(parts.query):
                labels[f"__param_{key}"] = value
            out.append({"targets": [f"{host}:{port}"], "labels": labels})
        return out

    async def engine_metrics(self, name: str) -> tuple[int, bytes, bytes]:
        """The engine's own metrics, every sample labelled service, gpu, uuid, instance: for
        a Prometheus elsewhere. A clean 502 when the engine does not answer within
        ENGINE_TIMEOUT_S (the supervisor's own /metrics never waits on an engine)."""
        actor = self.sup.actors.get(name)
        url = actor.plan.metrics_url(actor.port) if actor is not None else None
        if actor is None or url is None:
            return 404, http1.error_body(f"no service named {name[:64]!r} with a metrics URL",
                                         "invalid_request_error", "not_found"), JSON
        busy = self._fetching.get(name, 0)
        if busy >= MAX_FETCHES_PER_ENGINE:  # scrapes pile up on a slow engine: the
            return 503, http1.error_body(  # listener's connections stay free for /metrics
                f"{name}: {busy} scrapes of its metrics are already waiting on the engine",
                "server_error", "busy"), JSON
        self._fetching[name] = busy + 1
        try:
            async with asyncio.timeout(ENGINE_TIMEOUT_S), self._client().get(url) as r:
                body, more = await read_bounded(r, MAX_ENGINE_METRICS)
                status = r.status
        except TimeoutError:
            return self._bad(name, f"no answer from {url} within {ENGINE_TIMEOUT_S:g} s")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return self._bad(name, f"{url}: {type(exc).__name__}: {exc}".rstrip(": "))
        finally:
            left = self._fetching.get(name, 1) - 1
            if left:
                self._fetching[name] = left
            else:
                self._fetching.pop(name, None)
        if status != 200:
            return self._bad(name, f"{url} answered HTTP {status}")
        if more:
            return self._bad(name, f"{url}: more than {MAX_ENGINE_METRICS} bytes of metrics")
        # off the loop: 3.6 MB of metrics take ~250 ms to relabel, which the watchdog and
        # every other connection must not wait for
        text = await asyncio.to_thread(relabel, body, self._labels(name))
        return 200, text, CONTENT_TYPE.encode()

    def _bad(self, name: str, why: str) -> tuple[int, bytes, bytes]:
        self.limiter.warning(f"engine-{name}", "metrics of %s: %s", name, why)
        return 502, http1.error_body(f"{name}: the engine's metrics: {why}", "server_error",
                                     "upstream_error"), JSON

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = client_session()  # no pool limit: 4 per engine at most
        return self._session

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
        if self._session is not None:
            await self._session.close()
            self._session = None


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def relabel(text: bytes, labels: dict[str, str]) -> bytes:
    """Prometheus text with `labels` added to every sample (a label the engine sets itself is
    left as it is). Comments and blank lines pass through; OpenMetrics' `# EOF` and
    exemplars (` # {...}` after a value), which the text format does not take, are dropped."""
    out: list[bytes] = []
    for line in text.split(b"\n"):
        line = line.rstrip(b"\r").lstrip(b" \t")  # noqa: PLW2901 - normalized in place
        if line.startswith(b"#"):
            if line.strip() == b"# EOF":
                break  # OpenMetrics: nothing comes after it
            out.append(line)
            continue
        if not line.strip():
            out.append(line)
            continue
        m = _NAME.match(line)
        if m is None:
            out.append(line)  # not a sample line: left for the scraper to judge
            continue
        name, rest = line[:m.end()], line[m.end():]
        have: set[str] = set()
        body = b""
        if rest.startswith(b"{"):
            pos = 1
            for pair in _PAIR.finditer(rest, 1):
                if pair.start() != pos:
                    break
                have.add(pair.group(1).decode())
                pos = pair.end()
            close = rest.find(b"}", pos)
            if close == -1:
                out.append(line)
                continue
            body, rest = rest[1:close].rstrip().rstrip(b","), rest[close + 1:]
        extra = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items() if k not in have)
        inner = b",".join(x for x in (extra.encode(), body) if x)
        exemplar = rest.find(b" # {")
        if exemplar != -1:
            rest = rest[:exemplar]
        out.append(name + b"{" + inner + b"}" + rest)
    result = b"\n".join(out)
    return result + b"\n" if result and not result.endswith(b"\n") else result
