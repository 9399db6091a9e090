"""HTTP/1.x heads and framing, parsed by llhttp (through `httptools`, the parser uvicorn uses).

One strict parser for everything the daemon reads over HTTP/1.1 by itself: the gate's client
connections, the gate's upstream responses and the health prober's responses. llhttp refuses
what request smuggling and broken backends are made of: a negative or non-numeric
`Content-Length`, two `Content-Length` headers, `Content-Length` together with
`Transfer-Encoding`, a bare LF where CRLF belongs, bad chunk sizes.

llhttp keeps a header it has not finished in its own buffer, so the caller bounds the head by
counting the bytes it feeds before the head is complete (`HeadLimit`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Final, NamedTuple, Protocol

import httptools

MAX_HEAD: Final = 64 * 1024  # request or response head, all header lines together
MAX_FRAMING: Final = 64 * 1024  # bytes of chunk-size lines, extensions, trailers in a row
MAX_HEADERS: Final = 128

HOP_BY_HOP: Final = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"proxy-connection",
    b"http2-settings",  # h2c's upgrade: connection-specific (RFC 9113 3.2.1)
})

Headers = list[tuple[bytes, bytes]]


class ParseError(Exception):
    """The peer sent something that is not valid HTTP/1.x (or is larger than we accept);
    `status` is what a server answers it with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Upgrade(ParseError):
    """llhttp stopped at a protocol upgrade (`Connection: upgrade` with `Upgrade`, or
    CONNECT): what follows `offset` in the bytes fed is not parsed. llhttp (through httptools)
    skips the body of such a request: the caller that goes on in HTTP/1.1 must parse it."""

    def __init__(self, offset: int) -> None:
        super().__init__("protocol upgrades are not supported", 501)
        self.offset = offset


class HeadState(Protocol):
    in_head: bool  # the parser is inside a head (set by its llhttp callbacks)


def feed(parser: httptools.HttpRequestParser | httptools.HttpResponseParser, data: bytes,
         limit: HeadLimit, state: HeadState) -> None:
    """Feed llhttp; count the bytes of a head that spans feeds; ParseError on anything wrong
    (a callback's own ParseError passes through)."""
    was_in_head = state.in_head
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade as exc:
        raise Upgrade(int(exc.args[0]) if exc.args else len(data)) from None
    except httptools.HttpParserCallbackError as exc:
        cause = exc.__context__
        if isinstance(cause, ParseError):
            raise cause from None
        raise ParseError(f"invalid HTTP: {exc}") from None
    except httptools.HttpParserError as exc:
        raise ParseError(f"invalid HTTP: {exc}") from None
    if was_in_head and state.in_head:
        limit.fed(len(data))


class HeadLimit:
    """Counts head bytes; raises ParseError past MAX_HEAD or MAX_HEADERS."""

    __slots__ = ("count", "parsed", "size")

    def __init__(self) -> None:
        self.size = 0  # bytes fed while inside a head
        self.parsed = 0  # bytes of the head's parsed parts (first line, header lines)
        self.count = 0

    def reset(self) -> None:
        self.size = 0
        self.parsed = 0
        self.count = 0

    def part(self, n: int) -> None:
        self.parsed += n
        if self.parsed > MAX_HEAD:
            raise ParseError(f"head larger than {MAX_HEAD // 1024} KiB", 431)

    def fed(self, n: int) -> None:
        """`n` bytes were fed that began and ended inside a head (a feed in which a head
        begins is not counted: what it holds beyond the head is bounded by one read)."""
        self.size += n
        if self.size > MAX_HEAD:
            raise ParseError(f"head larger than {MAX_HEAD // 1024} KiB", 431)

    def header(self, name: bytes, value: bytes) -> None:
        self.count += 1
        if self.count > MAX_HEADERS:
            raise ParseError(f"more than {MAX_HEADERS} header lines", 431)
        self.parsed += len(name) + len(value) + 4
        if self.parsed > MAX_HEAD:
            raise ParseError(f"head larger than {MAX_HEAD // 1024} KiB", 431)


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    out: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            out.update(t.strip().lower() for t in value.split(b","))
    return out


def end_to_end(headers: Headers, also_drop: frozenset[bytes] = frozenset()) -> Headers:
    """The headers a proxy passes on: without hop-by-hop ones, those named in `Connection`,
    and `also_drop` (lowercase names)."""
    drop = HOP_BY_HOP | also_drop if also_drop else HOP_BY_HOP
    out = []
    named = False
    for k, v in headers:
        name = k.lower()
        if name in drop:
            named = named or name == b"connection"
            continue
        out.append((k, v))
    if named:  # (rare) the headers `Connection` names are hop-by-hop too
        tokens = connection_tokens(headers)
        out = [(k, v) for k, v in out if k.lower() not in tokens]
    return out


def header(headers: Headers, name: bytes) -> bytes | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def is_chunked(headers: Headers) -> bool:
    for k, v in headers:
        if k.lower() == b"transfer-encoding" and v.lower().rstrip().endswith(b"chunked"):
            return True
    return False


def encode_head(first_line: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    parts = [first_line]
    for k, v in headers:
        parts.append(k + b": " + v)
    parts.append(b"\r\n")
    return b"\r\n".join(parts)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK: Final = b"0\r\n\r\n"

REASONS: Final = {
    200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout",
    413: b"Content Too Large", 429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
    499: b"Client Closed Request", 500: b"Internal Server Error", 501: b"Not Implemented",
    502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


def error_body(message: str, kind: str, code: str) -> bytes:
    """The OpenAI-style error body clients of an OpenAI endpoint know how to read."""
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


# --- responses -------------------------------------------------------------------------------


class ResponseHead(NamedTuple):
    status: int
    reason: bytes
    headers: Headers
    framing: str  # length | chunked | close | none
    length: int | None
    keep_alive: bool


class ResponseParser:
    """Parses one response (skipping interim 1xx ones) and hands out its head and body.

    `on_head(head)` once the head is complete; `on_body(data)` with body bytes, chunk framing
    removed; `on_end()` at the end of a length-delimited or chunked body. A close-delimited body
    ends with the connection: the caller knows (`head.framing == "close"`). Trailers are
    dropped. `feed` raises ParseError on anything invalid.
    """

    def __init__(self, on_head: Callable[[ResponseHead], None] | None,
                 on_body: Callable[[bytes], None],
                 on_end: Callable[[], None], *, head_request: bool = False) -> None:
        self._on_head = on_head
        self._on_body = on_body
        self._on_end = on_end
        self._head_request = head_request
        self._parser = httptools.HttpResponseParser(self)
        self._limit = HeadLimit()
        self._reason = b""
        self._headers: Headers = []
        self.in_head = True
        self._interim = False
        self.head: ResponseHead | None = None
        self.done = False
        self._progress = False
        self._framing = 0

    def again(self) -> bool:
        """Ready for the next response on the same connection (llhttp goes on from the end
        of the last one); False where a new parser is needed (the last response is not
        complete, or answered a HEAD: llhttp did not know it had no body)."""
        if not self.done or self._head_request:
            return False
        self._reason = b""
        self._headers = []
        self.in_head = True
        self._interim = False
        self.head = None
        self.done = False
        self._framing = 0
        self._limit.reset()
        return True

    def feed(self, data: bytes) -> None:
        self._progress = False
        try:
            feed(self._parser, data, self._limit, self)
            if not self.in_head and not self._progress:
                # neither body bytes nor the end of a chunk: framing (chunk-size lines,
                # extensions, trailers) that llhttp would go on parsing for ever
                self._framing += len(data)
                if self._framing > MAX_FRAMING:
                    raise ParseError(f"more than {MAX_FRAMING // 1024} KiB of chunk framing "
                                     "without data")
            else:
                self._framing = 0
        except ParseError as exc:
            if exc.status == 501:
                raise ParseError("upstream switched protocols (upgrades are not proxied)"
                                 ) from None
            raise

    # llhttp callbacks

    def on_message_begin(self) -> None:
        if self.done:  # a second response in the same read: nobody asked for it
            raise ParseError("the server sent more than its response")
        self.in_head = True
        self._reason = b""
        self._headers = []

    def on_status(self, reason: bytes) -> None:
        self._limit.part(len(reason))
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:  # after the body: a trailer, never passed on
            self._limit.header(name, value)
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        status = self._parser.get_status_code()
        if not 100 <= status <= 599:  # llhttp takes any three digits
            raise ParseError(f"invalid status code {status}")
        if 100 <= status < 200:
            if status == 101:
                raise ParseError("upstream switched protocols (upgrades are not proxied)")
            self._interim = True  # 100 Continue, 103 Early Hints: not the response
            self._limit.reset()
            return
        headers = self._headers
        length: int | None = None
        chunked = False
        cl = None
        for k, v in headers:
            name = k.lower()
            if name == b"transfer-encoding":
                if v.strip().lower() != b"chunked":
                    # gzip, chunked: the gate would pass gzip bytes as if they were the body
                    raise ParseError(f"unsupported Transfer-Encoding {v[:40]!r}")
                chunked = True
            elif name == b"content-length" and cl is None:
                cl = v
        if status in (204, 304) or self._head_request:
            framing = "none"
        elif chunked:
            framing = "chunked"
        elif cl is not None:
            framing, length = "length", int(cl)  # llhttp has checked it
        else:
            framing = "close"
        keep = self._parser.should_keep_alive() and framing != "close"
        if self._head_request:
            keep = False  # llhttp would wait for the body a HEAD response does not have
        self.head = ResponseHead(status, self._reason, headers, framing, length, keep)
        if self._on_head is not None:
            self._on_head(self.head)
        if framing == "none" or (framing == "length" and length == 0):
            self._end()

    def on_body(self, data: bytes) -> None:
        self._progress = True
        if not self.done:
            self._on_body(data)

    def on_chunk_complete(self) -> None:
        self._progress = True

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._end()

    def _end(self) -> None:
        if not self.done:
            self.done = True
            self._on_end()
