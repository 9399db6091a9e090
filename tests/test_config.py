"""Configuration: every check names its key by path; --check never shows a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import io
import math
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers import ROOT, sim_gpus, toml_dumps
from supervisord_llm.cli import daemon_main
from supervisord_llm.config import (
    MAX_CONFIG_BYTES,
    MAX_MESSAGE_CHARS,
    Config,
    Listen,
    PowerSection,
    ProbeSection,
    Threshold,
    build_config,
    load_config,
    normalize_pci_bus_id,
    parse_config,
    parse_listen,
)
from supervisord_llm.errors import ConfigError


def problems(doc: dict[str, Any] | str) -> list[str]:
    text = doc if isinstance(doc, str) else toml_dumps(doc)
    with pytest.raises(ConfigError) as info:
        parse_config(text, "cfg.toml")
    return info.value.problems


def svc(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "a", "command": ["/bin/sleep", "60"]}
    base.update(kw)
    return base


def test_minimal_defaults() -> None:
    cfg = parse_config(toml_dumps({"service": [svc()]}))
    assert cfg.supervisor.control_socket == "/run/llm-supervisor/control.sock"
    assert cfg.supervisor.state_dir == "/var/lib/llm-supervisor"
    assert str(cfg.metrics.listen) == "127.0.0.1:9468"
    assert cfg.gpu.backend == "auto"
    s = cfg.services[0]
    assert s.health.url is None  # no port, no health section: liveness only
    assert s.restart.policy == "on-failure" and s.stop.signal == signal.SIGTERM


def test_example_config_is_valid() -> None:
    cfg = load_config(ROOT / "config.toml.example")
    names = [s.name for s in cfg.services]
    assert len(names) >= 3
    assert cfg.thermal.warn_c == Threshold("slowdown", -6.0)
    assert {c.kind for c in cfg.checkpoints} == {"http", "command", "signal"}
    boxed = [s for s in cfg.services if s.container is not None]
    assert boxed and boxed[0].container is not None \
        and boxed[0].container.image.startswith("docker.io/vllm/")


def test_port_gives_default_health_url() -> None:
    cfg = parse_config(toml_dumps({"service": [svc(port=8001)]}))
    assert cfg.services[0].health.url == "http://127.0.0.1:{port}/health"


@pytest.mark.parametrize(("doc", "expected"), [
    ({"service": [svc(health={"interval_s": 0})]}, "service[0].health.interval_s: must be > 0"),
    ({"service": [svc(), svc(name="b", health={"interval_s": -1})]},
     "service[1].health.interval_s: must be > 0"),
    ({"service": [svc(bogus=1)]}, "service[0].bogus: unknown key"),
    ({"supervisor": {"contrl_socket": "/x"}}, "supervisor.contrl_socket: unknown key"),
    ({"service": [svc(port="80")]}, "service[0].port: must be an integer, not a string"),
    ({"service": [svc(port=70000)]}, "service[0].port: must be <= 65535"),
    ({"service": [svc(port=True)]}, "service[0].port: must be an integer, not a boolean"),
    ({"service": [svc(command=[])]}, "service[0].command: must not be empty"),
    ({"service": [svc(command=["x", 1])]}, "service[0].command[1]: must be a string"),
    ({"service": [{"command": ["x"]}]}, "service[0].name: required key is missing"),
    ({"service": [svc(name="a b")]}, "service[0].name: must be"),
    ({"service": [svc(restart={"policy": "sometimes"})]},
     "service[0].restart.policy: must be one of always, on-failure, never"),
    ({"service": [svc(restart={"backoff_initial_s": 10, "backoff_max_s": 1})]},
     "service[0].restart.backoff_max_s: must be >= backoff_initial_s"),
    ({"service": [svc(stop={"signal": "SIGFOO"})]}, "service[0].stop.signal: unknown signal"),
    ({"service": [svc(stop={"signal": "KILL"})]}, "service[0].stop.signal: SIGKILL cannot"),
    ({"service": [svc(health={"timeout_s": float("nan")})]},
     "service[0].health.timeout_s: must be a finite number"),
    ({"service": [svc(command=["x", "{prot}"], port=1)]},
     "service[0].command[1]: unknown placeholder {prot}"),
    ({"service": [svc(command=["x", "{port}"])]},
     "service[0].command[1]: uses {port} but the service has no port"),
    ({"service": [svc(env={"A": 1})]}, "service[0].env.A: must be a string"),
    ({"service": [svc(env={"1A": "x"})]}, "service[0].env.1A: not a valid variable name"),
    ({"service": [svc(gpus=[-1])]}, "service[0].gpus[0]: must be a GPU index"),
    ({"service": [svc(gpus=[0, 0])]}, "service[0].gpus[1]: GPU 0 is listed twice"),
    ({"service": [svc(numa="near")]}, 'service[0].numa: must be "auto", "none" or a node'),
    ({"service": [svc(user="no-such-user-xyz")]}, "service[0].user: no such user"),
    ({"service": [svc(port=8001), svc(name="b", port=8001)]},
     "service[1].port: port 8001 is already used by service[0] (a)"),
    ({"metrics": {"listen": "127.0.0.1:9468"}, "service": [svc(port=9468)]},
     "service[0].port: port 9468 is already used by metrics.listen"),
    ({"service": [svc(), svc()]}, "service[1].name: 'a' is already used by service[0]"),
    ({"service": [svc(port=1, health={"interval_s": 1, "timeout_s": 2})]},
     "service[0].health.timeout_s: must be <= interval_s"),
    ({"metrics": {"listen": "localhost"}}, "metrics.listen: expected HOST:PORT"),
    ({"supervisor": {"control_socket": "relative.sock"}},
     "supervisor.control_socket: must be an absolute path"),
    ({"supervisor": {"log_format": "xml"}}, "supervisor.log_format: must be one of"),
    ({"supervisor": {"control_group": "no-such-group-xyz"}},
     "supervisor.control_group: no such group"),
    ({"gpu": {"backend": "cuda"}}, "gpu.backend: must be one of"),
    ({"gpu": {"backend": "sim"}}, 'gpu.sim: backend = "sim" needs at least one'),
    ({"gpu": {"backend": "sim", "sim": [{"uuid": "nope"}]}}, "gpu.sim[0].uuid: must look like"),
    ({"gpu": {"backend": "sim", "sim": sim_gpus(1) + sim_gpus(1)}},
     "gpu.sim[1].uuid: 'GPU-5a1e0000-0000-4000-8000-000000000000' is already used by gpu.sim[0]"),
    ({"gpu": {"backend": "none"}, "service": [svc(gpus=[0])]},
     'service[0].gpus: gpu.backend is "none"'),
    ({"thermal": {"warn_c": "slowdown-x"}}, "thermal.warn_c: must be a temperature"),
    ({"thermal": {"warn_c": "slowdown-2", "throttle_c": "slowdown-5"}},
     "thermal.throttle_c: must not be below warn_c"),
    ({"thermal": {"resume_c": "slowdown-1", "critical_c": "slowdown-3"}},
     "thermal.warn_c: must not be below resume_c"),
    ({"thermal": {"resume_c": 80, "critical_c": 70, "warn_c": 60, "throttle_c": 65}},
     "thermal.warn_c: must not be below resume_c"),
    # a GPU's shutdown is never below its slowdown: shutdown-2 > slowdown-4 everywhere
    ({"thermal": {"resume_c": "shutdown-2", "critical_c": "slowdown-4"}},
     "thermal.warn_c: must not be below resume_c"),
    ({"thermal": {"critical_c": "slowdown+5"}}, 'thermal.critical_c: write a relative'),
    ({"thermal": {"critical_c": "slowdown - 1"}}, 'thermal.critical_c: write a relative'),
    ({"thermal": {"critical_c": " slowdown-1"}}, 'thermal.critical_c: write a relative'),
    ({"power": {"ups": "nohost"}}, "power.ups: must look like"),
    ({"checkpoint": [{"name": "x", "kind": "http"}]}, "checkpoint[0].url: required key"),
    ({"checkpoint": [{"name": "x", "kind": "signal", "service": "zz"}]},
     "checkpoint[0].service: no service named 'zz'"),
    ({"service": [svc(gate={"listen": "127.0.0.1:9001", "backup": "zz"})]},
     "service[0].gate.backup: no service named 'zz'"),
    ({"service": "x"}, "service: must be an array of tables"),
    ({"service": [svc(health="yes")]}, "service[0].health: must be a table, not a string"),
])
def test_errors_name_the_key(doc: dict[str, Any], expected: str) -> None:
    found = problems(doc)
    assert any(p.startswith(expected) for p in found), found


def test_all_problems_reported_at_once() -> None:
    found = problems({"service": [svc(port=0, health={"url": "http://x/", "interval_s": 0},
                                      bogus=1)]})
    assert len(found) == 3, found


def test_syntax_error_gives_the_line() -> None:
    found = problems('[supervisor]\nstate_dir = "/x"\nbroken = = 1\n')
    assert len(found) == 1 and "line 3" in found[0] and found[0].startswith("cfg.toml:")


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'[supervisor]\nstate_dir = "\xff"\n')
    with pytest.raises(ConfigError, match="line 2: not valid UTF-8"):
        load_config(bad)


def test_value_parsers() -> None:
    assert str(parse_listen("[::1]:9468")) == "[::1]:9468"
    with pytest.raises(ValueError, match="port"):
        parse_listen("127.0.0.1:0")
    assert normalize_pci_bus_id("00000000:41:00.0") == "0000:41:00.0"
    assert normalize_pci_bus_id("41:00.0") == "0000:41:00.0"
    assert normalize_pci_bus_id("zz") is None
    assert Threshold("slowdown", -4).resolve(89, 95) == 85
    assert Threshold(None, 80).resolve(None, None) == 80


def test_config_is_frozen_and_comparable() -> None:
    a = parse_config(toml_dumps({"service": [svc(port=1)]}))
    b = parse_config(toml_dumps({"service": [svc(port=1)]}))
    assert a == b and isinstance(a, Config)
    with pytest.raises(AttributeError):
        a.services[0].port = 2  # type: ignore[misc]


# --- --check -------------------------------------------------------------------------------


def run_check(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = daemon_main(["--config", str(path), "--check"])
    return code, out.getvalue(), err.getvalue()


# a key path may hold quoted keys (`service[0]."a b": unknown key`)
_PATH = r'(?:[^\s"]|"(?:[^"\\]|\\.)*")+'
ERROR_LINE = re.compile(
    rf"^llm-supervisor: (config error: ({_PATH}: .+|\.\.\. and \d+ more errors?)"
    r"|gpu discovery: .+|.+: \d+ errors?)$"
)


def test_check_prints_the_plan(tmp_path: Path) -> None:
    doc = {"gpu": {"backend": "sim", "sim": sim_gpus(2)},
           "service": [svc(port=8001, gpus=[1], command=["/bin/sleep", "{port}"])]}
    path = tmp_path / "c.toml"
    path.write_text(toml_dumps(doc))
    code, out, err = run_check(path)
    assert code == 0, err
    assert "GPU1 GPU-5a1e0000-0000-4000-8000-000000000001" in out
    assert "command  /bin/sleep 8001" in out
    assert "numa     0 (cpus" in out


def test_check_unknown_gpu(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml_dumps({"gpu": {"backend": "sim", "sim": sim_gpus(1)},
                                "service": [svc(gpus=[3])]}))
    code, _out, err = run_check(path)
    assert code == 1
    assert "config error: service[0].gpus[0]: unknown GPU 3" in err
    assert all(ERROR_LINE.match(line) for line in err.splitlines()), err


def test_check_as_a_real_process(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[service]]\n")
    proc = subprocess.run([sys.executable, "-m", "supervisord_llm", "--config", str(path),
                           "--check"], capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "line 1" in proc.stderr


# --- hypothesis: arbitrary TOML documents -----------------------------------------------------

KEYS = ["supervisor", "metrics", "gpu", "thermal", "power", "checkpoint", "service", "health",
        "restart", "stop", "gate", "sim", "name", "command", "port", "gpus", "numa", "user",
        "env", "url", "interval_s", "timeout_s", "failures", "startup_timeout_s", "policy",
        "backoff_initial_s", "backoff_max_s", "max_restarts", "window_s", "signal", "listen",
        "backend", "uuid", "numa_node", "control_socket", "state_dir", "log_format",
        "control_group", "warn_c", "kind", "service", "done_file", "backup", "swap_port",
        "max_concurrency", "sim_state_file", "x", "é"]

scalars = st.one_of(
    st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["SIGTERM", "auto", "none", "sim", "{port}", "slowdown-4", "/tmp/x",
                     "127.0.0.1:9000", "GPU-1", "http://127.0.0.1:{port}/h", "on-failure"]),
    st.datetimes(min_value=dt.datetime(1970, 1, 1)),
)
def _nested(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # (a function, not a lambda: hypothesis reads a lambda's source to check that it uses
    # its argument, and under pytest-xdist that reading has failed with a warning)
    return st.one_of(st.lists(inner, max_size=4),
                     st.dictionaries(st.sampled_from(KEYS), inner, max_size=5))


values = st.recursive(scalars, _nested, max_leaves=20)
documents = st.dictionaries(st.sampled_from(KEYS), values, max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=documents)
def test_arbitrary_documents_never_traceback(doc: dict[str, Any]) -> None:
    try:
        text = toml_dumps(doc)
    except TypeError:
        return
    check_text(text)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_arbitrary_text_never_traceback(text: str) -> None:
    check_text(text)


def check_text(text: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.toml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        code, out, err = run_check(path)
    assert code in (0, 1), (code, err)
    if code == 1:
        lines = err.splitlines()
        assert lines, "exit 1 without a message"
        for line in lines:
            assert ERROR_LINE.match(line), line
    else:
        assert "ok" in out


# --- hostile files: size, kind, nesting, BOM, NUL, odd keys -----------------------------------


def one_line_problems(exc: ConfigError) -> list[str]:
    assert exc.problems, "a ConfigError without a problem"
    for p in exc.problems:
        assert len(p.splitlines()) == 1 and p == p.strip(), repr(p)
        assert len(p) <= MAX_MESSAGE_CHARS, len(p)
    return exc.problems


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    text = toml_dumps({"service": [svc(port=8001)]})
    assert parse_config("\ufeff" + text).services[0].port == 8001
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_config(path).services[0].port == 8001
    path.write_bytes(b"\xef\xbb\xbf" + b'[service]]\n')  # line numbers are not shifted
    with pytest.raises(ConfigError, match="line 1"):
        load_config(path)


def test_nul_characters_are_named() -> None:
    found = problems({"service": [svc(env={"A": "x\x00y"}, command=["a\x00"])]})
    assert "service[0].env.A: must not contain NUL characters" in found, found
    assert "service[0].command[0]: must not contain NUL characters" in found, found
    assert not any("not a string" in p for p in found), found


def test_cross_checks_run_alongside_field_errors() -> None:
    found = problems({"service": [
        {"name": "broken"},  # no command: not built, but its index and name still count
        svc(port=8001, health={"interval_s": 0}),
        svc(name="b", port=8001, gate={"listen": "127.0.0.1:9001", "backup": "zz"}),
        svc(name="b", restart={"policy": "x"}, gate={"listen": "127.0.0.1:9002",
                                                      "backup": "broken"}),
    ]})
    assert "service[0].command: required key is missing" in found, found
    assert any(p.startswith("service[1].health.interval_s: must be > 0") for p in found)
    assert "service[2].port: port 8001 is already used by service[1] (a)" in found, found
    assert "service[2].gate.backup: no service named 'zz'" in found, found
    assert "service[3].name: 'b' is already used by service[2]" in found, found
    assert any(p.startswith("service[3].restart.policy") for p in found)
    assert not any(p.startswith("service[3].gate.backup") for p in found), found
    # a field with a problem of its own is not checked again across fields
    found = problems({"metrics": {"listen": "nope"}, "service": [svc(port=9468)]})
    assert found == ["metrics.listen: expected HOST:PORT, got 'nope'"], found


def test_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    body = toml_dumps({"service": [svc()]}).encode()
    path.write_bytes(body + b"#" * (MAX_CONFIG_BYTES - len(body) - 1) + b"\n")
    assert load_config(path).services[0].name == "a"  # exactly the limit: fine
    path.write_bytes(body + b"#" * (MAX_CONFIG_BYTES - len(body)) + b"\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert one_line_problems(info.value) == [f"{path}: larger than 1 MB (1048576 bytes), "
                                             "the limit for a config file"]


def test_only_regular_files_are_read(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # nobody writes: a plain open() would block forever
    with pytest.raises(ConfigError, match=r"is a FIFO \(named pipe\), not a regular file"):
        load_config(fifo)
    with pytest.raises(ConfigError, match="is a character device, not a regular file"):
        load_config("/dev/zero")
    link = tmp_path / "zero.toml"
    link.symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match="is a character device"):
        load_config(link)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "s.toml"))
        with pytest.raises(ConfigError, match="is a socket, not a regular file"):
            load_config(tmp_path / "s.toml")


@pytest.mark.parametrize("text", [
    "a = " + "[" * 600 + "]" * 600,
    "a = " + "{b = " * 600 + "1" + "}" * 600,
    "a = " + "[" * 100_000,
])
def test_deep_nesting_is_one_line(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "deep.toml")
    assert len(one_line_problems(info.value)) == 1


def test_huge_values_and_odd_keys_give_short_lines() -> None:
    deep = "service.numa" + ".a" * 20_000 + " = 1\n"  # a deeply nested table, no recursion
    for text in (
        toml_dumps({"service": [svc(name="x y" * 200_000)]}),
        toml_dumps({"service": [svc(gpus=[[[[[[[[[["x" * 100_000]]]]]]]]]])]}),
        '"a\\nb\\u2028c\\u0085" = 1\n' + '"' + "k" * 5000 + '" = 2\n',
        "[[service]]\nname = 'a'\ncommand = ['x']\n" + deep.replace("service.", ""),
        "[[service]]\nname = 'a'\ncommand = ['x']\n"
        + "gpus = " + "[" * 300 + "]" * 300 + "\n",
    ):
        with pytest.raises(ConfigError) as info:
            parse_config(text, "odd.toml")
        one_line_problems(info.value)
    found = problems('"a b" = 1\n"x\\ny" = 2\n')
    assert found == ['"a b": unknown key', '"x\\ny": unknown key'], found


def test_check_is_short_for_hostile_files(tmp_path: Path) -> None:
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 600 + "]" * 600 + "\n")
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    for path in (deep, fifo, Path("/dev/zero")):
        code, out, err = run_check(path)
        assert code == 1 and not out
        lines = err.splitlines()
        assert len(lines) == 2 and all(ERROR_LINE.match(line) for line in lines), err


# --- fuzz: any bytes at all give a Config or a one-line ConfigError ---------------------------

_fragments = st.one_of(
    st.sampled_from([
        "[[service]]\n", "name = 'a'\n", "command = ['x', '{port}']\n", "port = 8001\n",
        "[service.health]\n", "interval_s = 0\n", "[gpu]\n", "backend = 'sim'\n",
        "[[gpu.sim]]\n", "uuid = 'GPU-1'\n", "env = { A = \"x\\u0000y\" }\n", "a.b.c = 1\n",
        "\ufeff", "\x00", "\r\n", "'''", '"""', "[", "]", "{", "}", "=", "#", "\\",
    ]),
    st.integers(min_value=1, max_value=1500).map(lambda n: "x = " + "[" * n + "]" * n + "\n"),
    st.integers(min_value=1, max_value=1500).map(
        lambda n: "x = " + "{a = " * n + "1" + "}" * n + "\n"),
    st.integers(min_value=1, max_value=3000).map(lambda n: "x" + ".a" * n + " = 1\n"),
    st.integers(min_value=0, max_value=300_000).map(lambda n: f"name = '{'n' * n}'\n"),
    st.text(max_size=30),
)
_fuzz_bytes = st.one_of(
    st.binary(max_size=400),
    st.lists(_fragments, max_size=12).map(lambda xs: "".join(xs).encode("utf-8",
                                                                        "surrogatepass")),
    st.tuples(st.sampled_from([b"", b"\xef\xbb\xbf", b"\xef\xbb\xbf\xef\xbb\xbf", b"\xff\xfe"]),
              st.lists(_fragments, max_size=8), st.binary(max_size=20)).map(
        lambda t: t[0] + "".join(t[1]).encode("utf-8", "surrogatepass") + t[2]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=_fuzz_bytes)
def test_fuzz_config_reader(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "c.toml"
    path.write_bytes(data)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        one_line_problems(exc)
    else:
        assert isinstance(cfg, Config)


def test_power_keys_and_the_nut_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    base = {"service": [svc()]}
    cfg = parse_config(toml_dumps({**base, "power": {"ups": "ups@[::1]:3494",
                                                     "on_battery_power_fraction": 0.7}}),
                       "cfg.toml")
    assert cfg.power.source == "nut" and cfg.power.host_port == ("ups", "::1", 3494)
    assert cfg.power.on_battery_power_fraction == 0.7
    assert PowerSection(ups="u@nas.lan").host_port == ("u", "nas.lan", 3493)
    # the password: never in the config; from a file, or the systemd credential
    out = problems({**base, "power": {"username": "mon", "password": "secret"}})
    assert any("power.password: a password is never written in the config" in p for p in out)
    assert not any("secret" in p for p in out)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert any("power.username: needs a password" in p
               for p in problems({**base, "power": {"username": "mon"}}))
    pw = tmp_path / "pw"
    pw.write_text("s3cret\nignored\n")
    cfg = parse_config(toml_dumps({**base, "power": {"username": "mon",
                                                     "password_file": str(pw)}}), "cfg.toml")
    assert cfg.power.password == "s3cret" and "s3cret" not in repr(cfg)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "nut-password").write_text("fromcred")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = parse_config(toml_dumps({**base, "power": {"username": "mon"}}), "cfg.toml")
    assert cfg.power.password == "fromcred"
    for bad, expect in [
        ({"username": "mon", "password_file": str(tmp_path / "nope")},
         "power.password_file: cannot read the NUT password"),
        ({"username": "mon", "password_file": str(tmp_path)},
         "power.password_file: cannot read the NUT password"),
        ({"username": "mon", "password_file": "pw"}, "must be an absolute path"),
        ({"password_file": str(pw)}, "power.password_file: needs username"),
        ({"username": "two words"}, "power.username: must be 1-64 printable"),
        ({"on_battery_power_fraction": 0}, "power.on_battery_power_fraction: must be > 0"),
        ({"on_battery_power_fraction": 1.5}, "power.on_battery_power_fraction: must be <= 1"),
        ({"ups": "ups@host:99999"}, "power.ups: must look like"),
        ({"ups": "ups@host:x"}, "power.ups: must look like"),
        ({"ups": "ups@[::1:3493"}, "power.ups: must look like"),
        ({"poll_interval_s": 0.01}, "power.poll_interval_s: must be >= 0.1"),
        ({"shutdown_command": [""]}, "power.shutdown_command: the program"),
        ({"shutdown_command": [" ", "x"]}, "power.shutdown_command: the program"),
        ({"ups": "ups@[::1]x"}, "power.ups: must look like"),
        ({"ups": "ups@:3493"}, "power.ups: must look like"),
        ({"ups": "ups@127.0.0.1:3493:1"}, "power.ups: must look like"),
        ({"ups": "ups@host:"}, "power.ups: must look like"),
        ({"ups": "ups@h:0"}, "power.ups: must look like"),
    ]:
        out = problems({**base, "power": bad})
        assert any(expect in p for p in out), (bad, out)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    out = problems({**base, "power": {"username": "mon", "password_file": str(empty)}})
    assert any("the password must be the first line" in p for p in out)


@pytest.mark.parametrize(("cp", "expect"), [
    ({"kind": "http", "url": "http:///x"}, "checkpoint[0].url: not a usable URL (no host)"),
    ({"kind": "http", "url": "http://h:99999/x"}, "checkpoint[0].url: not a usable URL"),
    ({"kind": "command", "command": [""]}, "checkpoint[0].command: the program"),
    ({"kind": "command", "command": []}, "checkpoint[0].command: must not be empty"),
    ({"kind": "command", "command": ["sh\x00"]}, "checkpoint[0].command[0]: must not contain"),
    ({"kind": "http", "url": "http://h/a b"}, "checkpoint[0].url: not a usable URL (spaces"),
    ({"kind": "http", "url": "http://h:0/"}, "checkpoint[0].url: not a usable URL (port 0)"),
    ({"kind": "signal", "service": "a", "signal": "SIGKILL"},
     "checkpoint[0].signal: SIGKILL cannot be caught"),
    ({"kind": "signal", "service": "a", "signal": "SIGSTOP"},
     "checkpoint[0].signal: SIGSTOP cannot be caught"),
])
def test_checkpoint_hooks_that_cannot_work_are_refused(cp: dict[str, Any], expect: str) -> None:
    out = problems({"service": [svc()], "checkpoint": [{"name": "x", **cp}]})
    assert any(expect in p for p in out), out


def test_probe_metrics_url_and_stall_timeout() -> None:
    cfg = parse_config(toml_dumps({"service": [svc(port=8080, probe={"kind": "completion"},
                                                   gate={"listen": "127.0.0.1:9000"})]}),
                       "cfg.toml")
    s = cfg.services[0]
    assert s.probe == ProbeSection() and s.metrics_url == "http://127.0.0.1:{port}/metrics"
    assert s.gate is not None and s.gate.stall_timeout_s == 300.0
    assert parse_config(toml_dumps({"service": [svc(metrics_url="")]}),
                        "cfg.toml").services[0].metrics_url is None
    assert parse_config(toml_dumps({"service": [svc()]}), "cfg.toml").services[0].probe is None
    for bad, expect in [
        (svc(probe={"kind": "completion"}), "service[0].probe: a generation probe needs"),
        (svc(port=1, probe={}), "service[0].probe.kind: required key is missing"),
        (svc(port=1, probe={"kind": "ping"}), "service[0].probe.kind: must be one of"),
        (svc(port=1, probe={"kind": "completion", "failures": 0}), "probe.failures: must be"),
        (svc(port=1, probe={"kind": "completion", "endpoint": "x"}), "probe.endpoint: must"),
        (svc(port=1, probe={"kind": "completion", "model": "a\nb"}), "probe.model: must be"),
        (svc(port=1, metrics_url="ftp://x"), "service[0].metrics_url: must be an http://"),
        (svc(metrics_url="http://h:{port}/m"), "service[0].metrics_url"),
        (svc(port=1, metrics_url="http://[::1/m"), "metrics_url: not a usable URL (Invalid IPv6"),
        (svc(port=1, health={"url": "http://[::1"}),
         "service[0].health.url: not a usable URL (Invalid IPv6 URL)"),
        (svc(port=1, health={"url": "http:///h"}), "health.url: not a usable URL (no host)"),
        (svc(port=1, health={"url": "http://h/a b"}), "health.url: not a usable URL (spaces"),
        (svc(port=1, gate={"listen": "127.0.0.1:9", "stall_timeout_s": 0}),
         "gate.stall_timeout_s: must be >= 1"),
    ]:
        out = problems({"service": [bad]})
        assert any(expect in p for p in out), (bad, out)


def test_an_empty_program_is_refused() -> None:
    for command in ([""], [" "], ["", "x"]):
        out = problems({"service": [svc(command=command)]})
        assert any("service[0].command: the program" in p for p in out), (command, out)


# --- hostile values: integers too long to read, non-finite numbers, wrong types, odd paths ---

SIM0 = "GPU-5a1e0000-0000-4000-8000-000000000000"
# every key of every section, valid; the comparisons inside a section are tight (equal), so
# that a default standing in for a bad value would break them
FULL: dict[str, Any] = {
    "supervisor": {"control_socket": "/nonexistent/llm-supervisor-test/c.sock",
                   "state_dir": "/nonexistent/llm-supervisor-test/state", "log_format": "text"},
    "metrics": {"listen": "127.0.0.1:19468"},
    "gpu": {"backend": "sim", "poll_interval_s": 1.0, "call_timeout_s": 2.0,
            "health_interval_s": 10, "sim_state_file": "/nonexistent/sim.json",
            "sim": [{"uuid": SIM0, "name": "g", "pci_bus_id": "00000000:41:00.0",
                     "numa_node": 0, "vendor": "nvidia", "memory_total_bytes": 2**34,
                     "default_power_limit_w": 200, "min_power_limit_w": 200,
                     "max_power_limit_w": 200, "slowdown_c": 100, "shutdown_c": 100}]},
    "thermal": {"warn_c": "slowdown-5", "throttle_c": "slowdown-5", "critical_c": "slowdown-5",
                "resume_c": "slowdown-5", "power_step": 0.1, "min_power_fraction": 0.5,
                "step_interval_s": 5, "on_critical": "stop", "pause_timeout_s": 300},
    "power": {"source": "nut", "ups": "ups@127.0.0.1:3493", "poll_interval_s": 2.0,
              "on_battery_grace_s": 20, "low_runtime_s": 300, "low_charge_pct": 20,
              "deadtime_s": 15, "drain_timeout_s": 60, "stop_timeout_s": 30,
              "shutdown_command": ["/bin/true"], "restart_on_power_return": True,
              "on_battery_power_fraction": 0.6},
    "router": {"listen": "127.0.0.1:19000", "header_timeout_s": 30, "body_timeout_s": 60,
               "send_timeout_s": 120, "max_connections": 100, "max_body_bytes": 1 << 20},
    "checkpoint": [
        {"name": "h", "kind": "http", "url": "http://127.0.0.1:8100/c", "timeout_s": 30},
        {"name": "s", "kind": "signal", "service": "b", "signal": "SIGUSR1",
         "done_file": "/nonexistent/d", "timeout_s": 3},
        {"name": "c", "kind": "command", "command": ["/bin/true"]}],
    "service": [
        {"name": "a", "command": ["/bin/x", "{port}"], "port": 18001, "gpus": [0],
         "numa": "auto", "env": {"A": "{port}"}, "models": ["m1"], "start": "always",
         "vram_gb": 10, "exclusive": False, "metrics_url": "http://127.0.0.1:{port}/metrics",
         "health": {"url": "http://127.0.0.1:{port}/health", "interval_s": 2, "timeout_s": 2,
                    "failures": 3, "startup_timeout_s": 900},
         "restart": {"policy": "always", "backoff_initial_s": 400, "backoff_max_s": 400,
                     "max_restarts": 10, "window_s": 600},
         "stop": {"signal": "SIGTERM", "timeout_s": 30},
         "gate": {"listen": "127.0.0.1:19001", "max_concurrency": 4, "max_queue": 8,
                  "backup": "b", "swap_port": 18101, "queue_timeout_s": 30,
                  "header_timeout_s": 30, "body_timeout_s": 60, "send_timeout_s": 120,
                  "max_connections": 100, "drain_timeout_s": 60, "stall_timeout_s": 300},
         "probe": {"kind": "completion", "interval_s": 30, "timeout_s": 20, "failures": 3,
                   "model": "m1", "endpoint": "chat"}},
        {"name": "b", "command": ["/bin/y"], "port": 18002, "start": "on-demand",
         "idle_stop_s": 60, "models": ["m2"]},
    ],
}
# the same without GPUs: what only a sim backend allows is absent
NO_GPU: dict[str, Any] = {
    **FULL, "gpu": {"backend": "none"},
    "service": [{k: v for k, v in FULL["service"][0].items() if k not in ("gpus", "vram_gb")},
                FULL["service"][1]],
}
Path_ = tuple[str | int, ...]
# optional keys the documents above leave out, with a value of their kind
ABSENT: dict[Path_, Any] = {
    ("supervisor", "control_group"): "", ("service", 0, "user"): "", ("service", 1, "numa"): 0,
    ("power", "username"): "", ("power", "password_file"): "", ("gpu", "sysfs_root"): "",
    ("service", 1, "gate"): {}, ("service", 1, "health"): {}, ("service", 0, "bogus"): 0,
}


def key_paths(node: Any, prefix: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    """Every key of a document, with its value (a table in an array counts as a key)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*prefix, k), v
            yield from key_paths(v, (*prefix, k))
    elif isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
        for i, v in enumerate(node):
            yield (*prefix, i), v
            yield from key_paths(v, (*prefix, i))


def path_text(path: Path_) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def put(doc: dict[str, Any], path: Path_, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    node: Any = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return doc


def build_problems(doc: dict[str, Any]) -> list[str]:
    try:
        build_config(doc, "cfg.toml")
    except ConfigError as exc:
        return one_line_problems(exc)
    return []


def test_the_full_documents_are_valid() -> None:
    assert build_problems(FULL) == [] and build_problems(NO_GPU) == []


def _wrong_type_cases() -> Iterator[tuple[str, dict[str, Any], Path_, Any]]:
    wrong = [dt.date(1979, 5, 27), dt.time(7, 32), dt.datetime(1979, 5, 27, 7, 32),
             dt.datetime(1979, 5, 27, 7, 32, tzinfo=dt.UTC), {"x": 1}, [dt.date(1979, 1, 1)]]
    for name, base in (("full", FULL), ("no-gpu", NO_GPU)):
        for path, orig in [*key_paths(base), *ABSENT.items()]:
            for value in wrong:
                if isinstance(value, type(orig)) and isinstance(value, (dict, list)):
                    continue  # a table for a table, an array for an array: not a wrong type
                yield name, base, path, value


@pytest.mark.parametrize(("base", "path", "value"), [
    pytest.param(base, path, value, id=f"{name}:{path_text(path)}={type(value).__name__}")
    for name, base, path, value in _wrong_type_cases()])
def test_a_wrong_type_in_any_key_is_one_error_for_that_key(
        base: dict[str, Any], path: Path_, value: Any) -> None:
    """A date, a time, a table or an array where something else goes, in any key: exactly one
    error, for that key; nothing that depends on it (a default standing in for it) follows."""
    found = build_problems(put(base, path, value))
    where = path_text(path)
    assert len(found) == 1 and found[0].startswith((f"{where}: ", f"{where}[")), found


def test_a_date_as_a_port_is_one_error() -> None:
    found = problems("[[service]]\nname = 'a'\ncommand = ['x', '{port}']\n"
                     "port = 1979-05-27\n[service.probe]\nkind = 'completion'\n")
    assert found == ["service[0].port: must be an integer, not a date"], found


def _numeric_keys() -> Iterator[Path_]:
    for path, orig in key_paths(FULL):
        if isinstance(orig, (int, float)) and not isinstance(orig, bool):
            yield path
    yield from [("thermal", "warn_c"), ("thermal", "resume_c"), ("service", 1, "numa")]


@pytest.mark.parametrize("path", [pytest.param(p, id=path_text(p)) for p in _numeric_keys()])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1e308, -1e308, 10**400,
                                   -(10**400), 16**5000],
                         ids=["inf", "-inf", "nan", "1e308", "-1e308", "10^400", "-10^400",
                              "16^5000"])
def test_huge_and_non_finite_numbers_in_every_numeric_key(path: Path_, value: Any) -> None:
    """No crash (OverflowError, ValueError of str()), one short error naming the key; an
    integer too long to print is described by its size."""
    found = build_problems(put(FULL, path, value))
    where = path_text(path)
    assert len(found) == 1 and found[0].startswith(f"{where}: "), found
    if value == 16**5000:
        assert "an integer of about 6021 digits" in found[0], found


def test_an_integer_too_long_to_read_names_the_key_and_the_line(tmp_path: Path) -> None:
    digits = "1" * 4301
    path = tmp_path / "c.toml"
    path.write_text(f"[[service]]\nname = 'a'\ncommand = ['x']\nport = {digits}\n")
    code, out, err = run_check(path)
    assert code == 1 and not out, err
    assert err.splitlines()[0] == ("llm-supervisor: config error: service[0].port: line 4: an "
                                   "integer of 4301 digits is too large (at most 4300 digits)")
    assert all(ERROR_LINE.match(line) for line in err.splitlines()), err
    # start: the same, exit 1 (not an internal error, exit 2)
    r = subprocess.run([sys.executable, "-m", "supervisord_llm", "--config", str(path)],
                       capture_output=True, text=True, check=False, timeout=60)
    assert r.returncode == 1 and "service[0].port: line 4: an integer" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1
    # in an inline table, in an array over two lines, with underscores, negative, and one in
    # a string or a comment that is not an integer at all
    found = problems(f"# {digits}\n[[service]]\nname = '{digits}'\ncommand = ['x']\n"
                     f"env = {{ A = 'x', B = -{digits} }}\ngpus = [0,\n  {'1_' * 4400}1]\n")
    assert found == [
        "service[0].env.B: line 5: an integer of 4301 digits is too large (at most 4300 "
        "digits)",
        "service[0].gpus[1]: line 7: an integer of 4401 digits is too large (at most 4300 "
        "digits)"], found
    # a syntax error after it: the line still
    found = problems(f"x = {digits}\n[service]]\n")
    assert found == ["cfg.toml: line 1: an integer of 4301 digits is too large (at most 4300 "
                     "digits)"], found
    # written in hex it can be read, and is judged like any other value
    found = problems(f"[[service]]\nname = 'a'\ncommand = ['x']\nport = 0x{'f' * 5000}\n")
    assert found == ["service[0].port: must be <= 65535 (got an integer of about 6021 "
                     "digits)"], found


@pytest.mark.parametrize("text", ["", "\n\n  \n", "# only\n# comments\n", "\ufeff# bom\n"])
def test_an_empty_config_is_refused_at_start_check_and_reload(tmp_path: Path, text: str
                                                              ) -> None:
    """One rule: a file with no settings at all is refused by --check, at start (exit 1) and
    by a reload, whatever runs (it used to start, then be refused on reload)."""
    from supervisord_llm import daemon as daemon_mod
    from supervisord_llm.errors import ControlError

    path = tmp_path / "c.toml"
    path.write_text(text)
    expect = f"{path}: no settings at all (no [[service]], no section"
    code, out, err = run_check(path)
    assert code == 1 and not out and expect in err, err
    r = subprocess.run([sys.executable, "-m", "supervisord_llm", "--config", str(path)],
                       capture_output=True, text=True, check=False, timeout=60)
    assert r.returncode == 1 and expect in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    dm = daemon_mod.Daemon(str(path), daemon_mod.Overrides())
    with pytest.raises(ControlError) as info:
        asyncio.run(dm._load_for_reload())
    assert info.value.code == "config_error" and expect in info.value.message
    # a section, even empty, is a config (without services: the GPUs watched)
    path.write_text(text + "[gpu]\nbackend = 'none'\n")
    assert run_check(path)[0] == 0


def test_a_state_dir_that_is_not_a_directory_is_a_config_error(tmp_path: Path) -> None:
    """--check can tell, so it is a configuration error (exit 1) at --check and at start,
    for the key and for --state-dir; one that cannot be created for want of permission is
    left to the start (exit 2)."""
    from supervisord_llm.daemon import lock_state_dir
    from supervisord_llm.errors import StartupError

    plain = tmp_path / "file"
    plain.write_text("")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    cases = [(fifo, f"'{fifo}' exists and is not a directory: it is a FIFO (named pipe)"),
             (plain, f"'{plain}' exists and is not a directory: it is a regular file"),
             (plain / "sub", f"'{plain}', above it, exists and is not a directory: it is a "
                             "regular file"),
             (dangling, f"'{dangling}' is a symbolic link to nothing")]
    path = tmp_path / "c.toml"
    for state_dir, why in cases:
        path.write_text(toml_dumps({"supervisor": {"state_dir": str(state_dir)},
                                    "gpu": {"backend": "none"}}))
        code, _out, err = run_check(path)
        assert code == 1 and f"config error: supervisor.state_dir: {why}\n" in err, err
        r = subprocess.run([sys.executable, "-m", "supervisord_llm", "--config", str(path)],
                           capture_output=True, text=True, check=False, timeout=60)
        assert r.returncode == 1, r.stderr
        assert r.stderr == f"<3>llm-supervisor: config error: supervisor.state_dir: {why}\n"
        path.write_text(toml_dumps({"gpu": {"backend": "none"}}))
        code, _out, err = run_check_with(path, "--state-dir", str(state_dir))
        assert code == 1 and f"config error: --state-dir: {why}\n" in err, err
        # made so after the config was read: the start says the same (exit 2: a race)
        with pytest.raises(StartupError, match=r"exists and is not a directory|to nothing"):
            lock_state_dir(str(state_dir))
    assert fifo.exists() and plain.read_text() == ""  # nothing was written
    # the control socket's directory by the same rule, and a path too long for the system
    path.write_text(toml_dumps({"supervisor": {"control_socket": str(plain / "ctl.sock")},
                                "gpu": {"backend": "none"}}))
    code, _out, err = run_check(path)
    assert code == 1 and (f"config error: supervisor.control_socket: its directory cannot be "
                          f"made: '{plain}' exists and is not a directory") in err, err
    path.write_text(toml_dumps({"gpu": {"backend": "none"}}))
    code, _out, err = run_check_with(path, "--control-socket", str(plain / "ctl.sock"))
    assert code == 1 and "config error: --control-socket: its directory cannot be made" in err
    path.write_text(toml_dumps({"supervisor": {"state_dir": str(tmp_path / ("x" * 300))},
                                "gpu": {"backend": "none"}}))
    code, _out, err = run_check(path)
    assert code == 1 and "supervisor.state_dir: " in err and "the path is too long" in err


def run_check_with(path: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = daemon_main(["--config", str(path), "--check", *args])
    return code, out.getvalue(), err.getvalue()


def test_listen_addresses_one_rule_for_check_and_start() -> None:
    """An IPv4-mapped IPv6 address is its IPv4 address (binding the mapped form fails); a
    bracket holds an IPv6 address, a host without one an IPv4 address or a name: what --check
    accepts, every listener binds."""
    assert parse_listen("[::ffff:127.0.0.1]:9468") == Listen("127.0.0.1", 9468)
    assert parse_listen("[::FFFF:7f00:1]:9468") == Listen("127.0.0.1", 9468)
    assert parse_listen("[::1]:9468") == Listen("::1", 9468)
    assert parse_listen("localhost:1") == Listen("localhost", 1)
    mapped = "[::ffff:127.0.0.1]:{}"
    doc = {"metrics": {"listen": mapped.format(19468)}, "router": {"listen": mapped.format(19000)},
           "service": [svc(port=18001, gate={"listen": mapped.format(19001)})]}
    cfg = parse_config(toml_dumps(doc))
    gate = cfg.services[0].gate
    assert cfg.metrics.listen == Listen("127.0.0.1", 19468)
    assert cfg.router is not None and cfg.router.listen == Listen("127.0.0.1", 19000)
    assert gate is not None and gate.listen == Listen("127.0.0.1", 19001)
    for text, why in [("[zzz]:1", "takes an IPv6 address, not 'zzz'"),
                      ("[127.0.0.1]:1", "takes an IPv6 address, not '127.0.0.1'"),
                      ("a b:1", "must be an IPv4 address or a host name, not 'a b'"),
                      ("999.1.1.1:1", "must be an IPv4 address or a host name"),
                      ("127.0.0.1:\u0663\u0663", "port must be 1-65535"),
                      ("127.0.0.1:" + "9" * 5000, "port must be 1-65535")]:
        cases: list[tuple[str, dict[str, Any]]] = [
            ("metrics.listen", {"metrics": {"listen": text}}),
            ("router.listen", {"router": {"listen": text}}),
            ("service[0].gate.listen", {"service": [svc(port=18001, gate={"listen": text})]})]
        for key, bad in cases:
            found = problems(bad)
            assert len(found) == 1 and found[0].startswith(f"{key}: ") and why in found[0], found


# --- hypothesis: random TOML values in random keys of a full document -----------------------

toml_values = st.recursive(
    st.one_of(
        st.sampled_from([math.inf, -math.inf, math.nan, 1e308, 10**400, -(10**400), 2**64]),
        st.booleans(), st.integers(), st.integers(min_value=-(10**400), max_value=10**400),
        st.floats(), st.text(max_size=12),
        st.sampled_from(["", "auto", "none", "sim", "{port}", "{nope}", "slowdown-4", "/tmp/x",
                         "127.0.0.1:9000", "[::ffff:127.0.0.1]:1", "b", "GPU-1", "SIGKILL",
                         "on-demand", "http://127.0.0.1:{port}/h", "0000:41:00.0"]),
        st.dates(), st.times(), st.datetimes(min_value=dt.datetime(1, 1, 2)),
        st.datetimes(min_value=dt.datetime(1, 1, 2), timezones=st.just(dt.UTC)),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["x", "name", "listen", "kind",
                                                             "port", "url"]),
                                            inner, max_size=3)),
    max_leaves=8,
)
ALL_KEYS = sorted({p for p, _ in key_paths(FULL)} | set(ABSENT), key=path_text)


def _disjoint(paths: list[Path_]) -> bool:
    return not any(i != j and b[:len(a)] == a
                   for i, a in enumerate(paths) for j, b in enumerate(paths))


mutations = st.lists(st.tuples(st.sampled_from(ALL_KEYS), toml_values), min_size=1,
                     max_size=3).filter(lambda m: _disjoint([p for p, _ in m]))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(changes=mutations)
@example(changes=[(("thermal", "warn_c"), 10**400)])  # an OverflowError, exit 2, once
@example(changes=[(("service", 0, "gpus"), [2**64]), (("gpu", "sim", 0, "numa_node"), math.nan)])
def test_random_values_in_random_keys_give_exit_0_or_1(changes: list[tuple[Path_, Any]]
                                                       ) -> None:
    """Any TOML values in any keys of a full config, through --check: exit 0, or exit 1 with
    one line per problem naming a key; never a traceback or an internal error (exit 2)."""
    import tempfile

    doc = FULL
    for path, value in changes:
        doc = put(doc, path, value)
    with tempfile.TemporaryDirectory() as d:
        file = Path(d) / "c.toml"
        file.write_text(toml_dumps(doc))
        code, out, err = run_check(file)
    assert code in (0, 1), err
    assert all(ERROR_LINE.match(line) for line in err.splitlines()), err
    assert (code == 0) == ("ok" in out) and "Traceback" not in err


wrong_values = st.one_of(
    st.dates(), st.times(), st.datetimes(min_value=dt.datetime(1, 1, 2)),
    st.datetimes(min_value=dt.datetime(1, 1, 2), timezones=st.just(dt.UTC)))
KIND_KEYS = ("url", "command", "service", "signal", "done_file")  # a checkpoint's, by kind
wrong_changes = st.lists(st.tuples(st.sampled_from(ALL_KEYS), wrong_values), min_size=1,
                         max_size=4).filter(lambda m: _disjoint([p for p, _ in m]))


@settings(max_examples=200, deadline=None)
@given(changes=wrong_changes)
def test_dates_and_times_in_random_keys_are_one_error_each(
        changes: list[tuple[Path_, Any]]) -> None:
    """Several keys of the wrong type at once (no key takes a date or a time): one error for
    each of them, and nothing else; but a checkpoint's keys that go with its `kind` are not
    judged when the kind itself is wrong (docs/configuration.md: checks that depend on a
    wrong key's value are skipped)."""
    doc = FULL
    for path, value in changes:
        doc = put(doc, path, value)
    found = build_problems(doc)
    keys = sorted(p.split(": ", 1)[0] for p in found)
    paths = [p for p, _ in changes]
    expected = [p for p in paths if not (
        len(p) == 3 and p[0] == "checkpoint" and p[2] in KIND_KEYS
        and ("checkpoint", p[1], "kind") in paths)]
    assert keys == sorted(path_text(p) for p in expected), found
