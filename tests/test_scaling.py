"""Several boxes: two supervisors on one machine (two configs, different ports).

- Each with its router, behind one real nginx with docs/nginx/hosts.conf: traffic reaches
  both; one drained, its traffic moves to the other with no error; resumed, it comes back.
- A real Prometheus with docs/prometheus/prometheus.yml over both, as from another host: the
  supervisors' metrics listeners on 127.0.0.2 and 127.0.0.3, their engines on 127.0.0.1, the
  engines found with `/sd?via=supervisor` and scraped through `/services/NAME/metrics`;
  every target up, on-demand engines listed while loaded, `/sd`'s Host header bounded."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from promserver import PromServer, prometheus_missing

from helpers import (
    ROOT,
    Daemon,
    base_config,
    fake_service,
    free_port,
    nginx_main_conf,
    running,
    wait_until,
)

pytestmark = pytest.mark.e2e

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
ENGINE = str(Path(__file__).resolve().parent / "enginemetrics.py")


def nginx_conf(tmp: Path, listen: int, routers: list[str]) -> Path:
    text = (ROOT / "docs/nginx/hosts.conf").read_text()
    servers = re.findall(r"server 10\.8\.0\.\d+:9000", text)
    assert len(servers) == len(routers) == 2
    for old, new in zip(servers, routers, strict=True):
        text = text.replace(old, f"server {new}", 1)
    text = text.replace("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{listen};")
    (tmp / "hosts.conf").write_text(text)
    return nginx_main_conf(tmp, "hosts.conf")


def who(url: str) -> tuple[int, str]:
    """POST /echo with a model through nginx: the status and which backend answered."""
    req = urllib.request.Request(f"{url}/echo",  # noqa: S310 - loopback only
                                 json.dumps({"model": "chat"}).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback only
            r.read()
            return r.status, r.headers.get("X-Backend-Port", "")
    except urllib.error.HTTPError as exc:
        exc.read()
        exc.close()
        return exc.code, ""
    except OSError:  # nginx not up yet
        return 0, ""


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (scripts/setup.sh installs it)")
def test_two_supervisors_behind_nginx_one_drained(tmp_path: Path) -> None:
    hosts = []
    for name in ("box1", "box2"):
        tmp = tmp_path / name
        tmp.mkdir()
        svc = fake_service("chat", free_port())
        router = f"127.0.0.1:{free_port()}"
        # (its /echo says which box answered: a path beside the API's)
        hosts.append((tmp, base_config(tmp, [svc], gpus=1, router={"listen": router,
                                                                   "allow_paths": ["/echo"]}),
                      str(svc["port"]), router))
    listen = free_port()
    conf = nginx_conf(tmp_path, listen, [h[3] for h in hosts])
    assert NGINX is not None
    check = subprocess.run([NGINX, "-t", "-c", str(conf), "-p", str(tmp_path), "-e",
                            str(tmp_path / "error.log")], capture_output=True, text=True,
                           check=False)
    assert check.returncode == 0, check.stderr
    url = f"http://127.0.0.1:{listen}"
    with running(hosts[0][0], hosts[0][1]) as d1, running(hosts[1][0], hosts[1][1]) as d2:
        d1.wait_state("chat", "ready")
        d2.wait_state("chat", "ready")
        proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp_path), "-e",
                                 str(tmp_path / "error.log"), "-g", "daemon off;"])
        try:
            wait_until(lambda: who(url)[0] == 200, 10, what="nginx up")
            seen = Counter(who(url) for _ in range(40))
            box1, box2 = (200, hosts[0][2]), (200, hosts[1][2])
            assert seen[box1] > 5 and seen[box2] > 5, seen  # both boxes serve
            assert d1.llmctl("drain", "--all").returncode == 0
            moved = Counter(who(url) for _ in range(40))
            assert moved == Counter({box2: 40}), moved  # no error: all on box2
            assert d1.llmctl("resume", "--all").returncode == 0
            time.sleep(0.2)
            wait_until(lambda: Counter(who(url) for _ in range(20))[box1] > 0, 15,
                       what="box1 back in rotation")
        finally:
            proc.terminate()
            proc.wait(10)


# --- a Prometheus on another host ------------------------------------------------------------


def engine(name: str, port: int, **sections: Any) -> dict[str, Any]:
    """A service whose engine serves /metrics (tests/enginemetrics.py)."""
    svc = fake_service(name, port, **sections)
    svc["command"] = [sys.executable, ENGINE, "--port", "{port}", "--model", name]
    return svc


Box = tuple[Daemon, str]  # the daemon, its metrics.listen


@pytest.fixture(scope="module")
def boxes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Box]]:
    """box1 (metrics on 127.0.0.2): chat, and lazy (on demand, not loaded); box2 (metrics on
    127.0.0.3): chat. Every engine listens on 127.0.0.1."""
    if (why := prometheus_missing()) is not None:
        pytest.skip(why)
    docs = []
    for name, ip in (("box1", "127.0.0.2"), ("box2", "127.0.0.3")):
        tmp = tmp_path_factory.mktemp(name)
        services = [engine("chat", free_port(), gpus=[0])]
        if name == "box1":
            services.append(engine("lazy", free_port(), gpus=[1], start="on-demand",
                                   vram_gb=1, gate={"listen": f"127.0.0.1:{free_port()}"}))
        doc = base_config(tmp, services, gpus=2)
        doc["metrics"]["listen"] = f"{ip}:{free_port()}"
        docs.append((tmp, doc))
    with running(*docs[0]) as d1, running(*docs[1]) as d2:
        d1.wait_state("chat", "ready")
        d2.wait_state("chat", "ready")
        yield [(d1, docs[0][1]["metrics"]["listen"]), (d2, docs[1][1]["metrics"]["listen"])]


def prometheus_conf(listens: list[str]) -> str:
    """docs/prometheus/prometheus.yml with the boxes' addresses, every interval 1 s."""
    text = (ROOT / "docs/prometheus/prometheus.yml").read_text()
    for old, new in zip(("10.8.0.11:9468", "10.8.0.12:9468"), listens, strict=True):
        assert old in text and re.escape(old) in text, old
        text = text.replace(re.escape(old), re.escape(new)).replace(old, new)
    text, n = re.subn(r"\b(scrape|evaluation|refresh)_interval: \d+[smh]\b", r"\1_interval: 1s",
                      text)
    assert n >= 4, n
    return text


def test_a_prometheus_elsewhere_scrapes_every_engine_through_its_supervisor(
        boxes: list[Box], tmp_path: Path) -> None:
    (d1, l1), (d2, l2) = boxes
    prom = PromServer(tmp_path / "prometheus", prometheus_conf([l1, l2]),
                      files={"alerts.yml": (ROOT / "docs/prometheus/alerts.yml").read_text()})
    check = prom.check_config()
    assert check.returncode == 0, check.stdout + check.stderr
    hostname = socket.gethostname()
    listen = {"gpu1": l1, "gpu2": l2}
    port = {"gpu1": d1.service("chat")["port"], "gpu2": d2.service("chat")["port"]}
    uuid = {"gpu1": d1.status()["gpus"][0]["uuid"], "gpu2": d2.status()["gpus"][0]["uuid"]}

    def all_up(n: int, what: str) -> list[dict[str, Any]]:
        def check() -> list[dict[str, Any]] | None:
            targets = prom.targets()
            ok = len(targets) == n and all(t["health"] == "up" for t in targets)
            return targets if ok else None
        try:
            result: list[dict[str, Any]] = wait_until(check, 60, 0.2, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the targets: {_brief(prom)}") from None
        return result

    with prom:
        targets = all_up(4, "4 targets up")
        sup = sorted((t["labels"]["host"], t["scrapeUrl"]) for t in targets
                     if t["labels"]["job"] == "llm-supervisor")
        assert sup == [("gpu1", f"http://{l1}/metrics"), ("gpu2", f"http://{l2}/metrics")]
        engines = {(t["labels"]["host"], t["labels"]["service"]): t for t in targets
                   if t["labels"]["job"] == "llm-engines"}
        assert set(engines) == {("gpu1", "chat"), ("gpu2", "chat")}  # lazy: not loaded
        for (host, service), t in engines.items():
            # through the box's metrics listener, never the engine's own loopback address
            assert t["scrapeUrl"] == f"http://{listen[host]}/services/{service}/metrics"
            assert t["labels"]["instance"] == f"{hostname}:{port[host]}"
            assert (t["labels"]["gpu"], t["labels"]["uuid"]) == ("0", uuid[host])

        # honor_labels: the engines' series carry each label once, no exported_*
        series = wait_until(lambda: len(r := prom.query("fake_engine_kv_cache_usage_ratio"))
                            == 2 and r, 15, 0.2, what="the engines' series")
        for s in series:
            assert set(s["metric"]) == {"__name__", "job", "host", "instance", "service",
                                        "gpu", "uuid"}, s["metric"]
        # they join the supervisor's: per service on (host, service), per GPU on (host, uuid)
        assert len(prom.query("fake_engine_kv_cache_usage_ratio * on (host, service) "
                              "llm_supervisor_service_up")) == 2
        assert len(prom.query("fake_engine_kv_cache_usage_ratio * on (host, uuid) "
                              "group_left (name) llm_supervisor_gpu_up")) == 2

        # an on-demand engine is a target while it is loaded, and only then
        assert d1.llmctl("start", "lazy").returncode == 0
        d1.wait_state("lazy", "ready")
        targets = all_up(5, "lazy's target up")
        lazy = [t for t in targets if t["labels"].get("service") == "lazy"]
        assert [t["scrapeUrl"] for t in lazy] == [f"http://{l1}/services/lazy/metrics"]
        assert d1.llmctl("stop", "lazy").returncode == 0
        d1.wait_state("lazy", "stopped")
        all_up(4, "lazy's target gone")
    assert prom.proc is None and not prom.storage.exists()


def _brief(prom: PromServer) -> str:
    with contextlib.suppress(OSError, KeyError, AssertionError):
        return ", ".join(f"{t['scrapeUrl']} {t['health']} {t['lastError']}"
                         for t in prom.targets())
    return "?"


def raw_get(listen: str, target: str, headers: list[bytes], version: bytes = b"HTTP/1.1"
            ) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request on a fresh connection, headers exactly as given: status, headers, body."""
    host, port = listen.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET " + target.encode() + b" " + version + b"\r\n"
                     + b"".join(h + b"\r\n" for h in headers)
                     + b"Connection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields = dict(line.split(b": ", 1) for line in lines[1:] if b": " in line)
    return int(lines[0].split(b" ", 2)[1]), {k.lower(): v for k, v in fields.items()}, body


def test_sd_via_supervisor_takes_the_host_header_within_bounds(boxes: list[Box]) -> None:
    (d1, l1), _ = boxes
    if d1.service("lazy")["state"] != "stopped":
        assert d1.llmctl("stop", "lazy").returncode == 0
        d1.wait_state("lazy", "stopped")
    sd = "/sd?via=supervisor"

    def targets(body: bytes) -> list[str]:
        return [t for group in json.loads(body) for t in group["targets"]]

    # the address the Prometheus used, normalized
    status, head, body = raw_get(l1, sd, [b"Host: Prom-Side.Example:9468"])
    assert status == 200, body
    assert targets(body) == ["prom-side.example:9468"]
    assert head[b"vary"] == b"Host" and head[b"cache-control"] == b"no-store"
    status, _, body = raw_get(l1, sd, [b"Host: [0:0::1]:9468"])
    assert (status, targets(body)) == (200, ["[::1]:9468"])
    status, _, body = raw_get(l1, sd, [b"Host: gpu1"])  # no port: the scrape job's scheme's
    assert (status, targets(body)) == (200, ["gpu1"])
    # HTTP/1.0 without Host: the address the connection reached
    status, _, body = raw_get(l1, sd, [], b"HTTP/1.0")
    assert (status, targets(body)) == (200, [l1])
    # anything but host[:port] is refused, with a reason and no traceback
    for bad in (b"evil.example/../x:80", b"a b:80", b"user@box:9468", b"[fe80::1%eth0]:9468",
                b"box:99999", b"box:0", b"999.1.2.3:9468", b"-box-:9468", b"a..b:1",
                b"[::g]:1", b"box:80:80", b"x" * 300, "b\u00f6x:1".encode()):
        status, _, body = raw_get(l1, sd, [b"Host: " + bad])
        assert status == 400, (bad, body)
        err = json.loads(body)["error"]
        assert err["code"] == "bad_host" and "Traceback" not in err["message"], err
    status, _, body = raw_get(l1, sd, [b"Host: a:1", b"Host: b:1"])
    assert status == 400, body
    for query in ("via=bogus", "via=supervisor&via=engine", "x=1", "via", "%ff=1",
                  "a=1&b=2&c=3&d=4&e=5"):
        status, _, body = raw_get(l1, f"/sd?{query}", [b"Host: gpu1:9468"])
        assert status == 400 and json.loads(body)["error"]["code"] == "bad_query", query
    # the default form: the engines' own addresses, for a Prometheus on the box
    status, _, body = raw_get(l1, "/sd?via=engine", [b"Host: gpu1:9468"])
    assert (status, targets(body)) == (200, [f"127.0.0.1:{d1.service('chat')['port']}"])
    # an engine that is not running: 503 from the supervisor, no wait, no log line
    status, _, body = raw_get(l1, "/services/lazy/metrics", [b"Host: gpu1:9468"])
    assert status == 503 and json.loads(body)["error"]["code"] == "not_running", body
    with urllib.request.urlopen(f"http://{l1}/healthz", timeout=10) as r:
        assert r.status == 200
