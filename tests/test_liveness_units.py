"""Pure pieces of inference liveness: the SSE event counter and the metrics relabelling."""

from __future__ import annotations

import random

import pytest

from supervisord_llm.gate.proxy import _Events
from supervisord_llm.web import relabel

BODY = b'data: {"a": "x\\ndata: no"}\n\ndata: b\ndata: b2\n\n: comment\n\ndata: [DONE]\n\n'


def count(chunks: list[bytes]) -> tuple[int, float | None]:
    e = _Events()
    for i, c in enumerate(chunks):
        e.feed(c, float(i + 1))
    return e.count, e.first


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_events_whatever_the_line_ends_and_the_splits(eol: bytes) -> None:
    body = BODY.replace(b"\n", eol)
    assert count([body]) == (3, 1.0)
    assert count([bytes([b]) for b in body])[0] == 3  # a byte at a time
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(body)), 5))
        chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        assert count(chunks)[0] == 3, chunks


def test_a_data_line_without_its_blank_line_is_no_event_yet() -> None:
    assert count([b"data: x\n"]) == (0, 1.0)
    assert count([b"data: x\n", b"\n"]) == (1, 1.0)


LABELS = {"service": "chat", "gpu": "0"}


@pytest.mark.parametrize(("line", "expect"), [
    (b"a 1", b'a{service="chat",gpu="0"} 1'),
    (b"a\t2", b'a{service="chat",gpu="0"}\t2'),
    (b'a{x="1"} 3', b'a{service="chat",gpu="0",x="1"} 3'),
    (b'a{x="v,service=\\"q\\""} 3', b'a{service="chat",gpu="0",x="v,service=\\"q\\""} 3'),
    (b'a{service="own"} 4', b'a{gpu="0",service="own"} 4'),
    (b"a{} 5", b'a{service="chat",gpu="0"} 5'),
    (b'a{x="}"} 7', b'a{service="chat",gpu="0",x="}"} 7'),
    (b'a 1 # {trace_id="t"} 1', b'a{service="chat",gpu="0"} 1'),
    (b"# HELP a x", b"# HELP a x"),
])
def test_relabel(line: bytes, expect: bytes) -> None:
    assert relabel(line, LABELS) == expect + b"\n"


def test_relabel_drops_openmetrics_eof_and_what_follows_and_crlf() -> None:
    assert relabel(b"a 1\n# EOF\nb 2\n", LABELS) == b'a{service="chat",gpu="0"} 1\n'
    assert relabel(b"# TYPE a gauge\r\n  a 1\r\n", LABELS) == \
        b'# TYPE a gauge\na{service="chat",gpu="0"} 1\n'
