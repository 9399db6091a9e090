"""Two supervisors on one machine (two configs, different ports), each with its router,
behind one real nginx with docs/nginx/hosts.conf: traffic reaches both; one drained, its
traffic moves to the other with no error; resumed, it comes back."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from helpers import ROOT, base_config, fake_service, free_port, nginx_main_conf, running, wait_until

pytestmark = pytest.mark.e2e

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
if NGINX is None:
    pytest.skip("nginx is not installed (scripts/setup.sh installs it)", allow_module_level=True)


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


def test_two_supervisors_behind_nginx_one_drained(tmp_path: Path) -> None:
    hosts = []
    for name in ("box1", "box2"):
        tmp = tmp_path / name
        tmp.mkdir()
        svc = fake_service("chat", free_port())
        router = f"127.0.0.1:{free_port()}"
        hosts.append((tmp, base_config(tmp, [svc], gpus=1, router={"listen": router}),
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
