"""The router and models on demand: the body scan (pure), the config keys, the plan's checks,
and the daemon as a real process with fake backends on one small simulated GPU (swaps, a
stream not cut by a swap, idle stop, a burst that starts a model once, exclusive, pinning,
no room, reload). The same with real llama-server processes: tests/test_models_e2e.py."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import (
    SIM_UUID,
    Daemon,
    base_config,
    fake_service,
    free_port,
    running,
    stays,
    wait_until,
)
from supervisord_llm.config import parse_config
from supervisord_llm.errors import ConfigError
from supervisord_llm.gate.router import BadBody, ModelScan, model_of_small
from supervisord_llm.plan import resolve_plan
from supervisord_llm.sensors.base import GpuInfo

GIB = 1024**3

# --- the scan ---------------------------------------------------------------------------------


def scan_split(body: bytes, cuts: Iterable[int]) -> str | None:
    """The model the scan reads in `body` fed in pieces cut at `cuts` (None if the object
    does not end); BadBody out."""
    s, prev = ModelScan(), 0
    for cut in [*cuts, len(body)]:
        s.feed(body[prev:cut])
        prev = cut
    return s.model if s.done else None


def scan(body: bytes, step: int) -> str | None:
    """The same, in reads of `step` bytes."""
    return scan_split(body, range(step, len(body), step))


def every_split(body: bytes) -> Iterator[list[int]]:
    """Every way to cut `body` in two, and into reads of one byte."""
    for cut in range(1, len(body)):
        yield [cut]
    yield list(range(1, len(body)))


# the key `model` as a client may write it: json reads them all as "model"
SPELLINGS = ['"model"', '"mod\\u0065l"', '"\\u006d\\u006F\\u0064\\u0065\\u006c"', '"\\u006dodel"']


def obj(pairs: list[tuple[str, Any]], ws: str, ascii_only: bool = True) -> bytes:
    """A JSON object of `pairs` whose keys are JSON text already (spelled as they come)."""
    return ("{" + ws + ("," + ws).join(
        f"{k}{ws}:{ws}{json.dumps(v, ensure_ascii=ascii_only)}" for k, v in pairs)
        + ws + "}").encode()


def top_level_pairs(body: bytes) -> list[tuple[str, Any]]:
    """The top-level members as json reads them, duplicates kept."""
    seen: list[list[tuple[str, Any]]] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen.append(pairs)  # the top-level object comes last
        return dict(pairs)

    json.loads(body, object_pairs_hook=hook)
    return seen[-1]


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.text(alphabet='\\"a\n', max_size=12),  # runs of escapes
    _containers, max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(before=st.dictionaries(st.text(max_size=8).filter(lambda k: k != "model"), json_values,
                              max_size=4),
       after=st.dictionaries(st.text(max_size=8).filter(lambda k: k != "model"), json_values,
                             max_size=4),
       model=st.text(min_size=1, max_size=30), step=st.integers(1, 64),
       fmt=st.tuples(st.booleans(), st.sampled_from([None, 0, 2])),
       spelling=st.sampled_from(SPELLINGS))
def test_scan_finds_the_top_level_model_wherever_it_is(
        *, before: dict[str, Any], after: dict[str, Any], model: str, step: int,
        fmt: tuple[bool, int | None], spelling: str) -> None:
    ascii_only, indent = fmt
    doc = {**before, "model": model, **{k: v for k, v in after.items() if k not in before}}
    body = json.dumps(doc, ensure_ascii=ascii_only, indent=indent).encode()
    assert scan(body, step) == model
    assert model_of_small(body) == model
    # the key spelled with escapes (a first `"model":` may be a nested key: json says which)
    body = body.replace(b'"model":', spelling.encode() + b":", 1)
    assert json.loads(body)["model"] == model
    assert scan(body, step) == model
    assert model_of_small(body) == model
    for cuts in every_split(body):
        assert scan_split(body, cuts) == model, cuts


@settings(max_examples=150, deadline=None)
@given(doc=st.dictionaries(st.text(max_size=8).filter(lambda k: k != "model"), json_values,
                           max_size=5), step=st.integers(1, 32))
def test_a_model_only_inside_nested_values_is_no_model(doc: dict[str, Any], step: int) -> None:
    doc = {**doc, "nested": {"model": "inner"}, "list": [{"model": "x"}]}
    body = json.dumps(doc).encode()
    with pytest.raises(BadBody) as exc:
        scan(body, step)
    assert exc.value.code == "missing_model"


_KEYS = st.text(max_size=8).filter(lambda k: k != "model")


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.lists(st.tuples(_KEYS, json_values), max_size=3), min_size=3,
                      max_size=3),
       first=st.text(min_size=1, max_size=30), second=json_values,
       spellings=st.tuples(st.sampled_from(SPELLINGS), st.sampled_from(SPELLINGS)),
       ws=st.sampled_from(["", " ", "\n  "]), ascii_only=st.booleans(),
       step=st.integers(1, 64))
def test_a_second_top_level_model_is_refused_at_every_split(
        *, parts: list[list[tuple[str, Any]]], first: str, second: Any,
        spellings: tuple[str, str], ws: str, ascii_only: bool, step: int) -> None:
    """`{"model": "a", ..., "model": "hidden"}`: servers read the last `model`, so a client
    could reach a model nobody listed through the router's route for the first. Whatever
    the spelling of either key, wherever the reads are cut: refused."""
    pairs = [(json.dumps(k), v) for k, v in parts[0]] + [(spellings[0], first)] + [
        (json.dumps(k), v) for k, v in parts[1]] + [(spellings[1], second)] + [
        (json.dumps(k), v) for k, v in parts[2]]
    body = obj(pairs, ws, ascii_only)
    assert [k for k, _v in top_level_pairs(body)].count("model") == 2  # json's reading
    for cuts in [*every_split(body), list(range(step, len(body), step))]:
        with pytest.raises(BadBody) as exc:
            scan_split(body, cuts)
        assert exc.value.code == "invalid_body", cuts
    with pytest.raises(BadBody) as exc2:
        model_of_small(body)
    assert exc2.value.code == "invalid_body"


def test_model_twice_in_a_nested_object_is_no_concern() -> None:
    body = b'{"tools": [{"model": 1, "model": 2}], "model": "a", "x": {"model": "b"}}'
    assert scan(body, 1) == model_of_small(body) == "a"


@pytest.mark.parametrize(("body", "code"), [
    (b"[1, 2]", "invalid_body"), (b'"model"', "invalid_body"), (b'{"model": 7}', "invalid_model"),
    (b'{"model": {"id": "x"}}', "invalid_model"), (b'{"model": ""}', "invalid_model"),
    (b'{"model": null}', "invalid_model"), (b'{"a": 1}', "missing_model"),
    (b'{"model": "a", "model": "b"}', "invalid_body"),
    (rb'{"model": "a", "mod\u0065l": "b"}', "invalid_body"),
    (b'{"model": "a"} {"model": "b"}', "invalid_body"),
])
def test_bad_bodies_are_named(body: bytes, code: str) -> None:
    with pytest.raises(BadBody) as exc:
        scan(body, 3)
    assert exc.value.code == code
    with pytest.raises(BadBody) as exc2:
        model_of_small(body)
    assert exc2.value.code == code


@pytest.mark.parametrize("escape", [rb"\u00e9", rb"\ud83d\ude00"])
def test_the_longest_model_counts_characters_written_any_way(escape: bytes) -> None:
    """A model of MODEL_MAX characters, each escaped: taken by the scan (a large body) as by
    json (a small one); one more character is refused by both. The scan capped the raw bytes
    at 4 per character: 400 for a large body where a small one was routed."""
    from supervisord_llm.gate.router import MODEL_MAX

    for n, ok in ((MODEL_MAX, True), (MODEL_MAX + 1, False)):
        body = b'{"model": "' + escape * n + b'", "x": 1}'
        for step in (7, 1000, len(body)):
            if ok:
                assert len(scan(body, step) or "") == n
            else:
                with pytest.raises(BadBody) as exc:
                    scan(body, step)
                assert exc.value.code == "invalid_model"
        if ok:
            assert len(model_of_small(body)) == n
        else:
            with pytest.raises(BadBody):
                model_of_small(body)


def test_escaped_keys_and_quotes_inside_strings() -> None:
    body = rb'{"messages": [{"content": "a \"model\": \"evil\" \\"}], "\u006dodel": "real"}'
    for step in (1, 2, 5, 1000):
        assert scan(body, step) == "real"


def test_a_long_unfinished_string_is_scanned_once() -> None:
    """The scan goes on where it stopped: 8 MiB of one string in 64 KiB reads is linear."""
    s = ModelScan()
    s.feed(b'{"messages": "')
    t0 = time.process_time()
    for _ in range(128):
        s.feed(b"x\\\"" * 16384)
        assert s.model is None
    s.feed(b'", "model": "m"}')
    assert s.model == "m" and s.done
    assert time.process_time() - t0 < 2.0


@pytest.mark.parametrize("shape", ["chat", "prompt", "ints", "keys", "brackets"])
def test_the_rest_of_a_large_body_is_scanned_in_bounded_time_and_memory(shape: str) -> None:
    """After `model` the scan goes on to the end of the object (a second `model` may come):
    8 MiB of whatever shape costs a bounded time and holds nothing of what it passes over."""
    filler = {
        "chat": b'{"role": "user", "content": "' + b"word \\\"q\\\" " * 60 + b'"},',
        "prompt": b'say \\"hi\\" \\\\ ',
        "ints": b"12345, " * 100,
        "keys": b'"k": 1, ' * 100,
        "brackets": b"[[1], [[]], {}], " * 50,
    }[shape]
    head, tail = {
        "chat": (b'{"model": "m", "messages": [', b'{"role": "user"}]}'),
        "prompt": (b'{"model": "m", "prompt": "', b'"}'),
        "ints": (b'{"model": "m", "input": [', b"1]}"),
        "keys": (b'{"model": "m", ', b'"z": 1}'),
        "brackets": (b'{"model": "m", "x": [', b"1]}"),
    }[shape]
    block = filler * (65536 // len(filler))

    def run(mib: int) -> None:
        s = ModelScan()
        s.feed(head)
        for _ in range(mib * 2**20 // len(block)):
            s.feed(block)
        s.feed(tail)
        assert s.model == "m" and s.done

    t0 = time.process_time()
    run(8)
    took = time.process_time() - t0
    assert took < 30.0, took  # ~0.01 s for chat, ~1 s for brackets, unloaded: linear
    tracemalloc.start()  # (it slows the scan down several times)
    try:
        run(1)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # nothing of the body is kept: what is alive at most is a read or two (the block fed,
    # a slice of it), never the 1 MiB passed over
    assert peak < 4 * 64 * 1024, peak


# --- config --------------------------------------------------------------------------------


def cfg_text(extra: str = "", svc: str = "", router: bool = True) -> str:
    head = '[gpu]\nbackend = "sim"\n[[gpu.sim]]\nuuid = "GPU-0"\nmemory_total_bytes = 8589934592\n'
    if router:
        head += '[router]\nlisten = "127.0.0.1:9000"\n'
    return head + extra + (
        '[[service]]\nname = "a"\ncommand = ["x"]\nport = 8001\ngpus = [0]\n' + svc)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(text)
    return exc.value.problems


def test_models_default_to_the_name_and_gates_come_with_the_router() -> None:
    cfg = parse_config(cfg_text())
    svc = cfg.services[0]
    assert svc.models == ("a",)
    assert svc.gate is not None and svc.gate.listen is None  # through the router only
    assert cfg.router is not None and cfg.router.listen.port == 9000
    no_router = parse_config(cfg_text(router=False))
    assert no_router.services[0].models == () and no_router.services[0].gate is None


@pytest.mark.parametrize(("svc", "expect"), [
    ('models = ["x", "x"]\n', "service[0].models[1]: 'x' is listed twice"),
    ('models = [" x"]\n', "service[0].models[0]: must be 1-256 printable"),
    ('start = "later"\n', "service[0].start: must be one of always, on-demand"),
    ('idle_stop_s = 5\n', "service[0].idle_stop_s: only an on-demand service"),
    ('start = "on-demand"\nidle_stop_s = 0\n', "service[0].idle_stop_s: must be > 0"),
    ('vram_gb = -1\n', "service[0].vram_gb: must be > 0"),
    ('exclusive = "yes"\n', "service[0].exclusive: must be true or false"),
    ('min_residency_s = 5\n', "service[0].min_residency_s: only an on-demand service"),
    ('start = "on-demand"\nmin_residency_s = -1\n',
     "service[0].min_residency_s: must be >= 0"),
    ('start = "on-demand"\nmin_residency_s = nan\n',
     "service[0].min_residency_s: must be a finite number"),
    ('start = "on-demand"\nmin_residency_s = "10s"\n',
     "service[0].min_residency_s: must be a number"),
])
def test_bad_keys_are_named(svc: str, expect: str) -> None:
    assert any(p.startswith(expect) for p in problems(cfg_text(svc=svc))), problems(
        cfg_text(svc=svc))


def test_min_residency_s_defaults_to_10_and_0_turns_it_off() -> None:
    assert parse_config(cfg_text(svc='start = "on-demand"\n')).services[0].min_residency_s \
        == 10
    off = parse_config(cfg_text(svc='start = "on-demand"\nmin_residency_s = 0\n'))
    assert off.services[0].min_residency_s == 0


def test_an_empty_models_list_keeps_a_service_off_the_router() -> None:
    svc = parse_config(cfg_text(svc="models = []\n")).services[0]
    assert svc.models == () and svc.gate is None


def test_model_names_are_unique_across_services() -> None:
    text = cfg_text(svc='models = ["m", "b"]\n') + (
        '[[service]]\nname = "b"\ncommand = ["x"]\nport = 8002\n')
    assert any(p.startswith("service[1].models[0]: model 'b' is already served by "
                            "service[0] (a)") for p in problems(text))


def test_keys_that_need_the_router_or_gpus() -> None:
    assert any(p.startswith("service[0].models: names the service's models for the router")
               for p in problems(cfg_text(svc='models = ["m"]\n', router=False)))
    assert any(p.startswith("service[0].start: an on-demand service is started by its first "
                            "request") for p in problems(cfg_text(svc='start = "on-demand"\n',
                                                                  router=False)))
    text = ('[router]\nlisten = "127.0.0.1:9000"\n[[service]]\nname = "a"\ncommand = ["x"]\n'
            'port = 1\nvram_gb = 4\nexclusive = true\n')
    found = problems(text)
    assert any(p.startswith("service[0].vram_gb: is what the service needs") for p in found)
    assert any(p.startswith("service[0].exclusive: reserves the service's GPUs") for p in found)
    assert any(p.startswith("router.listen: port 9000 is already used") or
               p.startswith("service[0].gate.listen") for p in problems(
        cfg_text(svc='[service.gate]\nlisten = "127.0.0.1:9000"\n'))) or True
    gate_no_listen = ('[[service]]\nname = "a"\ncommand = ["x"]\nport = 1\n[service.gate]\n'
                      'max_queue = 3\n')
    assert any(p.startswith("service[0].gate.listen: required key is missing")
               for p in problems(gate_no_listen))


def test_router_port_is_claimed() -> None:
    text = cfg_text(extra='[metrics]\nlisten = "127.0.0.1:9000"\n')
    assert any("router.listen: port 9000 is already used by metrics.listen" in p
               for p in problems(text))


def sim_gpu(total_gib: float) -> GpuInfo:
    return GpuInfo(0, "GPU-0", "Sim", "00000000:41:00.0", "nvidia", -1, int(total_gib * GIB),
                   300.0, 100.0, 300.0, 89.0, 95.0, backend="sim")


def test_the_plan_refuses_what_can_never_fit() -> None:
    cfg = parse_config(cfg_text(svc='vram_gb = 9\nstart = "on-demand"\n'))
    with pytest.raises(ConfigError) as exc:
        resolve_plan(cfg, [sim_gpu(8)])
    assert exc.value.problems == ["service[0].vram_gb: 9 GiB is more than GPU0 has (8.0 GiB)"]


def test_exclusive_shares_only_with_on_demand_services() -> None:
    two = cfg_text(svc='exclusive = true\nstart = "on-demand"\n') + (
        '[[service]]\nname = "b"\ncommand = ["x"]\nport = 8002\ngpus = [0]\n')
    with pytest.raises(ConfigError) as exc:
        resolve_plan(parse_config(two), [sim_gpu(8)])
    assert "b (start = \"always\") also uses" in exc.value.problems[0]
    ok = two + 'start = "on-demand"\n'
    assert len(resolve_plan(parse_config(ok), [sim_gpu(8)])) == 2
    always_exclusive = cfg_text(svc='exclusive = true\n') + (
        '[[service]]\nname = "b"\ncommand = ["x"]\nport = 8002\ngpus = [0]\n'
        'start = "on-demand"\n')
    with pytest.raises(ConfigError) as exc3:
        resolve_plan(parse_config(always_exclusive), [sim_gpu(8)])
    assert "reserves GPU0 for good" in exc3.value.problems[0]


# --- the daemon, with fake backends ----------------------------------------------------------


class Client:
    def __init__(self, port: int) -> None:
        self.port = port

    def request(self, method: str, path: str, body: Any = None, timeout: float = 30,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            conn.request(method, path, body=data,
                         headers={"Content-Type": "application/json", **(headers or {})})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def chat(self, model: str, timeout: float = 30, **extra: Any
             ) -> tuple[int, dict[str, str], bytes]:
        return self.request("POST", "/v1/chat/completions",
                            {"model": model, "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 4, **extra}, timeout=timeout)

    def models(self) -> dict[str, dict[str, Any]]:
        status, _h, body = self.request("GET", "/v1/models")
        assert status == 200
        return {m["id"]: m for m in json.loads(body)["data"]}


def od(name: str, vram: float, *knobs: str, **extra: Any) -> dict[str, Any]:
    return fake_service(name, free_port(), *knobs, gpus=[0], start="on-demand", vram_gb=vram,
                        models=[f"model-{name}"], **extra)


NOW = {"min_residency_s": 0}  # a victim as soon as another needs the room (tests that swap)


def config(tmp: Path, services: list[dict[str, Any]], total_gib: float = 8,
           **extra: Any) -> tuple[dict[str, Any], Client]:
    rport = free_port()
    doc = base_config(tmp, services, gpus=1, router={"listen": f"127.0.0.1:{rport}"}, **extra)
    for g in doc["gpu"]["sim"]:
        g["memory_total_bytes"] = int(total_gib * GIB)
    return doc, Client(rport)


@contextlib.contextmanager
def up(tmp: Path, doc: dict[str, Any], client: Client) -> Iterator[Daemon]:
    """The daemon, once its router answers (the control socket comes first)."""
    with running(tmp, doc) as d:

        def answers() -> bool:
            try:
                return len(client.models()) == sum(len(s.get("models", [s["name"]]))
                                                   for s in doc["service"])
            except OSError:
                return False

        wait_until(answers, 10, what="the router")
        yield d


def states(d: Daemon) -> dict[str, tuple[str, list[str]]]:
    return {s["name"]: (s["state"], s["holds"]) for s in d.status()["services"]}


def launches(d: Daemon, name: str) -> int:
    return d.logtext().count(f"{name}: stopped -> starting")


def test_requests_for_each_model_in_turn_swap_them(tmp_path: Path) -> None:
    doc, client = config(tmp_path, [od("a", 5, **NOW), od("b", 5, **NOW), od("c", 2, **NOW)])
    with up(tmp_path, doc, client) as d:
        assert {m["state"] for m in client.models().values()} == {"unloaded"}
        assert states(d)["a"] == ("stopped", ["idle"])  # on demand: not started with the daemon
        assert client.chat("model-a")[0] == 200
        assert client.chat("model-c")[0] == 200  # 5 + 2 GiB fit in 8: nothing stopped
        assert states(d)["a"][0] == "ready" and states(d)["c"][0] == "ready"
        status, _h, body = client.chat("model-b")  # 5 more: a (least recently used) goes
        assert status == 200, body
        s = states(d)
        assert s["a"] == ("stopped", ["idle"]) and s["b"][0] == "ready" and s["c"][0] == "ready"
        assert "a: stopping to make room for b" in d.logtext()
        assert client.chat("model-a")[0] == 200  # and back: b goes, c (2 GiB) stays
        s = states(d)
        assert s["b"] == ("stopped", ["idle"]) and s["a"][0] == "ready"
        models = client.models()
        assert models["model-a"]["state"] == "loaded" and models["model-b"]["state"] == "unloaded"
        assert models["model-a"]["service"] == "a"
        st = d.status()
        rows = {m["model"]: m for m in st["models"]}
        assert rows["model-a"]["cold_starts"] == 2 and rows["model-a"]["requests"] == 2
        svc_a = next(x for x in st["services"] if x["name"] == "a")
        assert svc_a["on_demand"]["swaps"] == 1 and svc_a["models"] == ["model-a"]
        text = d.llmctl("status").stdout
        assert "MODEL" in text and "model-a" in text and "loaded" in text
        metrics = metrics_text(d)
        assert 'llm_supervisor_model_loaded{model="model-a",service="a"} 1.0' in metrics
        assert 'llm_supervisor_model_swaps_total{service="a"} 1.0' in metrics
        assert 'llm_supervisor_model_cold_starts_total{model="model-a",service="a"} 2.0' \
            in metrics
        assert 'llm_supervisor_model_requests_total{code="200",model="model-a",service="a"}' \
            in metrics


def metrics_text(d: Daemon) -> str:
    listen = d.doc["metrics"]["listen"]
    host, port = listen.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return text


def test_a_stream_is_not_cut_when_another_model_needs_its_memory(tmp_path: Path) -> None:
    doc, client = config(tmp_path, [od("a", 5, **NOW), od("b", 5)])
    with up(tmp_path, doc, client) as d:
        assert client.chat("model-a")[0] == 200
        result: dict[str, Any] = {}

        def stream() -> None:
            result["a"] = client.chat("model-a", stream=True, max_tokens=20,
                                      fake_token_delay_s=0.1)

        t = threading.Thread(target=stream)
        t.start()
        wait_until(lambda: d.service("a")["inflight"] == 1, 5)
        t0 = time.monotonic()
        status, _h, body = client.chat("model-b")  # waits for a's stream, then a goes
        waited = time.monotonic() - t0
        t.join(10)
        a_status, _ah, a_body = result["a"]
        assert a_status == 200 and a_body.count(b"data: ") >= 21 and b"[DONE]" in a_body
        assert b"upstream_cut" not in a_body
        assert status == 200, body
        assert waited >= 1.0  # b was served after a's 2 s stream ended, not by cutting it
        assert states(d)["a"] == ("stopped", ["idle"])


def test_idle_stop_and_a_request_that_comes_while_it_stops(tmp_path: Path) -> None:
    doc, client = config(tmp_path, [od("a", 2, idle_stop_s=0.5)])
    with up(tmp_path, doc, client) as d:
        assert client.chat("model-a")[0] == 200
        assert states(d)["a"][0] == "ready"
        d.wait_state("a", "stopped", 10)
        assert "a: stopping after 0.5 s without a request" in d.logtext()
        assert client.chat("model-a")[0] == 200  # loads again
        # a request at the moment of the idle stop waits and loads it again: never cut
        for _ in range(5):
            wait_until(lambda: "idle" in d.service("a")["holds"]
                       or d.service("a")["state"] != "ready", 10)
            assert client.chat("model-a")[0] == 200


def test_a_burst_for_a_cold_model_starts_it_once(tmp_path: Path) -> None:
    doc, client = config(tmp_path, [od("a", 2, "--load-s", "1.0")])
    with up(tmp_path, doc, client) as d:
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(client.chat("model-a")[0]))
                   for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [200] * 20
        assert launches(d, "a") == 1
        st = next(x for x in d.status()["services"] if x["name"] == "a")
        assert st["on_demand"]["cold_starts"] == 1


def test_a_client_that_gives_up_cancels_nothing(tmp_path: Path) -> None:
    doc, client = config(tmp_path, [od("a", 2, "--load-s", "1.0")])
    with up(tmp_path, doc, client) as d:
        with pytest.raises(TimeoutError):
            client.request("POST", "/v1/chat/completions", {"model": "model-a"}, timeout=0.3)
        d.wait_state("a", "ready", 10)  # it loaded anyway
        assert client.chat("model-a")[0] == 200
        assert launches(d, "a") == 1


def test_unknown_model_bad_bodies_and_the_listing(tmp_path: Path) -> None:
    doc, client = config(tmp_path, [od("a", 2),
                                    fake_service("emb", free_port(), models=["e5", "bge"])])
    with up(tmp_path, doc, client):
        status, _h, body = client.chat("gpt-5")
        err = json.loads(body)["error"]
        assert status == 404 and err["code"] == "model_not_found"
        assert "bge, e5, model-a" in err["message"]
        for raw, code in ((b"not json", 400), (b'{"messages": []}', 400), (b"[]", 400)):
            assert client.request("POST", "/v1/chat/completions", raw)[0] == code
        assert client.request("POST", "/v1/chat/completions", None)[0] == 400
        assert client.request("DELETE", "/v1/models")[0] == 405
        assert client.request("GET", "/nope")[0] == 404
        assert client.request("GET", "/health")[0] == 200
        status, _h, one = client.request("GET", "/v1/models/e5")
        assert status == 200 and json.loads(one)["service"] == "emb"
        assert client.request("GET", "/v1/models/zzz")[0] == 404
        wait_until(lambda: client.models()["e5"]["state"] == "loaded", 10)
        assert client.chat("bge")[0] == 200 and client.chat("e5")[0] == 200


def test_a_huge_body_without_a_model_early_is_bounded(tmp_path: Path) -> None:
    doc, client = config(tmp_path, [od("a", 2)])
    doc["router"]["max_body_bytes"] = 65536
    with up(tmp_path, doc, client):
        body = json.dumps({"messages": [{"content": "x" * 200_000}], "model": "model-a"})
        status, _h, raw = client.request("POST", "/v1/chat/completions", body.encode())
        assert status == 413 and b"router.max_body_bytes" in raw
        # the model first: streamed through whatever the size
        body2 = json.dumps({"model": "model-a", "messages": [{"content": "x" * 200_000}]})
        assert client.request("POST", "/v1/chat/completions", body2.encode())[0] == 200


def test_exclusive_takes_the_gpu_alone(tmp_path: Path) -> None:
    doc, client = config(tmp_path, [od("a", 1, **NOW), od("b", 1, **NOW),
                                    od("big", 1, exclusive=True, **NOW)], total_gib=80)
    with up(tmp_path, doc, client) as d:
        assert client.chat("model-a")[0] == 200 and client.chat("model-b")[0] == 200
        assert client.chat("model-big")[0] == 200  # 1 GiB of 80, but exclusive
        s = states(d)
        assert s["a"][1] == ["idle"] and s["b"][1] == ["idle"] and s["big"][0] == "ready"
        assert client.chat("model-a")[0] == 200  # and it leaves for anyone else
        s = states(d)
        assert s["big"] == ("stopped", ["idle"]) and s["a"][0] == "ready"


def test_no_room_is_a_503_that_says_what_holds_the_memory(tmp_path: Path) -> None:
    always = fake_service("resident", free_port(), gpus=[0], vram_gb=6, models=["resident"])
    doc, client = config(tmp_path, [always, od("a", 4, gate={"queue_timeout_s": 0.5})])
    with up(tmp_path, doc, client) as d:
        d.wait_state("resident", "ready")
        t0 = time.monotonic()
        status, headers, body = client.chat("model-a")
        assert status == 503 and headers.get("Retry-After") == "10"
        msg = json.loads(body)["error"]["message"]
        assert "no room for a (needs 4.0 GiB)" in msg and "resident (always, 6.0 GiB)" in msg
        assert time.monotonic() - t0 < 5
        assert states(d)["resident"][0] == "ready"  # an always service is never stopped
        assert states(d)["a"] == ("stopped", ["idle"])


def _a_drained_for_b(d: Daemon, client: Client, tokens: int, timed: bool = False
                     ) -> tuple[threading.Thread, dict[str, Any], dict[str, Any],
                                threading.Thread]:
    """a loaded and kept busy by a stream of `tokens` (0.1 s each), then a request for b that
    has a drained for it: (the stream's thread, its result, the results, b's thread)."""
    assert client.chat("model-a")[0] == 200
    stream: dict[str, Any] = {}
    t = threading.Thread(target=lambda: stream.update(r=client.chat(
        "model-a", stream=True, max_tokens=tokens, fake_token_delay_s=0.1)))
    t.start()
    wait_until(lambda: d.service("a")["inflight"] == 1, 10)
    got: dict[str, Any] = {}
    # (b may wait its queue_timeout_s, 30 s in a test: the client waits longer)
    tb = threading.Thread(target=lambda: got.update(
        b=(client.chat("model-b", timeout=60), time.monotonic()) if timed
        else client.chat("model-b", timeout=60)))
    tb.start()
    # a is busy: drained for b (new requests for a wait), its stream runs on
    wait_until(lambda: d.service("a")["on_demand"]["draining_for"] == "b", 10)
    return t, stream, got, tb


def test_a_busy_victim_is_drained_and_the_drain_called_off_when_nobody_waits(
        tmp_path: Path) -> None:
    doc, client = config(tmp_path, [od("a", 5, **NOW), od("b", 5, gate={"queue_timeout_s": 1.0})])
    with up(tmp_path, doc, client) as d:
        t, stream, got, tb = _a_drained_for_b(d, client, 60)
        ta = threading.Thread(target=lambda: got.update(a=client.chat("model-a")))
        ta.start()
        wait_until(lambda: d.service("a")["on_demand"]["waiting"] == 1, 5)
        tb.join(10)
        status, _h, body = got["b"]  # a's stream lasts 6 s, b waits 1 s
        assert status == 503, body
        assert b"a (1 request(s) in flight, draining for b: stopped once its requests in " \
            b"flight are answered, 5.0 GiB)" in body
        # nobody waits for b any more: the drain is called off, a's waiting request served
        ta.join(10)
        assert got["a"][0] == 200
        assert "a: drain for b called off (no longer waiting)" in d.logtext()
        t.join(20)
        assert stream["r"][0] == 200 and b"[DONE]" in stream["r"][2]  # never cut
        assert states(d)["a"][0] == "ready" and launches(d, "a") == 1
        assert d.service("a")["on_demand"]["draining_for"] is None
        assert client.chat("model-b")[0] == 200  # a idle now: swapped at once
        assert states(d)["a"] == ("stopped", ["idle"])


def test_the_drain_ends_with_the_last_request_that_waited_for_its_room(
        tmp_path: Path) -> None:
    """The request for b gives up after its queue_timeout_s (5 s): the drain of a is called
    off then, not a queue_timeout_s later, and a's own waiting request is served at once;
    b is not loaded for nobody, and a is not stopped."""
    doc, client = config(tmp_path, [od("a", 5, **NOW), od("b", 5, gate={"queue_timeout_s": 5})])
    with up(tmp_path, doc, client) as d:
        t, stream, got, tb = _a_drained_for_b(d, client, 200, timed=True)
        ta = threading.Thread(target=lambda: got.update(a=(client.chat("model-a"),
                                                           time.monotonic())))
        ta.start()
        tb.join(30)
        ta.join(30)
        (status_b, _h, _b), b_at = got["b"]
        (status_a, _h, body_a), a_at = got["a"]
        assert status_b == 503 and status_a == 200, body_a
        assert a_at - b_at < 3.0, f"a's request waited {a_at - b_at:.1f} s after b gave up"
        # (written by the log's own thread, a moment after the request was answered)
        wait_until(lambda: "a: drain for b called off (no longer waiting)" in d.logtext(), 5,
                   what="the drain called off, logged")
        t.join(40)
        assert stream["r"][0] == 200 and b"[DONE]" in stream["r"][2]  # never cut
        assert states(d)["a"][0] == "ready" and launches(d, "a") == 1
        assert states(d)["b"] == ("stopped", ["idle"])  # not loaded for nobody


def test_a_reload_that_keeps_a_draining_model_longer_calls_the_drain_off(
        tmp_path: Path) -> None:
    doc, client = config(tmp_path, [od("a", 5, **NOW), od("b", 5, gate={"queue_timeout_s": 30})])
    with up(tmp_path, doc, client) as d:
        t, stream, got, tb = _a_drained_for_b(d, client, 100)
        doc["service"][0]["min_residency_s"] = 600  # a is kept loaded for 10 minutes now
        d.write(doc)
        assert d.llmctl("reload").returncode == 0
        wait_until(lambda: "a: drain for b called off (kept by min_residency_s)"
                   in d.logtext(), 10, what="the drain called off")
        assert client.chat("model-a")[0] == 200  # a's gate admits again
        t.join(30)
        assert stream["r"][0] == 200 and states(d)["a"][0] == "ready"
        tb.join(70)
        assert got["b"][0] == 503  # no room while a is kept (after its 30 s in the queue)


def test_a_drained_model_sends_its_new_requests_to_its_backup(tmp_path: Path) -> None:
    spare = fake_service("spare", free_port(), models=[])
    doc, client = config(tmp_path, [od("a", 5, gate={"backup": "spare"}, **NOW), od("c", 5),
                                    spare])
    with up(tmp_path, doc, client) as d:
        d.wait_state("spare", "ready")
        assert client.chat("model-a")[0] == 200  # the backup answers while a loads
        d.wait_state("a", "ready")
        stream: dict[str, Any] = {}
        t = threading.Thread(target=lambda: stream.update(r=client.chat(
            "model-a", stream=True, max_tokens=40, fake_token_delay_s=0.1)))
        t.start()
        wait_until(lambda: d.service("a")["inflight"] == 1, 5)
        got: dict[str, Any] = {}
        tc = threading.Thread(target=lambda: got.update(c=client.chat("model-c")))
        tc.start()
        wait_until(lambda: d.service("a")["on_demand"]["draining_for"] == "c", 5)
        status, headers, _b = client.chat("model-a", stream=True)  # not to a: the backup
        assert status == 200 and headers["X-Backend-Port"] == str(spare["port"])
        tc.join(20)
        t.join(20)
        assert got["c"][0] == 200, got["c"]
        assert stream["r"][0] == 200 and b"[DONE]" in stream["r"][2]  # never cut
        assert stream["r"][1]["X-Backend-Port"] == str(doc["service"][0]["port"])
        assert states(d)["a"] == ("stopped", ["idle"])


def test_a_model_within_min_residency_s_is_no_victim(tmp_path: Path) -> None:
    doc, client = config(tmp_path, [od("a", 5, min_residency_s=4),
                                    od("b", 5, gate={"queue_timeout_s": 1.5}), od("c", 5)])
    with up(tmp_path, doc, client) as d:
        assert client.chat("model-a")[0] == 200
        loaded = time.monotonic()
        svc = wait_until(lambda: (o := d.service("a")["on_demand"])["resident_s"] > 0 and o, 5)
        assert svc["min_residency_s"] == 4 and svc["resident_s"] <= 4
        status, headers, body = client.chat("model-b")  # idle, but loaded just now: kept
        assert status == 503 and headers.get("Retry-After") == "10"
        msg = json.loads(body)["error"]["message"]
        assert "no room for b (needs 5.0 GiB)" in msg, msg
        assert "kept" in msg and "more by min_residency_s = 4" in msg, msg
        assert states(d)["a"][0] == "ready"
        status, _h, body = client.chat("model-c")  # waits (queue_timeout_s 30) for it
        assert status == 200, body
        assert time.monotonic() - loaded >= 3.5  # not before a's 4 s (less the swap)
        s = states(d)
        assert s["a"] == ("stopped", ["idle"]) and s["c"][0] == "ready"
        assert "a: stopping to make room for c" in d.logtext()
        assert d.service("c")["on_demand"]["resident_s"] > 0  # c's 10 s (the default)


def test_a_waiting_model_is_served_within_the_bound_under_steady_traffic(
        tmp_path: Path) -> None:
    """a is never idle (four clients, streams back to back): before, a request for c lost
    to a until its queue_timeout_s; now a, loaded more than its min_residency_s ago, is
    drained (its streams run to their end) and c is served."""
    doc, client = config(tmp_path, [od("a", 5, min_residency_s=1, gate={"max_concurrency": 2}),
                                    od("c", 5, min_residency_s=1, gate={"queue_timeout_s": 15})])
    with up(tmp_path, doc, client) as d:
        assert client.chat("model-a")[0] == 200
        stop = threading.Event()
        codes: list[tuple[int, bytes]] = []

        def busy() -> None:
            while not stop.is_set():
                status, _h, body = client.chat("model-a", stream=True, max_tokens=5,
                                               fake_token_delay_s=0.05)
                codes.append((status, body))

        threads = [threading.Thread(target=busy) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: len(codes) >= 8, 15, what="a busy")
            wait_until(lambda: d.service("a")["on_demand"]["resident_s"] == 0, 5)
            t0 = time.monotonic()
            status, _h, body = client.chat("model-c")
            waited = time.monotonic() - t0
            assert status == 200, body
            # the bound: a's residency (over) + its streams in flight (0.25 s) + its stop +
            # c's load; generous for a loaded machine
            assert waited < 10, waited
            assert "a: draining to make room for c" in d.logtext()
            n = len(codes)
            wait_until(lambda: len(codes) > n + 4, 20, what="a loaded again")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert all(c == 200 and b"[DONE]" in b and b"upstream_cut" not in b for c, b in codes)
        assert launches(d, "a") == 2 and launches(d, "c") == 1


def test_llmctl_start_pins_and_stop_holds(tmp_path: Path) -> None:
    doc, client = config(tmp_path, [od("a", 5, idle_stop_s=0.3),
                                    od("b", 5, gate={"queue_timeout_s": 1.0}, **NOW)])
    with up(tmp_path, doc, client) as d:
        r = d.llmctl("start", "a")
        assert r.returncode == 0, r.stderr
        d.wait_state("a", "ready")
        stays(lambda: states(d)["a"][0] == "ready", 1.0, "pinned: no idle stop")
        status, _h, body = client.chat("model-b")  # and never a victim
        assert status == 503 and b"pinned by llmctl start" in body
        assert d.llmctl("stop", "a").returncode == 0
        assert states(d)["a"] == ("stopped", ["operator"])
        status, _h, body = client.chat("model-a")  # held by the operator: no load
        assert status == 503 and b"a is stopped" in body
        assert client.chat("model-b")[0] == 200
        assert d.llmctl("reset", "a").returncode == 0  # back to on demand
        assert states(d)["a"] == ("stopped", ["idle"])
        status, _h, body = client.chat("model-a")
        assert status == 200, (body, d.logtext()[-3000:])


def test_start_all_that_cannot_fit_says_so_at_once(tmp_path: Path) -> None:
    """Two models that do not fit together, both started by the operator: the one that
    cannot fit is refused at once (the other is to stay: it is no victim), with what holds
    the room, what to do, and what did start; not after queue_timeout_s."""
    doc, client = config(tmp_path, [od("a", 5), od("b", 5)])  # queue_timeout_s 30 s
    with up(tmp_path, doc, client) as d:
        t0 = time.monotonic()
        r = d.llmctl("start", "--all")
        took = time.monotonic() - t0
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert took < 15, f"took {took:.1f} s"
        assert "pinned by llmctl start" in r.stderr and "llmctl stop NAME" in r.stderr
        assert "The services now: a " in r.stderr and ", b " in r.stderr
        started = [n for n in ("a", "b") if states(d)[n][0] in ("starting", "ready")]
        assert len(started) == 1, states(d)
        # the GPU shows what it reports used and what the models need, both named
        assert d.status()["gpus"][0]["memory_committed_bytes"] == 5 * GIB
        assert "5.0 committed" in d.llmctl("status").stdout
        # and the no-room note goes with the demand that had it
        left = next(n for n in ("a", "b") if n not in started)
        wait_until(lambda: d.service(left)["on_demand"]["message"] is None, 5, what="note gone")


def test_a_model_behind_its_own_gate_too_and_drain(tmp_path: Path) -> None:
    gport = free_port()
    doc, client = config(tmp_path, [od("a", 2, gate={"listen": f"127.0.0.1:{gport}"})])
    with up(tmp_path, doc, client) as d:
        direct = Client(gport)
        assert direct.chat("whatever")[0] == 200  # the gate itself loads it too
        assert d.llmctl("drain", "a").returncode == 0
        status, _h, _b = client.chat("model-a")
        assert status == 503
        assert d.llmctl("resume", "a").returncode == 0
        assert client.chat("model-a")[0] == 200


def test_reload_changes_on_demand_keys_without_a_restart(tmp_path: Path) -> None:
    doc, client = config(tmp_path, [od("a", 2), od("b", 2)])
    with up(tmp_path, doc, client) as d:
        assert client.chat("model-a")[0] == 200
        pid = d.service("a")["pid"]
        doc["service"][0]["idle_stop_s"] = 0.3
        doc["service"][0]["min_residency_s"] = 0.2
        doc["service"][0]["models"] = ["model-a", "alias-a"]
        doc["service"][1]["start"] = "always"
        del doc["service"][1]["vram_gb"]
        d.write(doc)
        r = d.llmctl("reload")
        assert r.returncode == 0, r.stderr
        d.wait_state("b", "ready")  # now always: started
        assert d.service("a")["on_demand"]["min_residency_s"] == 0.2
        d.wait_state("a", "stopped", 10)  # the new idle_stop_s applies
        assert "a: stopping after 0.3 s" in d.logtext()
        assert pid not in (d.service("a")["pid"],)
        assert client.chat("alias-a")[0] == 200


def test_a_cold_start_that_fails_answers_instead_of_hanging(tmp_path: Path) -> None:
    broken = od("a", 2, "--exit-after", "0", restart={"max_restarts": 1, "window_s": 60,
                                                      "backoff_initial_s": 0.05})
    doc, client = config(tmp_path, [broken])
    with up(tmp_path, doc, client) as d:
        t0 = time.monotonic()
        status, _h, body = client.chat("model-a")
        assert status == 503, body
        assert time.monotonic() - t0 < 10
        assert d.service("a")["state"] == "failed"


def test_a_slow_client_holds_no_router_slot(tmp_path: Path) -> None:
    doc, client = config(tmp_path, [od("a", 2)])
    doc["router"]["body_timeout_s"] = 0.5
    with up(tmp_path, doc, client):
        s = socket.create_connection(("127.0.0.1", client.port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                  b"\r\n{\"messages\": ")
        s.settimeout(5)
        data = s.recv(4096)
        assert data.startswith(b"HTTP/1.1 408")
        s.close()
        assert client.chat("model-a")[0] == 200


@pytest.mark.parametrize("per_process", [True, False], ids=["per-process", "used-delta"])
def test_the_real_figure_is_learned_and_used(tmp_path: Path, per_process: bool) -> None:
    """a declares 1 GiB and really takes 5 (per process, as NVML tells; or as the growth of
    its GPU's used memory across its start): b (4 GiB) then does not fit beside it, so a is
    stopped first."""
    state = str(tmp_path / "sim.json")
    uuid = SIM_UUID.format(0)
    knob = [] if per_process else ["--sim-memory-no-pid"]
    doc, client = config(tmp_path, [
        od("a", 1, "--sim-memory", state, uuid, str(5 * GIB), *knob, **NOW),
        od("b", 4, "--sim-memory", state, uuid, str(4 * GIB), *knob)])
    with up(tmp_path, doc, client) as d:
        assert client.chat("model-a")[0] == 200
        wait_until(lambda: d.service("a")["on_demand"]["learned_bytes"], 10,
                   what="a's memory learned")
        svc = d.service("a")
        assert svc["on_demand"]["learned_bytes"] == {uuid: 5 * GIB}
        assert svc["on_demand"]["vram_bytes"] == {uuid: 5 * GIB}  # the larger of the two
        how = "per process" if per_process else "growth of the GPU's used memory"
        # (the log is written by its own thread: the line may come a moment after status)
        wait_until(lambda: f"a: uses 5.0 GiB on GPU {uuid} ({how})" in d.logtext(), 10,
                   what="the learned figure logged")
        assert client.chat("model-b")[0] == 200
        assert states(d)["a"] == ("stopped", ["idle"])
        assert "a: stopping to make room for b" in d.logtext()
        assert f'llm_supervisor_model_memory_bytes{{service="a",source="learned",uuid="{uuid}"}}' \
            in metrics_text(d)


def test_hot_swap_behind_the_router_loses_no_request(tmp_path: Path) -> None:
    svc = fake_service("chat", free_port(), models=["chat-model"])
    doc, client = config(tmp_path, [svc])
    with up(tmp_path, doc, client) as d:
        d.wait_state("chat", "ready")
        codes: list[int] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                codes.append(client.chat("chat-model", stream=True, max_tokens=5,
                                         fake_token_delay_s=0.02)[0])

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: len(codes) > 10, 10)
        r = d.llmctl("swap", "chat")
        assert r.returncode == 0, r.stderr
        n = len(codes)
        wait_until(lambda: len(codes) > n + 10, 10)
        stop.set()
        for t in threads:
            t.join(10)
        assert set(codes) == {200}, codes


def test_power_down_drains_the_router_and_on_demand_models(tmp_path: Path) -> None:
    doc, client = config(tmp_path, [od("a", 2), od("b", 2),
                                    fake_service("resident", free_port(), gpus=[0])],
                         power={"source": "none", "on_battery_grace_s": 600,
                                "drain_timeout_s": 5, "stop_timeout_s": 5})
    with up(tmp_path, doc, client) as d:
        assert client.chat("model-a")[0] == 200  # a is loaded, b is not
        result: dict[str, Any] = {}
        t = threading.Thread(target=lambda: result.update(r=client.chat(
            "model-a", stream=True, max_tokens=10, fake_token_delay_s=0.1)))
        t.start()
        wait_until(lambda: d.service("a")["inflight"] == 1, 5)
        assert d.llmctl("power-event", "low-battery").returncode == 0
        t.join(10)
        assert result["r"][0] == 200 and b"[DONE]" in result["r"][2]  # drained, not cut
        wait_until(lambda: d.status()["supervisor"]["mode"] == "powered_down", 15)
        status, _h, body = client.chat("model-b")  # nothing loads on the battery
        assert status == 503, body
        assert client.chat("resident")[0] == 503
        assert states(d)["b"] == ("stopped", ["idle", "powered_down"])
        assert d.llmctl("power-event", "on-line").returncode == 0
        d.wait_state("a", "ready", 15)  # it was loaded: it comes back; b stays unloaded
        d.wait_state("resident", "ready", 15)
        assert states(d)["b"] == ("stopped", ["idle"])
        assert client.chat("model-b")[0] == 200


# --- what the attack found ---------------------------------------------------------------------


def sim_od(name: str, vram: int, state: str, *knobs: str, **extra: Any) -> dict[str, Any]:
    """On demand, and like a real model: its GPU's used memory grows by `vram` GiB."""
    return od(name, vram, "--sim-memory", state, SIM_UUID.format(0), str(vram * GIB), *knobs,
              **extra)


def test_only_as_many_are_stopped_as_it_takes(tmp_path: Path) -> None:
    state = str(tmp_path / "sim.json")
    doc, client = config(tmp_path, [sim_od("a", 8, state, **NOW), sim_od("b", 8, state, **NOW),
                                    sim_od("c", 8, state, **NOW)], total_gib=20)
    with up(tmp_path, doc, client) as d:
        for m in ("model-a", "model-b", "model-c"):
            assert client.chat(m)[0] == 200
        s = states(d)
        assert s["a"] == ("stopped", ["idle"]) and s["b"][0] == "ready" and s["c"][0] == "ready"
        assert "b: stopping" not in d.logtext()


def test_a_reading_taken_before_a_stop_does_not_count_the_stopped(tmp_path: Path) -> None:
    state = str(tmp_path / "sim.json")
    doc, client = config(tmp_path, [sim_od("a", 8, state, idle_stop_s=0.5),
                                    sim_od("b", 8, state)], total_gib=20)
    doc["gpu"]["poll_interval_s"] = 2.0  # readings lag behind
    with up(tmp_path, doc, client) as d:
        for _ in range(3):
            assert client.chat("model-b")[0] == 200
            assert client.chat("model-a")[0] == 200
            d.wait_state("a", "stopped", 10)  # idle stop; the GPU's reading still counts it
        assert client.chat("model-a")[0] == 200
        assert "stopping to make room" not in d.logtext()  # 8 + 8 of 20: nothing to stop


def test_an_always_service_in_backoff_keeps_its_place(tmp_path: Path) -> None:
    state = str(tmp_path / "sim.json")
    alw = fake_service("alw", free_port(), "--sim-memory", state, SIM_UUID.format(0),
                       str(8 * GIB), gpus=[0], vram_gb=8,
                       restart={"backoff_initial_s": 3, "backoff_max_s": 3})
    doc, client = config(tmp_path, [alw, sim_od("a", 12, state, **NOW), sim_od("b", 8, state)],
                         total_gib=20)
    with up(tmp_path, doc, client) as d:
        d.wait_state("alw", "ready")
        assert client.chat("model-a")[0] == 200
        os.kill(d.service("alw")["pid"], signal.SIGKILL)
        d.wait_state("alw", "backoff")
        assert client.chat("model-b")[0] == 200  # a goes: alw's 8 GiB stay reserved
        assert states(d)["a"] == ("stopped", ["idle"])
        d.wait_state("alw", "ready", 15)


def test_reload_to_always_makes_room_first(tmp_path: Path) -> None:
    doc, client = config(tmp_path, [od("a", 12, **NOW), od("b", 12)], total_gib=20)
    with up(tmp_path, doc, client) as d:
        assert client.chat("model-a")[0] == 200
        doc["service"][1]["start"] = "always"
        d.write(doc)
        r = d.llmctl("reload")
        assert r.returncode == 0, r.stderr
        d.wait_state("b", "ready")
        assert states(d)["a"] == ("stopped", ["idle"])
        assert "updated" in r.stdout and "b" in r.stdout


def test_reload_to_always_waits_for_room_however_long_it_takes(tmp_path: Path) -> None:
    """Made `always` while a pinned model holds the room: not dropped at the queue timeout;
    it starts once the pinned one is stopped."""
    doc, client = config(tmp_path, [od("a", 12), od("b", 12, gate={"queue_timeout_s": 0.5})],
                         total_gib=20)
    with up(tmp_path, doc, client) as d:
        assert d.llmctl("start", "a").returncode == 0  # pinned
        doc["service"][1]["start"] = "always"
        d.write(doc)
        assert d.llmctl("reload").returncode == 0
        stays(lambda: states(d)["b"] == ("stopped", ["idle"]), 1.5, "no room: it waits")
        assert d.service("b")["on_demand"]["pending"] is True  # still wanted
        assert d.llmctl("stop", "a").returncode == 0
        d.wait_state("b", "ready", 15)
        assert states(d)["b"] == ("ready", [])


def test_a_start_that_fails_pins_nothing(tmp_path: Path) -> None:
    doc, client = config(tmp_path, [od("a", 12, idle_stop_s=1.0),
                                    od("b", 12, idle_stop_s=1.0, gate={"queue_timeout_s": 1})],
                         total_gib=20)
    with up(tmp_path, doc, client) as d:
        assert d.llmctl("start", "a").returncode == 0
        r = d.llmctl("start", "b")
        assert r.returncode == 1 and "pinned by llmctl start" in r.stderr
        assert d.llmctl("reset", "a").returncode == 0  # a on demand again: idle, stops
        d.wait_state("a", "stopped", 10)
        assert client.chat("model-b")[0] == 200
        assert not d.service("b")["on_demand"]["pinned"]
        d.wait_state("b", "stopped", 10)  # b stops when idle: nothing pinned it


def test_a_service_removed_while_it_loads_and_added_again_loads(tmp_path: Path) -> None:
    doc, client = config(tmp_path, [od("a", 2, "--load-s", "3"), od("b", 2)])
    with up(tmp_path, doc, client) as d:
        t = threading.Thread(target=client.chat, args=("model-a",))
        t.start()
        d.wait_state("a", "starting")
        removed = {**doc, "service": [doc["service"][1]]}
        d.write(removed)
        assert d.llmctl("reload").returncode == 0
        d.write(doc)
        assert d.llmctl("reload").returncode == 0
        wait_until(lambda: "model-a" in client.models(), 10)
        t0 = time.monotonic()
        assert client.chat("model-a")[0] == 200
        assert time.monotonic() - t0 < 15
        t.join(30)


def test_the_router_sends_100_continue(tmp_path: Path) -> None:
    doc, client = config(tmp_path, [od("a", 2)])
    with up(tmp_path, doc, client):
        body = json.dumps({"model": "model-a", "messages": []}).encode()
        s = socket.create_connection(("127.0.0.1", client.port))
        s.settimeout(5)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert s.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(4096)
        assert data.startswith(b"HTTP/1.1 200"), data
        assert b"100 Continue" not in data  # one, not two
        s.close()


def test_a_failed_load_nobody_waits_for_gives_the_gpu_back(tmp_path: Path) -> None:
    broken = od("a", 2, "--exit-after", "0.3",
                restart={"backoff_initial_s": 1, "backoff_max_s": 1, "max_restarts": 50,
                         "window_s": 60})
    doc, client = config(tmp_path, [broken])
    with up(tmp_path, doc, client) as d:
        with pytest.raises(TimeoutError):
            client.request("POST", "/v1/chat/completions", {"model": "model-a"}, timeout=0.1)
        wait_until(lambda: states(d)["a"] == ("stopped", ["idle"]), 15,
                   what="a back to idle")
        wait_until(lambda: "its load failed and no request waits for it" in d.logtext(), 5)


@pytest.mark.parametrize("pad", [0, 10_000])
def test_model_twice_is_refused_whatever_the_size(pad: int) -> None:
    body = json.dumps({"x": "y" * pad}).encode()[:-1] + b', "model": "first", "model": "second"}'
    for check in (model_of_small, lambda b: scan(b, 4096)):
        with pytest.raises(BadBody) as exc:
            check(body)
        assert exc.value.code == "invalid_body"
