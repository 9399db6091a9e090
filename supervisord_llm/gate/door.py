"""The front door of the router and of every gate's own listener: which paths are served,
who may come in (API keys), how much each key may use (requests and tokens per minute,
requests at once), and one audit line per request.

- **Paths.** Only the API (`config.API_PATHS`) and what `allow_paths` adds are forwarded;
  anything else is 404 before its body is read: an engine's admin endpoints are never
  reachable from a client.
- **Keys.** `Authorization: Bearer <secret>`. The secret's SHA-256 is looked up (the daemon
  sends the hashes of the keys file, never a secret); the digest found is compared again in
  constant time. No key, an unknown, expired or ill-formed one: 401 `invalid_api_key`.
- **Limits,** per key: requests per minute (an exact sliding window: at most N requests
  begin in any 60 s), tokens per minute (prompt + completion, counted when a request ends,
  by the second), requests at once. Over one: 429 with `Retry-After`; every answer to a key
  with a limit carries OpenAI's `x-ratelimit-*` headers.
- **Tickets.** A request that comes through the door while keys or the audit are on holds a
  `Ticket` (`req.ticket`), closed exactly once with its status (`Ticket.close`): the key's
  counters and slot, and the audit line. Tokens come from the engine's `usage` in the last
  bytes of the answer (the answer or the SSE event before `[DONE]`), never from parsing each
  event; without one they are estimated (a quarter of the request body's bytes; one token per
  event, or a quarter of the answer's bytes).

Runs on the gate loop; compiled with the request path (`native.MODULES`)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import re
import time
from array import array
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import unquote_to_bytes

from ..config import API_PATHS

WINDOW_S: Final = 60.0
SECRET_MAX: Final = 512  # bytes of a bearer token looked at (longer: not one of ours)
_USAGE_TAIL: Final = 8192  # bytes at the end of an answer searched for its `usage`
_PROMPT_RE: Final = re.compile(rb'"prompt_tokens"\s*:\s*(\d{1,12})')
_COMPLETION_RE: Final = re.compile(rb'"completion_tokens"\s*:\s*(\d{1,12})')
_PREDICTED_RE: Final = re.compile(rb'"predicted_n"\s*:\s*(\d{1,12})')
_SAFE_RE: Final = re.compile(r"[\x20-\x21\x23-\x5b\x5d-\x7e]*")  # needs no JSON escape
AUDIT_PATH_MAX: Final = 1024  # characters of a path in an audit line (then "...")
# refusals without a key (401, 404 of a path), per client address: this many audit lines in
# STRANGER_WINDOW_S, the rest counted and written as one line when the window ends
STRANGER_LINES: Final = 20
STRANGER_WINDOW_S: Final = 10.0
STRANGERS_MAX: Final = 10_000  # addresses tracked at once
STRANGERS_LINES: Final = 200  # ... and all addresses together (many addresses: IPv6)
AUDIT_FLUSH_S: Final = 0.1
AUDIT_BATCH: Final = 512


class Paths:
    """The paths a listener forwards: exact ones, and prefixes (`/v1/models/*`)."""

    def __init__(self, extra: tuple[str, ...] = ()) -> None:
        exact: set[bytes] = set()
        prefixes: list[bytes] = []
        for path in (*API_PATHS, *extra):
            if path.endswith("*"):
                prefixes.append(path[:-1].encode())
            else:
                exact.add(path.encode())
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)

    def allows(self, target: bytes) -> bool:
        q = target.find(b"?")
        path = target if q < 0 else target[:q]
        if path in self.exact:
            return True
        for prefix in self.prefixes:
            if path.startswith(prefix) and len(path) > len(prefix):
                # no way out of the prefix on the server's side, decoded as a server does
                # (a model id may hold an escaped `/`): no dot segments, no backslashes, no
                # escape left after one decoding (an engine that decodes twice)
                rest = unquote_to_bytes(path[len(prefix):])
                return not (b"%" in rest or b"\\" in rest or b"/." in b"/" + rest)
        return False


class Key:
    """A key in force, and what it used (kept across reloads: the same object per id)."""

    def __init__(self, key_id: str) -> None:
        self.id = key_id
        self.models: frozenset[str] | None = None  # None: every model
        self.rpm = 0  # 0: no limit
        self.tpm = 0
        self.rpm_line = b""  # its x-ratelimit-limit-* header lines
        self.tpm_line = b""
        self.concurrency = 0
        self.expires = 0.0  # epoch seconds; 0: never
        self.inflight = 0
        # the start times (monotonic) of its last `rpm` requests, a ring: `head` is the oldest.
        # A request may begin when that one began a window ago or more: an exact sliding log
        # in 8 bytes a request of the limit, O(1) a request
        self.ring = array("d")
        self.head = 0
        self.out = 0  # of the ring, oldest first: those known to be out of the window
        self.tok_sec: list[int] = [0] * 60  # tokens by second (monotonic), 60 buckets
        self.tok_n: list[int] = [0] * 60
        self._tok_at = -1  # the second `tokens` was last summed for, and its sum
        self._tok_sum = 0
        self._oldest_at = -1  # the second `tokens_reset` last looked, and what it found
        self._oldest = 0
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.last_used = 0.0  # epoch seconds
        self.codes: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.listing = b""  # its GET /v1/models, for the catalogue `listing_of`
        self.listing_of: object = None

    @property
    def limited(self) -> bool:
        return bool(self.rpm or self.tpm)

    def may_use(self, model: str) -> bool:
        models = self.models
        return models is None or model in models

    def may_use_any(self, models: tuple[str, ...]) -> bool:
        return self.models is None or not self.models.isdisjoint(models)

    def set_rpm(self, rpm: int) -> None:
        """A new limit; the requests begun in the window still count (the newest of them,
        as many as the new limit holds)."""
        if rpm == self.rpm:
            return
        old, head, n = self.ring, self.head, len(self.ring)
        ring = array("d", [-1e18]) * rpm
        keep = min(n, rpm)
        for i in range(keep):  # the newest `keep`, oldest first, at the end of the new ring
            ring[rpm - keep + i] = old[(head + n - keep + i) % n]
        self.rpm = rpm
        self.ring = ring
        self.head = 0
        self.out = rpm - keep

    def may_begin(self, now: float) -> bool:
        return self.ring[self.head] <= now - WINDOW_S

    def begin(self, now: float) -> None:
        ring = self.ring
        ring[self.head] = now
        self.head = (self.head + 1) % len(ring)
        if self.out:
            self.out -= 1  # (the one overwritten was the oldest, out of the window)

    def oldest(self, now: float) -> tuple[int, float]:
        """Requests begun in the last minute, and when the oldest of them began (now if
        none). `out` (oldest first, those known to have left the window) only moves on as
        time does: O(1) a request, amortized."""
        ring, head, n = self.ring, self.head, len(self.ring)
        edge = now - WINDOW_S
        out = self.out
        while out < n and ring[(head + out) % n] <= edge:
            out += 1
        self.out = out
        return n - out, ring[(head + out) % n] if out < n else now

    def tokens(self, now: float) -> int:
        """Tokens counted in the last minute (by whole seconds; summed once a second)."""
        sec = int(now)
        if sec == self._tok_at:
            return self._tok_sum
        total = 0
        for i in range(60):
            if sec - self.tok_sec[i] < 60:
                total += self.tok_n[i]
        self._tok_at, self._tok_sum = sec, total
        return total

    def tokens_reset(self, now: float) -> float:
        """Seconds until the oldest second with tokens leaves the window (looked up once a
        second)."""
        sec = int(now)
        if sec != self._oldest_at:
            oldest = sec
            for i in range(60):
                at = self.tok_sec[i]
                if self.tok_n[i] and sec - at < 60 and at < oldest:
                    oldest = at
            self._oldest_at, self._oldest = sec, oldest
        return max(0.0, self._oldest + 60.0 - now)

    def add_tokens(self, now: float, n: int) -> None:
        if n <= 0:
            return
        sec = int(now)
        i = sec % 60
        if self.tok_sec[i] != sec:
            self.tok_sec[i] = sec
            self.tok_n[i] = 0
        self.tok_n[i] += n
        if self._tok_at == sec:
            self._tok_sum += n
        else:
            self._tok_at = -1
        # (the oldest second with tokens stays: tokens are added to the newest)

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


def _reset_text(seconds: float) -> bytes:
    """A reset time as OpenAI writes it (`1s`, `6m0s`, `250ms`)."""
    if seconds < 1.0:
        return b"%dms" % max(0, int(seconds * 1000))
    s = math.ceil(seconds)
    return b"%dm%ds" % (s // 60, s % 60) if s >= 60 else b"%ds" % s


class Refusal:
    """An answer of the door's own: 401, 404, 429."""

    def __init__(self, status: int, code: str, message: str, end: str,
                 headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.end = end
        self.headers = headers

    @property
    def kind(self) -> str:
        return "rate_limit_error" if self.status == 429 else "invalid_request_error"


_NOT_FOUND: Final = Refusal(404, "not_found", "no such endpoint: this server forwards the "
                           "OpenAI API (/v1/chat/completions, /v1/completions, "
                           "/v1/embeddings, /v1/models, ...)", "refused", [])
_NO_KEY: Final = Refusal(401, "invalid_api_key", "Incorrect or missing API key: send "
                         "`Authorization: Bearer <key>`", "refused",
                         [(b"WWW-Authenticate", b'Bearer realm="llm-supervisor"')])


class Door:
    """Shared by the router and the gates of one front (the daemon sets its keys)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.clock = clock  # the windows of the limits
        self.wall = wall  # expiry, last use, the audit's time
        self.auth = False  # keys required
        self.keys: dict[str, Key] = {}
        # digest -> (key, the digest, valid until (0: no end))
        self._hashes: dict[bytes, tuple[Key, bytes, float]] = {}
        self.audit: Callable[[str], None] | None = None
        # the audit log's lines gathered here (`buffer_line`), handed on in batches to `sink`
        # (the writer: every AUDIT_FLUSH_S, or AUDIT_BATCH lines)
        self.sink: Callable[[list[str]], None] | None = None
        self._batch: list[str] = []
        self._batch_timer: asyncio.TimerHandle | None = None
        self.rejected: dict[str, int] = {}  # refusals without a key (no key, a wrong one)
        self.served: dict[str, tuple[str, ...]] = {}  # service -> its models (the router's)
        # per address: [the window (its start, wall clock), lines written, lines held back]
        self._strangers: dict[str, list[float]] = {}
        self._summing: asyncio.TimerHandle | None = None
        self._strangers_since = 0.0  # the window of all addresses together, and its lines
        self._strangers_lines = 0
        self.suppressed = 0  # audit lines of strangers' refusals not written one by one
        self._sec = -1
        self._stamp = ""
        self._ms = -1
        self._ms_stamp = ""

    @property
    def active(self) -> bool:
        return self.auth or self.audit is not None

    def set_keys(self, docs: list[dict[str, Any]] | None) -> None:
        """The keys in force (None: no [auth], anyone comes in). A key keeps its counters
        and its requests in flight across a change (same id, same object); a key gone
        makes its next request 401."""
        if docs is None:
            self.auth = False
            self.keys = {}
            self._hashes = {}
            return
        keys: dict[str, Key] = {}
        hashes: dict[bytes, tuple[Key, bytes, float]] = {}
        for doc in docs:
            key_id = str(doc["id"])
            key = self.keys.get(key_id) or Key(key_id)
            models = [str(m) for m in doc.get("models") or ["*"]]
            key.models = None if "*" in models else frozenset(models)
            key.set_rpm(int(doc.get("rpm") or 0))
            key.rpm_line = b"x-ratelimit-limit-requests: %d" % key.rpm
            key.tpm = int(doc.get("tpm") or 0)
            key.tpm_line = b"x-ratelimit-limit-tokens: %d" % key.tpm
            key.concurrency = int(doc.get("concurrency") or 0)
            key.expires = float(doc.get("expires") or 0.0)
            key.listing_of = None
            keys[key_id] = key
            digest = bytes.fromhex(str(doc["sha256"]))
            hashes[digest] = (key, digest, 0.0)
            previous = doc.get("previous")
            until = float(doc.get("previous_until") or 0.0)
            if previous and until > 0:
                old = bytes.fromhex(str(previous))
                hashes[old] = (key, old, until)
        self.keys = keys
        self._hashes = hashes
        self.auth = True

    # --- a request ---------------------------------------------------------------------------

    def models_of(self, service: str) -> tuple[str, ...]:
        return self.served.get(service) or (service,)

    def enter(self, req: Any, conn: Any, paths: Paths) -> Refusal | None:
        """At a request's arrival, before its body is read: the key (with [auth]), the
        path, the key's limits. Sets `req.ticket` when keys or the audit are on. None: go
        on. (The key first: a stranger learns nothing of the paths, and the audit line of
        a key's request to a path refused says whose it was.)"""
        allowed = paths.allows(req.target)
        if not self.auth and self.audit is None:
            return None if allowed else _NOT_FOUND
        if req.target == b"/health" and req.method in (b"GET", b"HEAD"):
            return None  # a load balancer's check: no key, no audit line (as the router's)
        ticket = Ticket(self, req, conn.peer, conn.sent)
        req.ticket = ticket
        if not self.auth:
            return None if allowed else _NOT_FOUND
        key = self._key(req)
        if key is None:
            self.rejected["invalid_api_key"] = self.rejected.get("invalid_api_key", 0) + 1
            return _NO_KEY
        ticket.key = key
        key.last_used = ticket.t0
        if not allowed:
            key.reject("not_found")
            return _NOT_FOUND
        return self._limits(key, ticket)

    def _key(self, req: Any) -> Key | None:
        value: bytes | None = None
        for name, v in req.headers:
            if len(name) == 13 and name.lower() == b"authorization":
                if value is not None:
                    return None  # two: which one?
                value = v
        if value is None or len(value) > SECRET_MAX + 7 or value[:7].lower() != b"bearer ":
            return None
        secret = value[7:].strip()
        if not secret:
            return None
        digest = hashlib.sha256(secret).digest()
        found = self._hashes.get(digest)
        if found is None:
            return None
        key, stored, until = found
        # the lookup is by digest (its timing tells nothing of a secret); the comparison
        # that decides takes the same time whatever the bytes
        if not hmac.compare_digest(stored, digest):
            return None
        now = self.wall()
        if until and now >= until:
            return None  # an old secret whose overlap is over
        if key.expires and now >= key.expires:
            return None
        return key

    def _limits(self, key: Key, ticket: Ticket) -> Refusal | None:
        now = self.clock()
        if key.concurrency and key.inflight >= key.concurrency:
            key.reject("concurrency")
            return Refusal(429, "rate_limit_exceeded",
                           f"key {key.id}: {key.concurrency} request(s) at once at most",
                           "limited", [(b"Retry-After", b"1"), (b"retry-after-ms", b"1000"),
                                       *header_pairs(self._rate(key, now))])
        if key.rpm and not key.may_begin(now):
            key.reject("requests")
            return self._limited(key, now, key.ring[key.head] + WINDOW_S - now,
                                 f"key {key.id}: {key.rpm} requests per minute at most")
        if key.tpm and key.tokens(now) >= key.tpm:
            key.reject("tokens")
            return self._limited(key, now, key.tokens_reset(now),
                                 f"key {key.id}: {key.tpm} tokens per minute at most")
        if key.rpm:
            key.begin(now)
        key.inflight += 1
        ticket.holding = True
        if key.limited:
            ticket.rate = self._rate(key, now)
        return None

    def _limited(self, key: Key, now: float, wait: float, message: str) -> Refusal:
        wait = max(wait, 0.001)
        return Refusal(429, "rate_limit_exceeded", message, "limited",
                       [(b"Retry-After", b"%d" % max(1, math.ceil(wait))),
                        (b"retry-after-ms", b"%d" % max(1, math.ceil(wait * 1000))),
                        *header_pairs(self._rate(key, now))])

    @staticmethod
    def _rate(key: Key, now: float) -> list[bytes]:
        """OpenAI's x-ratelimit-* header lines (`Name: value`) for an answer to `key`."""
        out: list[bytes] = []
        if key.rpm:
            begun, first = key.oldest(now)
            reset = first + WINDOW_S - now if begun else 0.0
            out.append(key.rpm_line)
            out.append(b"x-ratelimit-remaining-requests: %d" % (key.rpm - begun))
            out.append(b"x-ratelimit-reset-requests: " + _reset_text(reset))
        if key.tpm:
            left = key.tpm - key.tokens(now)
            out.append(key.tpm_line)
            out.append(b"x-ratelimit-remaining-tokens: %d" % (left if left > 0 else 0))
            out.append(b"x-ratelimit-reset-tokens: " + _reset_text(key.tokens_reset(now)))
        return out

    # --- the audit line ---------------------------------------------------------------------

    def buffer_line(self, line: str) -> None:
        """`audit` when the front writes the log: kept, handed on in batches."""
        batch = self._batch
        batch.append(line)
        if len(batch) >= AUDIT_BATCH:
            self.flush_lines()
        elif self._batch_timer is None:
            self._batch_timer = asyncio.get_running_loop().call_later(AUDIT_FLUSH_S,
                                                                      self.flush_lines)

    def flush_lines(self) -> None:
        timer, self._batch_timer = self._batch_timer, None
        if timer is not None:
            timer.cancel()
        batch, self._batch = self._batch, []
        if batch and self.sink is not None:
            self.sink(batch)

    def stranger(self, peer: str, now: float) -> bool:
        """Whether the audit line of a refusal without a key from `peer` is written (the
        first STRANGER_LINES of each window), or counted and summed up later."""
        if now - self._strangers_since >= STRANGER_WINDOW_S:
            self._strangers_since, self._strangers_lines = now, 0
        seen = self._strangers.get(peer)
        if seen is None or now - seen[0] >= STRANGER_WINDOW_S:
            if seen is not None and seen[2]:
                self._sum_up(peer, seen)
            if len(self._strangers) >= STRANGERS_MAX:
                self.sum_up()
            seen = self._strangers[peer] = [now, 0.0, 0.0]
        if seen[1] < STRANGER_LINES and self._strangers_lines < STRANGERS_LINES:
            seen[1] += 1.0
            self._strangers_lines += 1
            return True
        seen[2] += 1.0
        self.suppressed += 1
        if self._summing is None:
            self._summing = asyncio.get_running_loop().call_later(
                STRANGER_WINDOW_S, self.sum_up)
        return False

    def sum_up(self) -> None:
        """One line for each address whose refusals were held back (one line for all of
        them when they are many); the windows start again."""
        timer, self._summing = self._summing, None
        if timer is not None:
            timer.cancel()
        held = [(peer, seen) for peer, seen in self._strangers.items() if seen[2]]  # (a list)
        if len(held) <= STRANGER_LINES:
            for peer, seen in held:
                self._sum_up(peer, seen)
        elif self.audit is not None:
            since, total = self.wall(), 0.0
            for _peer, seen in held:  # (no generator: compiled)
                since = min(since, seen[0])
                total += seen[2]
            self.audit(f"{{\"time\":\"{self.stamp(self.wall())}\",\"key\":null,\"client\":"
                       f"null,\"end\":\"refused\",\"more_refused\":{int(total)},"
                       f"\"clients\":{len(held)},\"since\":\"{self.stamp(since)}\"}}")
        self._strangers = {}

    def _sum_up(self, peer: str, seen: list[float]) -> None:
        audit = self.audit
        if audit is not None:
            audit(f"{{\"time\":\"{self.stamp(self.wall())}\",\"key\":null,\"client\":"
                  f"{_plain(peer)},\"end\":\"refused\",\"more_refused\":{int(seen[2])},"
                  f"\"since\":\"{self.stamp(seen[0])}\"}}")
        seen[2] = 0.0

    def stamp(self, t: float) -> str:
        """`2026-12-07T18:45:17.123Z` (made once a millisecond; its second's part once a
        second)."""
        ms = int(t * 1000)
        if ms == self._ms:
            return self._ms_stamp
        sec = ms // 1000
        if sec != self._sec:
            self._sec = sec
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        self._ms = ms
        self._ms_stamp = f"{self._stamp}.{ms % 1000:03d}Z"
        return self._ms_stamp

    def stats(self) -> dict[str, Any]:
        keys = {}
        for key in self.keys.values():
            keys[key.id] = {"requests": dict(key.codes), "rejected": dict(key.rejected),
                            "prompt_tokens": key.prompt_tokens,
                            "completion_tokens": key.completion_tokens,
                            "last_used": key.last_used or None, "inflight": key.inflight}
        return {"auth": self.auth, "keys": keys, "rejected": dict(self.rejected),
                "audit_suppressed": self.suppressed}


def header_pairs(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Header lines as (name, value) pairs."""
    out = []
    for line in lines:
        name, _, value = line.partition(b": ")
        out.append((name, value))
    return out


def _method(method: bytes) -> str:
    text = _METHODS.get(method)
    if text is None:
        text = method.decode("latin-1")
        if len(_METHODS) < 64:
            _METHODS[method] = text
    return text


def _plain(value: str | None) -> str:
    return "null" if value is None else '"' + value + '"'


_CODES: Final = {code: str(code) for code in range(100, 600)}
_METHODS: dict[bytes, str] = {}  # (the few methods llhttp parses)
_TEXTS: dict[str, str] = {}  # paths and models as JSON strings, the last 1024 seen


def _text(value: str | None) -> str:
    if value is None:
        return "null"
    text = _TEXTS.get(value)
    if text is None:
        safe = _SAFE_RE.fullmatch(value) is not None
        text = '"' + value + '"' if safe else json.dumps(value)
        if len(value) <= 256:  # (only the short ones: a stranger's long paths are not kept)
            if len(_TEXTS) >= 1024:
                _TEXTS.clear()
            _TEXTS[value] = text
    return text


class Ticket:
    """One request through the door, closed once (`close`)."""

    def __init__(self, door: Door, req: Any, peer: str | None, sent: int) -> None:
        self.door = door
        self.key: Key | None = None
        self.method: bytes = req.method
        self.target: bytes = req.target
        self.peer = peer
        self.model: str | None = None
        self.service: str | None = None
        self.t0 = door.wall()
        self.p0 = time.perf_counter()
        self.holding = False  # holds one of its key's requests at once
        self.rate: list[bytes] | None = None  # x-ratelimit-* header lines for its answer
        self.end = ""  # how it ended, when known before `close`
        self.ttft = -1.0
        self.events = 0  # SSE events of the answer
        self.answer = False  # a 2xx answer of the engine's to a POST: it generated
        self.tail0 = b""  # the last two reads of that answer (its `usage` is there)
        self.tail1 = b""
        self.sent = sent  # the connection's bytes sent before its answer

    def close(self, status: int, body_in: int, sent_now: int) -> None:
        """The request's end: `body_in` bytes of body came, the connection had sent
        `sent_now` bytes (its answer: those since the ticket was made)."""
        if self.end == "closed":
            return
        sent = max(0, sent_now - self.sent)
        end = self.end or ("client_gone" if status == 499 else "refused")
        self.end = "closed"
        door, key = self.door, self.key
        prompt = completion = 0
        estimated = False
        if self.answer:
            prompt, completion, estimated = self._usage(body_in, sent)
        if key is not None:
            if self.holding:
                self.holding = False
                key.inflight -= 1
            code = _CODES.get(status) or str(status)
            key.codes[code] = key.codes.get(code, 0) + 1
            key.requests += 1
            if prompt or completion:
                key.prompt_tokens += prompt
                key.completion_tokens += completion
                key.add_tokens(door.clock(), prompt + completion)
        audit = door.audit
        if audit is not None:
            if key is None and end == "refused" and not door.stranger(self.peer or "", self.t0):
                return  # (a stranger's refusals: at a bounded rate, the rest summed up)
            now = time.perf_counter()
            q = self.target.find(b"?")
            raw = self.target if q < 0 else self.target[:q]
            if len(raw) > AUDIT_PATH_MAX:
                raw = raw[:AUDIT_PATH_MAX] + b"..."
            path = raw.decode("latin-1")
            tokens = (f"{prompt},\"completion_tokens\":{completion},\"tokens_estimated\":"
                      f"{'true' if estimated else 'false'}") if self.answer else \
                "null,\"completion_tokens\":null,\"tokens_estimated\":false"
            ttft = f"{self.ttft:.4f}" if self.ttft >= 0 else "null"
            # (the key id, the service name, the address and the method need no escape:
            # their characters are checked where they come from)
            audit(f"{{\"time\":\"{door.stamp(self.t0)}\",\"key\":"
                  f"{_plain(key.id if key is not None else None)},\"client\":"
                  f"{_plain(self.peer)},\"method\":\"{_method(self.method)}\","
                  f"\"path\":{_text(path)},\"model\":{_text(self.model)},\"service\":"
                  f"{_plain(self.service)},\"status\":{status},\"prompt_tokens\":{tokens},"
                  f"\"ttft_s\":{ttft},\"duration_s\":{now - self.p0:.4f},\"bytes_in\":"
                  f"{body_in},\"bytes_out\":{sent},\"end\":\"{end}\"}}")

    def _usage(self, body_in: int, sent: int) -> tuple[int, int, bool]:
        tail1 = self.tail1
        if len(tail1) >= _USAGE_TAIL:
            buf = tail1[-_USAGE_TAIL:]
        else:
            buf = self.tail0[-(_USAGE_TAIL - len(tail1)):] + tail1 if self.tail0 else tail1
        at = buf.rfind(b'"usage"')
        if at >= 0:
            part = buf[at:at + 1024]
            p = _PROMPT_RE.search(part)
            c = _COMPLETION_RE.search(part)
            if p is not None or c is not None:
                return (int(p.group(1)) if p is not None else body_in // 4,
                        int(c.group(1)) if c is not None else self._completion(sent),
                        p is None or c is None)
        return body_in // 4, self._completion(sent, buf), True

    def _completion(self, sent: int, buf: bytes = b"") -> int:
        """Without `usage`: llama-server's `timings.predicted_n` (it gives that in the last
        event of every stream), else one token per event of a stream, or a quarter of the
        bytes."""
        at = buf.rfind(b'"predicted_n"')
        if at >= 0:
            m = _PREDICTED_RE.match(buf, at)
            if m is not None:
                return int(m.group(1))
        return self.events if self.events else sent // 4
