"""Configuration: every check names its key by path; --check never shows a traceback."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import ROOT, sim_gpus, toml_dumps
from supervisord_llm.cli import daemon_main
from supervisord_llm.config import (
    Config,
    Threshold,
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


ERROR_LINE = re.compile(
    r"^llm-supervisor: (config error: (\S+: .+|\S+: TOML syntax error: .+)|.+: \d+ errors?)$"
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
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
    max_leaves=20,
)
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
