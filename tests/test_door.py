"""The front door: the path allowlist, API keys, limits per key, the audit log.

Pure first (the door with a fake clock, the keys file, the config keys), then the daemon as a
real process with fake engines behind the router and a gate, driven by the official OpenAI
client and by raw sockets: 401/404/429, revoke and rotate under 16 streams, limits at their
edges, every kind of audit line, a flood of one client address, a hand-broken keys file."""

from __future__ import annotations

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

from helpers import Daemon, Streams, base_config, fake_service, free_port, running, wait_until
from supervisord_llm import keys as K
from supervisord_llm.config import parse_config
from supervisord_llm.errors import ConfigError
from supervisord_llm.gate.door import Door, Paths, Refusal, Ticket

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
                                                                       "refused", None)


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
    door, lines = door_with(key(requests_per_minute=3), clock=clock)
    for i in range(3):
        refusal, req = enter(door)
        assert refusal is None
        assert req.ticket is not None and req.ticket.rate is not None
        rate = dict(req.ticket.rate)
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


# --- the keys file ---------------------------------------------------------------------------------

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


# --- the config ------------------------------------------------------------------------------------


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
