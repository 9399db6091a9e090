"""A real nginx with docs/nginx/llm.conf in front of two gates: a drained gate's traffic moves
to the other, and SSE passes through both proxies unbuffered."""

from __future__ import annotations

import asyncio
import itertools
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from helpers import (
    ROOT,
    Daemon,
    async_wait_until,
    base_config,
    fake_service,
    free_port,
    nginx_main_conf,
    running,
)

pytestmark = pytest.mark.e2e

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
if NGINX is None:
    pytest.skip("nginx is not installed (scripts/setup.sh installs it)", allow_module_level=True)


def nginx_conf(tmp: Path, listen: int, gates: list[str]) -> Path:
    """docs/nginx/llm.conf with this test's ports, inside a minimal main config."""
    text = (ROOT / "docs/nginx/llm.conf").read_text()
    servers = re.findall(r"server 127\.0\.0\.1:\d+", text)
    assert len(servers) == len(gates) == 2
    for old, new in zip(servers, gates, strict=True):
        text = text.replace(old, f"server {new}", 1)
    text = text.replace("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{listen};")
    (tmp / "llm.conf").write_text(text)
    return nginx_main_conf(tmp, "llm.conf")


@pytest.fixture
def nginx_in_front(tmp_path: Path) -> Iterator[tuple[Daemon, str, dict[str, Any]]]:
    a = fake_service("chat-a", free_port(), gate={"listen": f"127.0.0.1:{free_port()}",
                                                  "allow_paths": ["/echo"]})
    b = fake_service("chat-b", free_port(), gate={"listen": f"127.0.0.1:{free_port()}",
                                                  "allow_paths": ["/echo"]})
    port = free_port()
    conf = nginx_conf(tmp_path, port, [a["gate"]["listen"], b["gate"]["listen"]])
    assert NGINX is not None
    test = subprocess.run([NGINX, "-t", "-c", str(conf), "-p", str(tmp_path), "-e",
                           str(tmp_path / "error.log")], capture_output=True, text=True,
                          check=False)
    assert test.returncode == 0, test.stderr
    with running(tmp_path, base_config(tmp_path, [a, b])) as d:
        proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp_path), "-e",
                                 str(tmp_path / "error.log"), "-g", "daemon off;"])
        try:
            yield d, f"http://127.0.0.1:{port}", {"chat-a": a, "chat-b": b}
        finally:
            proc.terminate()
            proc.wait(10)


async def test_drained_gate_traffic_moves_to_the_other(
        nginx_in_front: tuple[Daemon, str, dict[str, Any]]) -> None:
    d, url, svcs = nginx_in_front
    d.wait_state("chat-a", "ready")
    d.wait_state("chat-b", "ready")
    ports = {str(s["port"]): name for name, s in svcs.items()}
    async with aiohttp.ClientSession() as client:

        async def who() -> str:
            async with client.post(f"{url}/echo", data=b"x" * 1000) as r:
                assert r.status == 200, await r.text()
                return ports[r.headers["X-Backend-Port"]]

        async def nginx_up() -> bool:
            try:
                await who()
            except aiohttp.ClientError:
                return False
            return True

        await async_wait_until(nginx_up, 10, what="nginx up")
        before = Counter([await who() for _ in range(20)])
        assert set(before) == {"chat-a", "chat-b"}  # round robin over both gates
        done = await asyncio.get_running_loop().run_in_executor(None, d.llmctl, "drain",
                                                                "chat-a")
        assert done.returncode == 0, done.stderr
        after = Counter([await who() for _ in range(20)])
        assert after == Counter({"chat-b": 20})  # every request served, all by chat-b
        rejected = d.service("chat-a")
        assert rejected["gate"] == "draining"
        # streamed through nginx and the gate, chunk by chunk
        body = {"stream": True, "max_tokens": 5, "fake_token_delay_s": 0.15}
        times = []
        async with client.post(f"{url}/v1/chat/completions", json=body) as r:
            assert r.status == 200
            async for line in r.content:
                if line.startswith(b"data: "):
                    times.append(time.monotonic())
        gaps = [b - a for a, b in itertools.pairwise(times)][:4]
        assert all(g > 0.08 for g in gaps), gaps
        assert (await asyncio.get_running_loop().run_in_executor(
            None, d.llmctl, "resume", "chat-a")).returncode == 0
        # nginx's passive health check skipped chat-a for fail_timeout (5 s): then it is back

        async def back() -> bool:
            return await who() == "chat-a"

        await async_wait_until(back, 10, interval=0.2, what="chat-a back in rotation")
