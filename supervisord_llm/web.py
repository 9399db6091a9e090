"""The metrics listener: `/metrics` (Prometheus text), `/healthz`, `/sd` (Prometheus HTTP
service discovery of the engines' metrics: at the engines' own addresses, for a Prometheus on
this box, or `/sd?via=supervisor`, through `/services/NAME/metrics` at the address the
Prometheus used to reach `/sd`, for one elsewhere) and `/services/NAME/metrics` (an engine's
metrics, labelled), on the same HTTP/1.1
server as the gates (`gate/server.py`: llhttp, deadlines for heads and bodies, a connection
limit, bad requests answered 400 and logged in one line at a bounded rate), on the
supervisor's loop. A scrape renders the last snapshots; it does no I/O."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import aiohttp

from . import http1
from .config import Listen
from .gate.server import ClientConnection, Listener, Request, ResponseWriter, open_listener
from .health import client_session, read_bounded
from .logs import LogLimiter
from .metrics import CONTENT_TYPE, make_registry, render
from .parts import Parts
from .states import State
from .systemd import Notifier

LOOP_STALE_S = 5.0
ENGINE_TIMEOUT_S = 5.0
MAX_ENGINE_METRICS = 16 * 1024 * 1024
MAX_FETCHES_PER_ENGINE = 4
JSON = b"application/json"
_NAME = re.compile(rb"[A-Za-z_:][A-Za-z0-9_:]*")
_PAIR = re.compile(rb'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"(?:[^"\\]|\\.)*"\s*,?')
SD_FORMS = ("engine", "supervisor")  # /sd?via=...
# a Host header, for targets: a DNS name (253) or [an IPv6 address], and ":65535"
MAX_HOST = 262
_HOST = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]{2,45})\]|(?P<name>[A-Za-z0-9.-]{1,254}))"
                   r"(?::(?P<port>[0-9]{1,5}))?")
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_LOADED = frozenset({State.READY, State.DRAINING})
_NOT_RUNNING = frozenset({State.STOPPED, State.BACKOFF, State.FAILED})


@dataclass(frozen=True)
class MetricsLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    send_timeout_s: float = 30.0
    max_connections: int = 64  # Prometheus needs one; beyond, they wait in the backlog
    max_connections_per_client: int | None = None


class MetricsServer:
    name = "metrics"

    def __init__(self, parts: Parts, listen: Listen,
                 clock: Callable[[], float], notifier: Notifier | None = None) -> None:
        self.sup = parts.sup
        self.host = parts.host
        self.listen = listen
        self.cfg = MetricsLimits()
        self.limiter = LogLimiter("supervisord_llm.metrics")
        self._clock = clock
        self.registry = make_registry(parts, notifier)
        self._listener: Listener | None = None
        self._session: aiohttp.ClientSession | None = None
        self._hostname = socket.gethostname()
        self._fetching: dict[str, int] = {}  # service -> engine scrapes in progress

    def count(self, code: int) -> None:
        return None

    def begin(self, req: Request, conn: ClientConnection
              ) -> Coroutine[Any, Any, bool] | None:
        return self.handle(req, conn)

    async def handle(self, req: Request, conn: ClientConnection) -> bool:
        writer = ResponseWriter(conn, req)
        path = req.target.split(b"?", 1)[0]
        if req.method not in (b"GET", b"HEAD"):
            writer.simple(405, http1.error_body("use GET", "invalid_request_error",
                                                "method_not_allowed"),
                          [(b"Allow", b"GET, HEAD")])
            return False
        if path == b"/metrics":
            if self.sup.gates is not None:
                await self.sup.gates.refresh()
            writer.simple(200, render(self.registry), content_type=CONTENT_TYPE.encode())
        elif path == b"/healthz":
            healthy, body = self.healthz()
            writer.simple(200 if healthy else 503, json.dumps(body).encode())
        elif path == b"/sd":
            code, sd = self.sd_request(req, conn)
            writer.simple(code, sd, [(b"Vary", b"Host")])  # the answer depends on Host
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

    def sd_request(self, req: Request, conn: ClientConnection) -> tuple[int, bytes]:
        """`GET /sd[?via=engine|supervisor]`: the status and the JSON body. With
        `via=supervisor` the targets are this listener at the address in the request's Host
        header (or, without one, the local address the connection reached)."""
        _, _, query = req.target.partition(b"?")
        try:
            params = parse_qsl(query.decode("utf-8"), keep_blank_values=True,
                               max_num_fields=4)
        except (UnicodeDecodeError, ValueError):
            params = [("", "")]  # refused below
        via = [v for k, v in params if k == "via"]
        if len(via) != len(params) or len(via) > 1 or (via and via[0] not in SD_FORMS):
            return 400, http1.error_body(
                "/sd takes one parameter, via=engine (the engines' own addresses, for a "
                "Prometheus on this box; the default) or via=supervisor (through "
                "/services/NAME/metrics here, for a Prometheus elsewhere)",
                "invalid_request_error", "bad_query")
        if not via or via[0] == "engine":
            return 200, json.dumps(self.service_discovery()).encode()
        hosts = [v for k, v in req.headers if k.lower() == b"host"]
        try:
            if len(hosts) > 1:
                raise ValueError("more than one Host header")
            address = parse_host(hosts[0]) if hosts else _local_address(conn)
        except ValueError as exc:
            self.limiter.warning("sd-host", "/sd?via=supervisor from %s refused: Host: %s",
                                 conn.peer or "?", exc)
            return 400, http1.error_body(
                f"/sd?via=supervisor: the Host header ({exc}) must be the address this "
                "listener is reached at: a DNS name, an IPv4 address or [an IPv6 address], "
                "and a port", "invalid_request_error", "bad_host")
        return 200, json.dumps(self.service_discovery("supervisor", address)).encode()

    def _listed(self, name: str) -> str | None:
        """The service's metrics URL, if /sd lists it: it has one, and an on-demand service
        only while it is loaded (else its target would be `down` for no fault)."""
        actor = self.sup.actors[name]
        url = actor.plan.metrics_url(actor.port)
        if url is None or (actor.cfg.on_demand and actor.state not in _LOADED):
            return None
        return url

    def service_discovery(self, via: str = "engine", address: str | None = None
                          ) -> list[dict[str, object]]:
        """Prometheus HTTP service discovery: one target per service with a metrics URL (an
        on-demand one while it is loaded), labelled so that the engines' series join the
        supervisor's. `via="supervisor"`: each target is `address` (this listener, as the
        Prometheus reaches it) with the path /services/NAME/metrics; the scheme is the
        scrape job's."""
        out: list[dict[str, object]] = []
        for name in list(self.sup.actors):
            url = self._listed(name)
            if url is None:
                continue
            if via == "supervisor":
                assert address is not None
                out.append({"targets": [address], "labels": {
                    **self._labels(name),
                    "__metrics_path__": f"/services/{quote(name, safe='')}/metrics"}})
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
        if actor.state in _NOT_RUNNING:  # nothing to ask (an on-demand one not loaded, a
            return 503, http1.error_body(  # stopped or failed one): no log line for it
                f"{name}: not running ({actor.state.value})", "server_error",
                "not_running"), JSON
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


def parse_host(value: bytes) -> str:
    """A Host header's `host[:port]`, checked, for targets that Prometheus will scrape: a DNS
    name, an IPv4 address or a bracketed IPv6 address, and a port 1-65535 (without one, the
    scrape job's scheme gives it). ValueError, with the reason, for anything else: userinfo,
    a path, spaces, percent signs, an IPv6 zone, more than MAX_HOST bytes. The value shapes
    only the answer to the request that carried it; nothing connects to it here."""
    if len(value) > MAX_HOST:
        raise ValueError(f"longer than {MAX_HOST} bytes")
    text = value.decode("latin-1").strip(" \t")
    m = _HOST.fullmatch(text)
    if m is None:
        raise ValueError(f"{text[:64]!r} is not host[:port]")
    port = m.group("port")
    if port is not None and not 0 < int(port) < 65536:
        raise ValueError(f"port {port} out of range")
    if m.group("v6") is not None:
        try:
            host = f"[{ipaddress.IPv6Address(m.group('v6')).compressed}]"
        except ValueError:
            raise ValueError(f"[{m.group('v6')}] is not an IPv6 address") from None
    else:
        name = m.group("name").lower()
        labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
        if len(name) > 253 or not all(_DNS_LABEL.fullmatch(x) for x in labels):
            raise ValueError(f"{name[:64]!r} is not a host name")
        if all(x.isdigit() for x in labels):
            try:
                name = str(ipaddress.IPv4Address(name))
            except ValueError:
                raise ValueError(f"{name!r} is not an IPv4 address") from None
        host = name
    return f"{host}:{int(port)}" if port is not None else host


def _local_address(conn: ClientConnection) -> str:
    """The address the client connected to (a request without a Host header)."""
    sock = conn.transport.get_extra_info("sockname") if conn.transport is not None else None
    if not isinstance(sock, tuple) or len(sock) < 2:
        raise ValueError("none, and no local address to use instead")
    host = str(sock[0])
    return f"[{host}]:{sock[1]}" if ":" in host else f"{host}:{sock[1]}"


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
