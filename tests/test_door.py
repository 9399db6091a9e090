"""The front door: the path allowlist, API keys, limits per key, the audit log.

Pure first (the door with a fake clock, the keys file, the config keys), then the daemon as a
real process with fake engines behind the router and a gate, driven by the official OpenAI
client and by raw sockets: 401/404/429, revoke and rotate under 16 streams, limits at their
edges, every kind of audit line, a flood of one client address, a hand-broken keys file."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    Daemon,
    Streams,
    async_wait_until,
    base_config,
    fake_service,
    free_port,
    running,
    wait_until,
)
from supervisord_llm import keys as K
from supervisord_llm.config import parse_config
from supervisord_llm.errors import ConfigError
from supervisord_llm.gate.door import Door, Paths, Refusal, Ticket, header_pairs

# --- the door, pure -----------------------------------------------------------------------------


class Req:
    """What the door reads of a request."""

    def __init__(self, target: bytes = b"/v1/chat/completions", secret: str | None = None,
                 method: bytes = b"POST", headers: list[tuple[bytes, bytes]] | None = None
                 ) -> None:
        self.method = method
        self.target = target
        self.headers = list(headers or [])
        if secret is not None:
            self.headers.append((b"Authorization", b"Bearer " + secret.encode()))
        self.ticket: Ticket | None = None


class Conn:
    peer = "10.1.2.3"
    sent = 0


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def door_with(*keys: K.ApiKey, clock: Clock | None = None,
              wall: Clock | None = None) -> tuple[Door, list[str]]:
    lines: list[str] = []
    door = Door(clock or Clock(), wall or Clock(1.8e9))
    door.set_keys([k.to_doc() for k in keys])
    door.audit = lines.append
    return door, lines


def key(key_id: str = "alice", secret: str = "s3cret", **limits: Any) -> K.ApiKey:
    return K.ApiKey(key_id, K.hash_secret(secret), **limits)


def enter(door: Door, secret: str | None = "s3cret", target: bytes = b"/v1/chat/completions"
          ) -> tuple[Refusal | None, Req]:
    req = Req(target, secret)
    return door.enter(req, Conn(), Paths()), req


@pytest.mark.parametrize("target,ok", [
    (b"/v1/chat/completions", True), (b"/v1/completions?x=1", True), (b"/v1/embeddings", True),
    (b"/v1/models", True), (b"/v1/models/some-model", True), (b"/health", True),
    (b"/admin/shutdown", False), (b"/slots/0?action=erase", False), (b"/_ctl?exit=3", False),
    (b"/metrics", False), (b"/v1/chat/completions/", False), (b"//v1/chat/completions", False),
    (b"/v1/models/../../admin/shutdown", False), (b"/v1/models/%2e%2e/slots", False),
    (b"/v1/models/a/./b", False), (b"/v1/models/a\\..\\b", False), (b"/v1/models/", False),
    (b"/v1/models/Qwen%2FQwen2.5-7B", True), (b"/v1/models/Qwen/Qwen2.5-7B", True),
    (b"/v1/models/%252e%252e/slots", False), (b"/v1/models/a%5c..%5cb", False),
    (b"/v1/models/a%2F..%2Fslots", False),
    (b"http://h/v1/chat/completions", False), (b"*", False), (b"/V1/chat/completions", False),
])
def test_only_the_api_paths_are_forwarded(target: bytes, ok: bool) -> None:
    assert Paths().allows(target) is ok


def test_allow_paths_add_exact_paths_and_prefixes() -> None:
    paths = Paths(("/echo", "/extra/*"))
    assert paths.allows(b"/echo") and paths.allows(b"/extra/a/b?c")
    assert not paths.allows(b"/echo/x") and not paths.allows(b"/extra/../slots")
    assert not paths.allows(b"/extra/")


def test_a_path_refused_is_404_before_anything_and_audited() -> None:
    door, lines = door_with(key())
    refusal, req = enter(door, target=b"/slots/0?action=erase")
    assert refusal is not None and (refusal.status, refusal.code) == (404, "not_found")
    assert req.ticket is not None
    req.ticket.end = refusal.end
    req.ticket.close(404, 0, 0)
    line = json.loads(lines[0])
    assert (line["path"], line["status"], line["end"], line["key"]) == ("/slots/0", 404,
                                                                       "refused", "alice")
    # without a key, the 401 comes first: a stranger learns nothing of the paths
    refusal, _ = enter(door, None, target=b"/slots/0?action=erase")
    assert refusal is not None and refusal.status == 401


@pytest.mark.parametrize("headers", [
    [], [(b"Authorization", b"Bearer wrong")], [(b"Authorization", b"Basic czNjcmV0")],
    [(b"Authorization", b"Bearer ")], [(b"Authorization", b"s3cret")],
    [(b"Authorization", b"Bearer s3cret"), (b"authorization", b"Bearer s3cret")],
    [(b"Authorization", b"Bearer " + b"x" * 100_000)],
])
def test_no_key_a_wrong_one_or_two_is_401(headers: list[tuple[bytes, bytes]]) -> None:
    door, _ = door_with(key())
    req = Req(headers=headers)
    refusal = door.enter(req, Conn(), Paths())
    assert refusal is not None and (refusal.status, refusal.code) == (401, "invalid_api_key")
    assert door.rejected == {"invalid_api_key": 1}


def test_a_health_check_needs_no_key_and_nothing_else_passes_with_it() -> None:
    door, _ = door_with(key())
    assert door.enter(Req(b"/health", method=b"GET"), Conn(), Paths()) is None
    assert door.enter(Req(b"/health", method=b"HEAD"), Conn(), Paths()) is None
    for req in (Req(b"/health", method=b"POST"), Req(b"/health?x", method=b"GET"),
                Req(b"/v1/models", method=b"GET")):
        refusal = door.enter(req, Conn(), Paths())
        assert refusal is not None and refusal.status == 401


def test_the_bearer_scheme_is_case_insensitive_and_the_key_found() -> None:
    door, _ = door_with(key(), key("bob", "other"))
    req = Req(headers=[(b"authorization", b"bearer other")])
    assert door.enter(req, Conn(), Paths()) is None
    assert req.ticket is not None and req.ticket.key is not None
    assert req.ticket.key.id == "bob"


def test_an_expired_key_and_an_old_secret_after_its_overlap_are_401() -> None:
    wall = Clock(1.8e9)
    rotated = K.rotate_key((key(expires=1.8e9 + 100),), "alice", K.hash_secret("new"), 60,
                           wall.t)
    door, _ = door_with(*rotated, wall=wall)
    for secret in ("s3cret", "new"):  # both, within the overlap
        assert enter(door, secret)[0] is None
    wall.t += 60
    assert enter(door, "s3cret")[0] is not None  # the overlap is over
    assert enter(door, "new")[0] is None
    wall.t += 40
    refusal = enter(door, "new")[0]
    assert refusal is not None and refusal.status == 401  # expired


def test_exactly_n_requests_in_a_minute_pass_and_the_window_slides() -> None:
    clock = Clock()
    door, _ = door_with(key(requests_per_minute=3), clock=clock)
    for i in range(3):
        refusal, req = enter(door)
        assert refusal is None
        assert req.ticket is not None and req.ticket.rate is not None
        rate = dict(header_pairs(req.ticket.rate))
        assert rate[b"x-ratelimit-limit-requests"] == b"3"
        assert rate[b"x-ratelimit-remaining-requests"] == b"%d" % (2 - i)
        req.ticket.close(200, 10, 100)
        clock.t += 10.0  # at 1000, 1010, 1020
    refusal, req = enter(door)  # the fourth, at 1030
    assert refusal is not None and (refusal.status, refusal.end) == (429, "limited")
    headers = dict(refusal.headers)
    assert headers[b"Retry-After"] == b"30"  # 1000 leaves the window at 1060
    assert headers[b"retry-after-ms"] == b"30000"
    assert headers[b"x-ratelimit-remaining-requests"] == b"0"
    assert headers[b"x-ratelimit-reset-requests"] == b"30s"
    clock.t = 1059.999
    assert enter(door)[0] is not None  # still 3 in the last minute
    clock.t = 1060.0  # the first is out: one more may begin, not two
    assert enter(door)[0] is None
    assert enter(door)[0] is not None
    assert door.keys["alice"].rejected == {"requests": 3}


def test_tokens_per_minute_count_what_the_engine_said() -> None:
    clock = Clock()
    door, _ = door_with(key(tokens_per_minute=100), clock=clock)
    refusal, req = enter(door)
    assert refusal is None and req.ticket is not None
    req.ticket.answer = True
    req.ticket.tail1 = (b'data: {"choices":[],"usage":{"prompt_tokens":70,"completion_tokens"'
                        b':31,"total_tokens":101}}\n\ndata: [DONE]\n\n')
    req.ticket.close(200, 400, 2000)
    assert door.keys["alice"].tokens(clock.t) == 101
    refusal, _ = enter(door)
    assert refusal is not None and refusal.status == 429 and "tokens" in refusal.message
    headers = dict(refusal.headers)
    assert headers[b"x-ratelimit-remaining-tokens"] == b"0"
    assert headers[b"Retry-After"] == b"60"
    clock.t += 60.0
    assert enter(door)[0] is None


def test_requests_at_once_are_limited_and_freed_at_their_end() -> None:
    door, _ = door_with(key(max_concurrency=2))
    first, second = enter(door)[1], enter(door)[1]
    refusal = enter(door)[0]
    assert refusal is not None and refusal.status == 429
    assert dict(refusal.headers)[b"Retry-After"] == b"1"
    assert first.ticket is not None and second.ticket is not None
    first.ticket.close(499, 0, 0)
    first.ticket.close(499, 0, 0)  # (once only)
    assert enter(door)[0] is None
    assert door.keys["alice"].inflight == 2


def test_a_change_of_keys_keeps_what_a_key_used_and_drops_a_revoked_one() -> None:
    door, _ = door_with(key(max_concurrency=1), key("bob", "b"))
    _, held = enter(door)
    door.set_keys([key(max_concurrency=1).to_doc()])  # bob revoked
    assert enter(door, "b")[0] is not None
    assert enter(door)[0] is not None  # alice's request in flight still counts
    assert held.ticket is not None
    held.ticket.close(200, 0, 0)
    assert enter(door)[0] is None


@pytest.mark.parametrize("tail0,tail1,expect", [
    (b"", b'{"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5}}',
     (12, 5, False)),
    (b'data: {"usage":{"prompt_tokens":7,"comp', b'letion_tokens":9}}\n\ndata: [DONE]\n\n',
     (7, 9, False)),
    (b"", b'{"usage":{"completion_tokens":4}}', (25, 4, True)),  # prompt estimated
    (b"", b'data: {"choices":[{"delta":{}}],"usage":null}\n\ndata: [DONE]\n\n', (25, 6, True)),
    # llama-server's stream without include_usage: its timings say how many were predicted
    (b'data: {"choices":[],"timings":{"prompt_n":1,"predicted_n":4,"predicted_ms":1.3}}',
     b'\n\ndata: [DONE]\n\n', (25, 4, True)),
])
def test_usage_is_read_from_the_end_of_the_answer(tail0: bytes, tail1: bytes,
                                                  expect: tuple[int, int, bool]) -> None:
    door, lines = door_with()
    door.auth = False
    req = Req()
    assert door.enter(req, Conn(), Paths()) is None
    ticket = req.ticket
    assert ticket is not None
    ticket.answer, ticket.tail0, ticket.tail1, ticket.events = True, tail0, tail1, 6
    ticket.end = "done"
    ticket.close(200, 100, 5000)
    line = json.loads(lines[0])
    assert (line["prompt_tokens"], line["completion_tokens"], line["tokens_estimated"]) == expect


def test_the_audit_line_says_what_happened_and_never_the_secret() -> None:
    door, lines = door_with(key())
    req = Req(b'/v1/chat/completions?api_key=s3cret', "s3cret",
              headers=[(b"X-Note", b"a\"b")])
    assert door.enter(req, Conn(), Paths()) is None
    ticket = req.ticket
    assert ticket is not None
    ticket.model, ticket.service = 'm"\u00e9\n', "svc"
    ticket.end, ticket.ttft = "done", 0.25
    ticket.close(200, 321, 4321)
    raw = lines[0]
    assert "s3cret" not in raw and "\n" not in raw
    line = json.loads(raw)
    assert set(line) == {"time", "key", "client", "method", "path", "model", "service",
                         "status", "prompt_tokens", "completion_tokens", "tokens_estimated",
                         "ttft_s", "duration_s", "bytes_in", "bytes_out", "end"}
    assert (line["key"], line["client"], line["method"], line["path"]) == (
        "alice", "10.1.2.3", "POST", "/v1/chat/completions")
    assert (line["model"], line["service"], line["status"], line["end"]) == (
        'm"\u00e9\n', "svc", 200, "done")
    assert (line["bytes_in"], line["bytes_out"], line["ttft_s"]) == (321, 4321, 0.25)
    assert line["prompt_tokens"] is None  # not an answer that generated
    assert line["time"] == "2027-01-15T08:00:00.000Z"


def test_with_auth_off_every_request_comes_in_and_is_audited() -> None:
    door = Door()
    lines: list[str] = []
    door.audit = lines.append
    req = Req(secret="anything")
    assert door.enter(req, Conn(), Paths()) is None
    assert req.ticket is not None and req.ticket.key is None
    req.ticket.close(499, 0, 0)
    assert json.loads(lines[0])["end"] == "client_gone"
    door.audit = None
    req = Req()
    assert door.enter(req, Conn(), Paths()) is None and req.ticket is None  # nothing held


# --- the keys file -------------------------------------------------------------------------------

HEX = "a" * 64


@pytest.mark.parametrize("text,problem", [
    ('[[key]]\nid = "a b"\nsha256 = "' + HEX + '"', "key[0].id: must be 1-64"),
    ('[[key]]\nid = "a"\nsha256 = "' + HEX.upper() + '"', "key[0].sha256: must be the SHA-256"),
    ('[[key]]\nid = "a"', "key[0].sha256: required key is missing"),
    ('[[key]]\nid = "a"\nsha256 = "' + HEX + '"\nsecret = "x"', "key[0].secret: unknown key"),
    ('[[key]]\nid = "a"\nsha256 = "' + HEX + '"\nexpires = 2027-01-01T00:00:00',
     "key[0].expires: give the time with its offset"),
    ('[[key]]\nid = "a"\nsha256 = "' + HEX + '"\nexpires = "soon"', "key[0].expires: must be"),
    ('[[key]]\nid = "a"\nsha256 = "' + HEX + '"\nrequests_per_minute = 0',
     "key[0].requests_per_minute: must be >= 1"),
    ('[[key]]\nid = "a"\nsha256 = "' + HEX + '"\nmodels = []', "key[0].models: must not be"),
    ('[[key]]\nid = "a"\nsha256 = "' + HEX + '"\nprevious_sha256 = "' + "b" * 64 + '"',
     "key[0].previous_until: required with previous_sha256"),
    ('[[key]]\nid = "a"\nsha256 = "' + HEX + '"\n[[key]]\nid = "a"\nsha256 = "' + "b" * 64
     + '"', "key[1].id: 'a' is already used by key[0]"),
    ('[[key]]\nid = "a"\nsha256 = "' + HEX + '"\n[[key]]\nid = "b"\nsha256 = "' + HEX + '"',
     "key[1].sha256: the same secret as key[0] (a)"),
    ('[[key]\nid = "a"', "TOML syntax error"),
    ("key = 3", "key: must be an array of tables"),
])
def test_a_broken_keys_file_is_refused_whole(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        K.parse_keys(text, "keys.toml")
    assert any(problem in p for p in exc.value.problems), exc.value.problems


def test_keys_written_are_read_back_the_same(tmp_path: Path) -> None:
    keys = (key(models=("m1", 'odd "name"'), requests_per_minute=5, tokens_per_minute=1000,
                max_concurrency=2, expires=1.8e9),
            key("bob", "b", previous_sha256="c" * 64, previous_until=1.8e9 + 5))
    path = tmp_path / "keys.toml"
    K.write_keys(str(path), keys, os.getgid())
    assert K.load_keys(str(path)) == keys
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["keys.toml"]  # no temporary file left
    assert "s3cret" not in path.read_text()
    assert K.load_keys(str(tmp_path / "none.toml")) == ()  # not made yet: no key


def test_new_revoke_and_rotate_change_only_their_key() -> None:
    keys = K.add_key((key(),), key("bob", "b"))
    with pytest.raises(ValueError, match="exists already"):
        K.add_key(keys, key("bob", "c"))
    with pytest.raises(ValueError, match="no key 'carol'"):
        K.revoke_key(keys, "carol")
    assert [k.id for k in K.revoke_key(keys, "alice")] == ["bob"]
    rotated = K.rotate_key(keys, "bob", "d" * 64, 3600, 100.0)
    assert rotated[0] == keys[0]
    assert (rotated[1].sha256, rotated[1].previous_sha256, rotated[1].previous_until) == (
        "d" * 64, K.hash_secret("b"), 3700.0)
    now = K.rotate_key(keys, "bob", "d" * 64, 0, 100.0)[1]
    assert now.previous_sha256 is None  # no overlap: the old secret is gone at once
    assert K.expired_rotations(rotated, 3700.0)[1].previous_sha256 is None


@pytest.mark.parametrize("text,expect", [
    ("30d", 1000 + 30 * 86400), ("12h", 1000 + 43200), ("90", 1090),
    ("2027-01-01", dt.datetime(2027, 1, 1, tzinfo=dt.UTC).timestamp()),
    ("2027-01-01T10:00:00+02:00", dt.datetime(2027, 1, 1, 8, tzinfo=dt.UTC).timestamp()),
    ("2027-01-01T10:00:00Z", dt.datetime(2027, 1, 1, 10, tzinfo=dt.UTC).timestamp()),
])
def test_expires_takes_a_time_a_date_or_a_duration(text: str, expect: float) -> None:
    assert K.parse_expires(text, 1000.0) == expect


@pytest.mark.parametrize("text", ["2027-01-01T10:00:00", "tomorrow", "1y", ""])
def test_expires_refuses_what_it_cannot_place(text: str) -> None:
    with pytest.raises(ValueError):
        K.parse_expires(text, 1000.0)


# --- the config ----------------------------------------------------------------------------------


def _cfg(extra: str, listen: str = "127.0.0.1:9000") -> str:
    return (f'[router]\nlisten = "{listen}"\n{extra}\n[[service]]\nname = "a"\n'
            'command = ["x"]\nport = 8001\n')


def test_auth_audit_and_the_paths_are_read(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    K.write_keys(str(keys), (key(),), None)
    cfg = parse_config(_cfg(f'allow_paths = ["/x", "/y/*", "/v1/models"]\n'
                            f'max_connections_per_client = 8\n[auth]\nkeys_file = "{keys}"\n'
                            f'[audit]\npath = "{tmp_path / "audit.log"}"',
                            "0.0.0.0:9000"))
    assert cfg.router is not None and cfg.router.allow_paths == ("/x", "/y/*")
    assert cfg.router.max_connections_per_client == 8
    assert cfg.auth is not None and cfg.auth.keys_file == str(keys)
    assert cfg.audit is not None and cfg.warnings == ()  # keys: no warning


@pytest.mark.parametrize("extra,problem", [
    ('[auth]\nkeys_file = "keys.toml"', "auth.keys_file: must be an absolute path"),
    ('[auth]\nkeys_file = "/nonexistent-dir/k.toml"\nx = 1', "auth.x: unknown key"),
    ('[audit]\npath = "/nonexistent-dir/audit.log"', "audit.path: its directory"),
    ('[audit]\npath = "/tmp"', "audit.path: '/tmp' is a directory"),
    ('allow_paths = ["slots"]', "router.allow_paths[0]: must be a path from `/`"),
    ('allow_paths = ["/a*b"]', "router.allow_paths[0]: `*` goes only at the end"),
    ('allow_paths = ["/a/../b"]', "router.allow_paths[0]: no `.`/`..` segments"),
    ('allow_paths = ["/a?b=1"]', "router.allow_paths[0]: must be a path"),
    ("max_connections = 4\nmax_connections_per_client = 5",
     "router.max_connections_per_client: must be <= max_connections (4)"),
])
def test_bad_front_door_settings_are_named(extra: str, problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(_cfg(extra))
    assert any(problem in p for p in exc.value.problems), exc.value.problems


def test_a_broken_keys_file_is_a_config_error(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('[[key]]\nid = "a"\n')
    with pytest.raises(ConfigError) as exc:
        parse_config(_cfg(f'[auth]\nkeys_file = "{keys}"'))
    assert f"auth.keys_file: {keys}: key[0].sha256: required key is missing" in \
        exc.value.problems


@pytest.mark.parametrize("listen,warns", [("0.0.0.0:9000", True), ("[::]:9000", True),
                                          ("10.0.0.5:9000", True), ("127.0.0.1:9000", False),
                                          ("[::1]:9000", False), ("localhost:9000", False)])
def test_a_listener_beyond_loopback_without_auth_is_warned_of(listen: str, warns: bool) -> None:
    cfg = parse_config(_cfg("", listen))
    assert any("beyond loopback" in w for w in cfg.warnings) is warns


# --- the daemon, with the official client and raw sockets --------------------------------------

ALICE, BOB, CAROL = "sk-alice-0123456789", "sk-bob-0123456789", "sk-carol-0123456789"


class Front:
    """The daemon's door: the router (models m1 and m2), the gate of `one` (m1), the files."""

    def __init__(self, d: Daemon, router: int, gate: int, tmp: Path) -> None:
        self.d = d
        self.router = router
        self.gate = gate
        self.keys = tmp / "keys.toml"
        self.audit = tmp / "audit.log"
        self.skip = 0  # the lines before the test's own

    def mark(self) -> None:
        """From now on `lines` counts the test's own: a request of its own path is made,
        and what the audit log holds up to its line is passed over."""
        http(self.router, "POST", "/mark", {}, secret=ALICE)
        wait_until(lambda: any('"/mark"' in x for x in self._raw()), 10, what="the mark")
        self.skip = next(i for i, x in enumerate(self._raw()) if '"/mark"' in x) + 1

    def _raw(self) -> list[str]:
        return self.audit.read_text().splitlines() if self.audit.exists() else []

    def lines(self, n: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
        """The test's audit lines, once there are at least `n` (written every 0.1 s)."""
        wait_until(lambda: len(self._raw()) - self.skip >= n, timeout,
                   what=f"{n} audit lines")
        return [json.loads(line) for line in self._raw()[self.skip:]]

    def metrics(self) -> str:
        port = int(self.d.doc["metrics"]["listen"].rsplit(":", 1)[1])
        status, _, body = http(port, "GET", "/metrics")
        assert status == 200
        return body.decode()


def http(port: int, method: str, path: str, body: dict[str, Any] | None = None, *,
         secret: str | None = None, headers: dict[str, str] | None = None,
         timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    conn = http_client(port, timeout)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if secret is not None:
        hdrs["Authorization"] = f"Bearer {secret}"
    try:
        conn.request(method, path, json.dumps(body).encode() if body is not None else None,
                     hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def http_client(port: int, timeout: float) -> Any:
    import http.client

    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def chat(model: str = "m1", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 3, **extra}


@contextlib.contextmanager
def door_daemon(tmp: Path, keys: tuple[K.ApiKey, ...], router: dict[str, Any] | None = None,
                gate: dict[str, Any] | None = None) -> Iterator[Front]:
    rport, gport = free_port(), free_port()
    one = fake_service("one", free_port(), models=["m1"],
                       gate={"listen": f"127.0.0.1:{gport}", **(gate or {})})
    two = fake_service("two", free_port(), models=["m2"])
    K.write_keys(str(tmp / "keys.toml"), keys, None)
    doc = base_config(tmp, [one, two], router={"listen": f"127.0.0.1:{rport}",
                                               **(router or {})},
                      auth={"keys_file": str(tmp / "keys.toml")},
                      audit={"path": str(tmp / "audit.log")})
    with running(tmp, doc) as d:
        front = Front(d, rport, gport, tmp)

        def up() -> bool:
            try:
                return all(http(p, "POST", "/v1/chat/completions", chat(m),
                                secret=ALICE)[0] == 200
                           for p, m in ((rport, "m1"), (rport, "m2"), (gport, "m1")))
            except OSError:
                return False

        wait_until(up, 20, what="both models through the router and the gate")
        front.mark()
        yield front


def keyring() -> tuple[K.ApiKey, ...]:
    return (K.ApiKey("alice", K.hash_secret(ALICE)),
            K.ApiKey("bob", K.hash_secret(BOB), models=("m1",)),
            K.ApiKey("carol", K.hash_secret(CAROL), requests_per_minute=2, max_concurrency=1))


_CLIENTS: list[Any] = []  # closed at the end of each test (their pools hold sockets)


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


def openai_client(port: int, secret: str, retries: int = 0) -> Any:
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=secret,
                           max_retries=retries, timeout=20)
    _CLIENTS.append(client)
    return client


def test_keys_with_the_official_client_and_raw_sockets(tmp_path: Path) -> None:
    import openai

    with door_daemon(tmp_path, keyring()) as f:
        for port in (f.router, f.gate):
            with pytest.raises(openai.AuthenticationError) as exc:
                openai_client(port, "sk-wrong").chat.completions.create(**chat())
            assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
        # no key at all, on a raw socket, with a body announced that never comes: the 401
        # comes before the body is read, and the connection closes
        with socket.create_connection(("127.0.0.1", f.router), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Length: 1000000\r\n\r\n")
            answer = s.recv(65536)
            assert answer.startswith(b"HTTP/1.1 401 ") and b"invalid_api_key" in answer
            assert b"Connection: close" in answer
        # a model the key may not use: exactly as if it did not exist
        bob = openai_client(f.router, BOB)
        with pytest.raises(openai.NotFoundError) as nf:
            bob.chat.completions.create(**chat("m2"))
        assert nf.value.code == "model_not_found" and "m2" in str(nf.value)
        assert "known models: m1" in str(nf.value)
        with pytest.raises(openai.NotFoundError):
            bob.chat.completions.create(**chat("no-such"))
        assert [m.id for m in bob.models.list()] == ["m1"]
        with pytest.raises(openai.NotFoundError):
            bob.models.retrieve("m2")
        assert sorted(m.id for m in openai_client(f.router, ALICE).models.list()) == ["m1", "m2"]
        reply = bob.chat.completions.create(**chat("m1"))
        assert reply.choices[0].message.content == "t0 t1 t2"
        assert reply.usage is not None and reply.usage.prompt_tokens == 2
        # bob may use the gate of `one` (m1), not that of a service he has no model of
        assert http(f.gate, "POST", "/v1/chat/completions", chat(), secret=BOB)[0] == 200
        assert http(f.gate, "GET", "/v1/models", secret=ALICE)[0] == 200
        lines = f.lines(9)
        assert all(ALICE not in json.dumps(x) and BOB not in json.dumps(x) for x in lines)
        assert "sk-" not in f.audit.read_text()
        assert [(x["status"], x["key"], x["end"]) for x in lines[:2]] == [
            (401, None, "refused"), (401, None, "refused")]


def test_the_key_of_a_request_never_reaches_the_engine(tmp_path: Path) -> None:
    with door_daemon(tmp_path, keyring(), gate={"allow_paths": ["/echo"]}) as f:
        status, _, body = http(f.gate, "POST", "/echo", {"x": 1}, secret=ALICE,
                               headers={"X-Other": "kept"})
        assert status == 200
        seen = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
        assert "authorization" not in seen and seen["x-other"] == "kept"


def test_limits_give_429_with_the_openai_headers_and_the_client_retries(tmp_path: Path
                                                                        ) -> None:
    import openai

    with door_daemon(tmp_path, keyring()) as f:
        carol = openai_client(f.router, CAROL)
        raw = carol.chat.completions.with_raw_response.create(**chat())
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
        assert raw.headers["x-ratelimit-remaining-requests"] == "1"
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
        carol.chat.completions.create(**chat())
        with pytest.raises(openai.RateLimitError) as exc:  # the third in the minute
            carol.chat.completions.create(**chat())
        headers = exc.value.response.headers
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert 50 <= int(headers["retry-after"]) <= 60
        assert exc.value.code == "rate_limit_exceeded"
        lines = f.lines(3)
        assert [(x["status"], x["end"]) for x in lines] == [(200, "done"), (200, "done"),
                                                            (429, "limited")]
        assert 'llm_supervisor_key_rejected_total{key="carol",reason="requests"} 1.0' in \
            f.metrics()


def test_the_client_retries_after_a_concurrency_429_as_told(tmp_path: Path) -> None:
    """carol may have one request at a time: while a stream holds it, the client's next
    request gets 429 with Retry-After 1; the official client waits and tries again."""
    keys = (K.ApiKey("alice", K.hash_secret(ALICE)),
            K.ApiKey("carol", K.hash_secret(CAROL), max_concurrency=1))
    with door_daemon(tmp_path, keys) as f:
        done: list[bytes] = []
        holder = threading.Thread(target=lambda: done.append(http(
            f.router, "POST", "/v1/chat/completions",
            chat(stream=True, max_tokens=40, fake_token_delay_s=0.1), secret=CAROL)[2]))
        holder.start()
        wait_until(lambda: 'llm_supervisor_key_inflight_requests{key="carol"} 1.0'
                   in f.metrics(), 10, what="the stream inside")
        began = time.monotonic()
        reply = openai_client(f.router, CAROL, retries=10).chat.completions.create(**chat())
        took = time.monotonic() - began
        holder.join(20)
        assert reply.choices[0].message.content == "t0 t1 t2"
        assert done and b"data: [DONE]" in done[0]
        assert took >= 0.5  # it waited as told (Retry-After: 1), it did not hammer
        wait_until(lambda: [x["end"] for x in f.lines(2)].count("done") == 2, 10,
                   what="both answers audited")
        ends = [(x["status"], x["end"]) for x in f.lines(2)]
        assert (429, "limited") in ends and ends.count((200, "done")) == 2


def test_an_engines_admin_paths_are_never_reachable(tmp_path: Path) -> None:
    with door_daemon(tmp_path, keyring()) as f:
        pid = f.d.service("one")["pid"]
        for port in (f.router, f.gate):
            for path in ("/admin/shutdown", "/slots/0?action=erase", "/_ctl?exit=3",
                         "/_ctl?health_status=500", "/v1/models/../../_ctl?exit=3",
                         "/metrics"):
                status, _, body = http(port, "POST", path, chat(), secret=ALICE)
                assert status == 404, (port, path, body)
                assert json.loads(body)["error"]["code"] == "not_found"
        time.sleep(0.5)
        assert f.d.service("one")["pid"] == pid and f.d.service("one")["state"] == "ready"
        assert http(f.router, "POST", "/v1/chat/completions", chat(), secret=ALICE)[0] == 200


def test_revoke_and_rotate_under_16_streams_cut_none(tmp_path: Path) -> None:
    with door_daemon(tmp_path, keyring()) as f:
        streams = Streams(f.router, 16, tokens=30, delay=0.05, model="m1", secret=ALICE)
        wait_until(lambda: 'llm_supervisor_key_inflight_requests{key="alice"} 16.0'
                   in f.metrics(), 15, what="16 streams inside")
        out = f.d.llmctl("key", "revoke", "alice")
        assert out.returncode == 0, out.stderr
        assert "revoked" in out.stdout
        # the next request with it, at once
        assert http(f.router, "POST", "/v1/chat/completions", chat(), secret=ALICE)[0] == 401
        assert http(f.gate, "POST", "/v1/chat/completions", chat(), secret=ALICE)[0] == 401
        # a rotation with an overlap: both secrets, then only the new one
        out = f.d.llmctl("key", "rotate", "bob", "--overlap", "1h")
        assert out.returncode == 0, out.stderr
        new = next(line.split(": ", 1)[1] for line in out.stdout.splitlines()
                   if line.startswith("secret: "))
        assert new.startswith("sk-llm-") and new not in f.keys.read_text()
        for secret in (BOB, new):
            assert http(f.router, "POST", "/v1/chat/completions", chat(), secret=secret)[0] == 200
        out = f.d.llmctl("key", "rotate", "bob", "--overlap", "0")
        newer = next(line.split(": ", 1)[1] for line in out.stdout.splitlines()
                     if line.startswith("secret: "))
        assert http(f.router, "POST", "/v1/chat/completions", chat(), secret=new)[0] == 401
        assert http(f.router, "POST", "/v1/chat/completions", chat(), secret=newer)[0] == 200
        streams.join(30)
        assert (streams.done, streams.cut) == (16, 0)
        listed = f.d.llmctl("key", "list")
        assert listed.returncode == 0 and "bob" in listed.stdout and "alice" not in listed.stdout
        stat_ = os.stat(f.keys)
        assert stat.S_IMODE(stat_.st_mode) == 0o640


def test_a_key_made_by_llmctl_works_at_once_with_its_limits(tmp_path: Path) -> None:
    with door_daemon(tmp_path, keyring()) as f:
        out = f.d.llmctl("key", "new", "dave", "--models", "m2", "--rpm", "2", "--expires",
                         "30d")
        assert out.returncode == 0, out.stderr
        secret = next(line.split(": ", 1)[1] for line in out.stdout.splitlines()
                      if line.startswith("secret: "))
        assert K.hash_secret(secret) in f.keys.read_text() and secret not in f.keys.read_text()
        # (a request counts against the key's rate once it is let in, whatever its answer)
        assert http(f.router, "POST", "/v1/chat/completions", chat("m1"), secret=secret)[0] == 404
        assert http(f.router, "POST", "/v1/chat/completions", chat("m2"), secret=secret)[0] == 200
        assert http(f.router, "POST", "/v1/chat/completions", chat("m2"), secret=secret)[0] == 429
        data = f.d.call("key-list")
        dave = next(k for k in data["keys"] if k["id"] == "dave")
        assert (dave["models"], dave["rpm"], dave["requests"]) == (["m2"], 2, 3)  # 404 200 429
        assert dave["last_used"] is not None and dave["expires"] > time.time() + 29 * 86400
        out = f.d.llmctl("key", "new", "dave")
        assert out.returncode != 0 and "exists already" in out.stderr
        out = f.d.llmctl("key", "new", "bad id!")
        assert out.returncode != 0 and "key id" in out.stderr
        out = f.d.llmctl("key", "rotate", "nobody")
        assert out.returncode != 0 and "no key 'nobody'" in out.stderr


def test_a_hand_broken_keys_file_is_refused_and_the_keys_in_force_stay(tmp_path: Path
                                                                        ) -> None:
    with door_daemon(tmp_path, keyring()) as f:
        good = f.keys.read_text()
        f.keys.write_text(good + '\n[[key]]\nid = "eve"\nsha256 = "not hex"\n')
        out = f.d.llmctl("reload")
        assert out.returncode != 0 and "sha256" in out.stderr
        assert http(f.router, "POST", "/v1/chat/completions", chat(), secret=ALICE)[0] == 200
        out = f.d.llmctl("key", "revoke", "alice")  # refused too: the file is broken
        assert out.returncode != 0 and "broken" in out.stderr
        assert http(f.router, "POST", "/v1/chat/completions", chat(), secret=ALICE)[0] == 200
        # fixed by hand: a new key, alice gone; then SIGHUP
        f.keys.write_text(K.render_keys((K.ApiKey("eve", K.hash_secret("sk-eve-1")),)))
        f.d.signal(signal.SIGHUP)
        wait_until(lambda: http(f.router, "POST", "/v1/chat/completions", chat(),
                                secret="sk-eve-1")[0] == 200, 10, what="eve's key in force")
        assert http(f.router, "POST", "/v1/chat/completions", chat(), secret=ALICE)[0] == 401


def test_the_audit_log_says_how_each_request_ended(tmp_path: Path) -> None:
    with door_daemon(tmp_path, keyring()) as f:
        # done, with the engine's usage (a stream that asks for it)
        status, _, body = http(f.router, "POST", "/v1/chat/completions",
                               chat(stream=True, stream_options={"include_usage": True}),
                               secret=ALICE)
        assert status == 200 and b"[DONE]" in body
        # refused (no key), limited (carol's third)
        http(f.router, "POST", "/v1/chat/completions", chat())
        for _ in range(3):
            http(f.router, "POST", "/v1/chat/completions", chat(), secret=CAROL)
        # the client goes away in the middle of a stream
        with socket.create_connection(("127.0.0.1", f.router), timeout=10) as s:
            raw = json.dumps(chat(stream=True, max_tokens=50, fake_token_delay_s=0.05)).encode()
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: "
                      b"Bearer " + ALICE.encode() + b"\r\nContent-Length: %d\r\n\r\n"
                      % len(raw) + raw)
            got = s.recv(4096)
            assert got.startswith(b"HTTP/1.1 200")
            while b"data:" not in got:  # (it leaves once a token has come)
                got += s.recv(4096)
        # the engine dies in the middle of a stream: cut
        http(f.gate, "POST", "/v1/chat/completions",
             chat(stream=True, max_tokens=10, fake_die_after=3), secret=ALICE)
        lines = f.lines(7)
        ends = [(x["status"], x["end"], x["key"]) for x in lines]
        assert ends[:5] == [(200, "done", "alice"), (401, "refused", None),
                            (200, "done", "carol"), (200, "done", "carol"),
                            (429, "limited", "carol")]
        assert sorted(ends[5:]) == [(499, "client_gone", "alice"), (502, "cut", "alice")]
        for x in lines[5:]:  # what came before the end: its events, its first token
            assert x["ttft_s"] is not None and 1 <= x["completion_tokens"] <= 50, x
        first = lines[0]
        assert (first["prompt_tokens"], first["completion_tokens"]) == (2, 3)
        assert first["tokens_estimated"] is False and first["ttft_s"] is not None
        assert (first["model"], first["service"], first["path"]) == ("m1", "one",
                                                                    "/v1/chat/completions")
        assert first["client"] == "127.0.0.1" and first["bytes_out"] > 0
        assert first["bytes_in"] == len(json.dumps(chat(
            stream=True, stream_options={"include_usage": True})))
        assert "hello there" not in f.audit.read_text()  # never the prompt
        assert "t0" not in f.audit.read_text()  # never the completion
        metrics = f.metrics()
        assert 'llm_supervisor_key_tokens_total{key="alice",kind="prompt"}' in metrics
        assert 'llm_supervisor_key_rejected_total{key="-",reason="invalid_api_key"} 1.0' in \
            metrics
        assert "llm_supervisor_audit_lines_dropped_total 0.0" in metrics
        # logrotate: the file moved, then SIGHUP; the next line goes to a new file
        f.audit.rename(f.audit.with_name("audit.log.1"))
        f.d.signal(signal.SIGHUP)
        wait_until(lambda: http(f.router, "POST", "/v1/chat/completions", chat(), secret=ALICE)[0]
                   == 200 and f.audit.exists(), 10, what="a new audit file")
        f.skip = 0
        assert f.lines(1)[-1]["key"] == "alice"


def test_a_flood_of_connections_from_one_address_is_turned_away(tmp_path: Path) -> None:
    with door_daemon(tmp_path, keyring(), router={"max_connections_per_client": 4}) as f:
        held = [socket.create_connection(("127.0.0.1", f.router), timeout=10)
                for _ in range(4)]
        try:
            for _ in range(6):
                with socket.create_connection(("127.0.0.1", f.router), timeout=10) as s:
                    data = b""
                    while chunk := s.recv(4096):
                        data += chunk
                    assert data.startswith(b"HTTP/1.1 429 ") and b"too_many_connections" in data
            # those held are served
            s = held[0]
            raw = json.dumps(chat()).encode()
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                      + ALICE.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(raw) + raw)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            assert 'llm_supervisor_connections_turned_away_total{listener="router"} 6.0' in \
                f.metrics()
        finally:
            for s in held:
                s.close()
        # once they are closed, the address may connect again
        wait_until(lambda: http(f.router, "POST", "/v1/chat/completions", chat(), secret=ALICE)[0]
                   == 200, 10, what="served again")


def test_check_warns_loudly_of_a_router_open_to_all(tmp_path: Path) -> None:
    doc = base_config(tmp_path, [fake_service("one", free_port(), models=["m1"])],
                      router={"listen": f"0.0.0.0:{free_port()}"})
    d = Daemon(tmp_path, doc)
    out = subprocess.run([sys.executable, "-m", "supervisord_llm", "--check", "--config",
                          str(d.config)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert "WARNING: router.listen = '0.0.0.0:" in out.stderr
    assert "there is no [auth]" in out.stderr


@pytest.mark.e2e
def test_tokens_of_a_real_llama_server_are_counted(tmp_path: Path) -> None:
    """llama-server behind the router, with a key and the audit log, driven by the official
    client: the tokens of its `usage` (an answer; a stream with include_usage) and of its
    `timings` (a stream without) are the key's, and the audit's."""
    from helpers import make_tiny_model, require_llama_server

    binary = require_llama_server()
    model = make_tiny_model(tmp_path / "tiny.gguf")
    rport = free_port()
    svc = {"name": "tiny", "port": free_port(), "models": ["tiny"],
           "command": [binary, "-m", str(model), "--host", "127.0.0.1", "--port", "{port}",
                       "-c", "512", "-t", "1", "--no-webui"],
           "health": {"interval_s": 0.2, "timeout_s": 0.2, "startup_timeout_s": 30}}
    K.write_keys(str(tmp_path / "keys.toml"),
                 (K.ApiKey("alice", K.hash_secret(ALICE), tokens_per_minute=100_000),), None)
    doc = base_config(tmp_path, [svc], router={"listen": f"127.0.0.1:{rport}"},
                      auth={"keys_file": str(tmp_path / "keys.toml")},
                      audit={"path": str(tmp_path / "audit.log")})
    with running(tmp_path, doc) as d:
        d.wait_state("tiny", "ready", 30)
        client = openai_client(rport, ALICE)
        messages = [{"role": "user", "content": "hello there"}]
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
        assert reply.usage is not None
        usage = []
        for options in ({"include_usage": True}, None):
            stream = client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=4, stream=True,
                **({"stream_options": options} if options else {}))
            usage.append([c.usage for c in stream if c.usage is not None])
        front = Front(d, rport, 0, tmp_path)
        lines = front.lines(3)
        got = [(x["prompt_tokens"], x["completion_tokens"], x["tokens_estimated"])
               for x in lines]
        # (random weights: a request may end before max_tokens; each line has its own)
        assert got[0] == (reply.usage.prompt_tokens, reply.usage.completion_tokens, False)
        last = usage[0][-1]
        assert got[1] == (last.prompt_tokens, last.completion_tokens, False)  # its last event
        assert 1 <= got[2][1] <= 4 and got[2][2] is True  # timings; the prompt estimated
        assert all(x["end"] == "done" and x["ttft_s"] is not None for x in lines[1:])
        metrics = front.metrics()
        total = sum(g[1] for g in got)
        assert f'llm_supervisor_key_tokens_total{{key="alice",kind="completion"}} {total}.0' \
            in metrics


def test_the_request_windows_are_bounded_in_memory() -> None:
    with pytest.raises(ConfigError, match=r"requests_per_minute: must be <= 1e\+06"):
        K.parse_keys('[[key]]\nid = "a"\nsha256 = "' + HEX + '"\nrequests_per_minute = '
                     '1000001')
    many = "".join(f'[[key]]\nid = "k{i}"\nsha256 = "{i:064x}"\nrequests_per_minute = '
                   "1000000\n" for i in range(11))
    with pytest.raises(ConfigError, match="add up to 11000000"):
        K.parse_keys(many)
    door, _ = door_with(key(requests_per_minute=1000))
    assert len(door.keys["alice"].ring) == 1000  # 8 KB: a start time a request of the limit


# --- the audit log's writer ----------------------------------------------------------------------


async def test_the_audit_writer_never_blocks_and_counts_what_it_drops(tmp_path: Path) -> None:
    """A FIFO whose reader reads nothing: the writer's writes fail at once (non-blocking),
    the loop never waits, every line is counted (written or dropped)."""
    from supervisord_llm.audit import AuditLog

    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # there, and never reads
    log = AuditLog(str(fifo))
    try:
        began = time.monotonic()
        for i in range(50_000):
            log.add(f'{{"n":{i},"pad":"{"x" * 200}"}}')
        assert time.monotonic() - began < 5  # (no write was waited for)
        wait_until(lambda: log.counters()["written"] + log.counters()["dropped"] == 50_000,
                   10, what="every line accounted for")
        assert log.counters()["dropped"] > 0 and log.counters()["errors"] > 0
    finally:
        await asyncio.to_thread(log.close)
        os.close(reader)


async def test_the_audit_log_goes_to_the_journal_as_one_entry_a_line(tmp_path: Path) -> None:
    from supervisord_llm.audit import IDENTIFIER, AuditLog

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "journal.sock"))
    sock.settimeout(5)
    log = AuditLog("journal", journal_socket=str(tmp_path / "journal.sock"))
    try:
        log.add('{"status":200}')
        log.add('{"status":401}')
        got = [sock.recv(65536) for _ in range(2)]
        assert got[0] == (b"SYSLOG_IDENTIFIER=" + IDENTIFIER.encode()
                          + b'\nPRIORITY=6\nMESSAGE={"status":200}\n')
        assert got[1].endswith(b'MESSAGE={"status":401}\n')
    finally:
        await asyncio.to_thread(log.close)
        sock.close()


async def test_an_engine_that_answers_nothing_is_audited_as_an_error() -> None:
    """A 502 of the gate's (the engine closed the connection without an answer): `error`."""
    from helpers import RawBackend
    from supervisord_llm.config import GateSection, parse_listen
    from supervisord_llm.gate import GateHost

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    host = GateHost()
    lines: list[str] = []
    try:
        async with RawBackend(hang_up) as backend:
            host.start()
            host.door.audit = lines.append
            listen = parse_listen(f"127.0.0.1:{free_port()}")
            gate = await host.add("svc", GateSection(listen))
            host.call(gate.set_upstreams, ("127.0.0.1", backend.port), None)
            status, _, _ = await asyncio.to_thread(http, listen.port, "POST",
                                                   "/v1/chat/completions", chat())
            assert status == 502
            await async_wait_until(lambda: lines, 5, what="the audit line")
            line = json.loads(lines[0])
            assert (line["status"], line["end"], line["service"]) == (502, "error", "svc")
    finally:
        await host.close()


# --- what an attacker found, each fixed ----------------------------------------------------------


async def test_a_strangers_refusals_are_audited_at_a_bounded_rate_and_summed_up() -> None:
    wall = Clock(1.8e9)
    door, lines = door_with(key(), wall=wall)
    for i in range(50):
        req = Req(b"/" + b"A" * 5000 if i == 0 else b"/v1/models", method=b"GET")
        refusal = door.enter(req, Conn(), Paths())
        assert refusal is not None and req.ticket is not None
        req.ticket.end = refusal.end
        req.ticket.close(refusal.status, 0, 0)
    assert len(lines) == 20 and door.suppressed == 30
    first = json.loads(lines[0])
    assert first["path"] == "/" + "A" * 1023 + "..."  # cut
    wall.t += 10.0  # the next window: the held-back ones summed up first
    req = Req(b"/v1/models", method=b"GET")
    assert door.enter(req, Conn(), Paths()) is not None
    assert req.ticket is not None
    req.ticket.close(401, 0, 0)
    summary = json.loads(lines[20])
    assert (summary["client"], summary["more_refused"], summary["end"]) == ("10.1.2.3", 30,
                                                                           "refused")
    assert json.loads(lines[21])["status"] == 401
    # a key's own refusals (429) are never held back
    door2, lines2 = door_with(key(max_concurrency=1))
    _, _held = enter(door2)
    for _ in range(40):
        refusal, req = enter(door2)
        assert refusal is not None and req.ticket is not None
        req.ticket.end = refusal.end
        req.ticket.close(429, 0, 0)
    assert len(lines2) == 40


async def test_long_paths_are_not_kept_by_the_escape_cache() -> None:
    from supervisord_llm.gate import door as door_module

    before = dict(door_module._TEXTS)
    door, _lines = door_with()
    door.auth = False
    for i in range(50):
        req = Req(b"/x%d" % i + b"B" * 2000)
        assert door.enter(req, Conn(), Paths()) is not None
        assert req.ticket is not None
        req.ticket.close(404, 0, 0)
    assert all(len(k) <= 256 for k in set(door_module._TEXTS) - set(before))


def test_a_change_of_a_keys_rpm_keeps_the_requests_of_the_window() -> None:
    clock = Clock()
    door, _ = door_with(key(requests_per_minute=3), clock=clock)
    for _ in range(3):
        assert enter(door)[0] is None
        clock.t += 1
    door.set_keys([key(requests_per_minute=4).to_doc()])
    assert enter(door)[0] is None  # the fourth of the minute
    assert enter(door)[0] is not None
    door.set_keys([key(requests_per_minute=2).to_doc()])
    assert enter(door)[0] is not None  # (the newest two of those still count)
    clock.t += 60
    assert enter(door)[0] is None


def test_a_keys_file_others_may_write_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    K.write_keys(str(path), (key(),), None)
    path.chmod(0o666)
    with pytest.raises(ConfigError, match="writable by others"):
        K.load_keys(str(path))
    path.chmod(0o660)
    with pytest.raises(ConfigError, match="writable by its group"):
        K.load_keys(str(path))
    path.chmod(0o640)
    os.chown(path, 65534, -1)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        K.load_keys(str(path))


def test_a_change_that_would_not_read_back_is_not_written(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    path = tmp_path / "keys.toml"
    monkeypatch.setattr(K, "MAX_FILE_BYTES", 4096)
    keys = tuple(key(f"k{i}", f"s{i}", models=tuple(f"m{j}" * 20 for j in range(10)))
                 for i in range(10))
    with pytest.raises(ValueError, match="larger than 0 MB"):
        K.write_keys(str(path), keys, None)
    assert not path.exists()
    with pytest.raises(ValueError, match="cannot be read back"):
        K.write_keys(str(path), (key(models=("\x1b[31m",)),), None)
    with pytest.raises(ValueError, match="more than 100 years"):
        K.parse_expires("9999-12-31T23:59:59-05:00", 1.8e9)


def test_a_client_that_leaves_mid_body_frees_its_keys_slot(tmp_path: Path) -> None:
    """Through the router, a client that leaves while its body is being read for `model`
    (part of it sent; 100-continue and nothing; an unfinished chunked body): the key's one
    slot is freed, and each is audited 499."""
    keys = (K.ApiKey("alice", K.hash_secret(ALICE)),
            K.ApiKey("carol", K.hash_secret(CAROL), max_concurrency=1))
    heads = [b"Content-Length: 81\r\n\r\n" + b'{"model": "m1"',
             b"Content-Length: 81\r\nExpect: 100-continue\r\n\r\n",
             b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mod"]
    with door_daemon(tmp_path, keys) as f:
        for head in heads:
            with socket.create_connection(("127.0.0.1", f.router), timeout=10) as s:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: "
                          b"Bearer " + CAROL.encode() + b"\r\n" + head)
                time.sleep(0.2)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            wait_until(lambda: http(f.router, "POST", "/v1/chat/completions", chat(),
                                    secret=CAROL)[0] == 200, 10, what="carol's slot free")
        ends = [(x["status"], x["end"]) for x in f.lines(6)]
        assert ends.count((499, "client_gone")) == 3 and ends.count((200, "done")) >= 3


def test_a_refusal_before_a_large_body_reaches_the_client(tmp_path: Path) -> None:
    """401 to a client still sending 5 MB: it reads the answer (the rest of its body is
    read and dropped before the close), not a reset."""
    import urllib.error
    import urllib.request

    with door_daemon(tmp_path, keyring()) as f:
        for port in (f.router, f.gate):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                         b"x" * (5 * 1024 * 1024),
                                         {"Content-Type": "application/json",
                                          "Authorization": "Bearer sk-wrong"})
            with pytest.raises(urllib.error.HTTPError) as exc:
                urllib.request.urlopen(req, timeout=30)  # noqa: S310 - loopback
            assert exc.value.code == 401 and exc.value.reason == "Unauthorized"
            assert b"invalid_api_key" in exc.value.read()
            exc.value.close()


def test_llmctl_key_new_refuses_a_model_no_service_serves(tmp_path: Path) -> None:
    with door_daemon(tmp_path, keyring()) as f:
        out = f.d.llmctl("key", "new", "eve", "--models", "m1", "no-such-model")
        assert out.returncode != 0 and "no service serves model(s) no-such-model" in out.stderr
        assert "eve" not in f.keys.read_text()
        out = f.d.llmctl("key", "new", "eve", "--models", "m1\x1b[2J")
        assert out.returncode != 0 and "printable" in out.stderr


# --- what a second attack found, each fixed -------------------------------------------------------


async def test_a_closing_connection_that_takes_nothing_is_dropped_at_send_timeout() -> None:
    """A client that reads nothing while the server answers it itself (refusals, the
    router's answers) and then is closed: reading stops while its answers wait, and the
    close does not wait for it for ever (the send timeout stays armed)."""
    from collect import Wired

    w = Wired(send_timeout_s=0.2)
    aborted: list[bool] = []
    w.client.get_write_buffer_size = lambda: 1 << 20  # type: ignore[method-assign]
    w.client.abort = lambda: aborted.append(True)  # type: ignore[method-assign]
    w.conn.pause_writing()
    assert "writing" in w.conn._paused  # no more requests read until it takes its answers
    w.conn.close()
    await async_wait_until(lambda: aborted, 5, what="the connection dropped")
    w.conn.resume_writing()  # (a client that reads again is read again)


async def test_a_health_check_through_a_gate_writes_no_audit_line() -> None:
    door, lines = door_with(key())
    for method in (b"GET", b"HEAD"):
        req = Req(b"/health", method=method)
        assert door.enter(req, Conn(), Paths()) is None and req.ticket is None
    assert not lines


async def test_strangers_from_many_addresses_are_capped_together() -> None:
    door, lines = door_with(key())

    class Many:
        sent = 0

        def __init__(self, i: int) -> None:
            self.peer = f"10.0.{i // 256}.{i % 256}"

    for i in range(600):
        req = Req(b"/v1/models", method=b"GET")
        refusal = door.enter(req, Many(i), Paths())
        assert refusal is not None and req.ticket is not None
        req.ticket.close(401, 0, 0)
    assert len(lines) == 200 and door.suppressed == 400
    door.sum_up()
    summary = json.loads(lines[-1])
    assert (summary["more_refused"], summary["clients"], summary["client"]) == (400, 400, None)


def test_keys_the_front_could_not_be_told_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(K, "MAX_DOC_BYTES", 1000)
    many = "".join(f'[[key]]\nid = "k{i}"\nsha256 = "{i:064x}"\n' for i in range(10))
    with pytest.raises(ConfigError, match="as the front process is told them"):
        K.parse_keys(many)
    with pytest.raises(ValueError, match="more than 100 years"):
        K.parse_expires("36600d", 1.8e9)
