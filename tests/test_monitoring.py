"""The monitoring assets against what a running daemon really exports: docs/prometheus/
alerts.yml (`promtool check rules`, `promtool test rules` on alerts.test.yml, whose input
series must be series the daemon exports, names and label names alike) and the Grafana
dashboard docs/grafana/llm-supervisor.json (every query parses, and names only series the
daemon exports). The daemon runs with simulated GPUs, a gate, the router with an on-demand
model, a real upsd and a checkpoint, so that every family has samples. And with
`[power] source = "none"`: the UPS series follow `llmctl power-event`, and a real Prometheus
with alerts.yml fires the power alerts on them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nutserver import NutServer, nut_missing
from prometheus_client.parser import text_string_to_metric_families
from promserver import PromServer, prometheus_missing

from helpers import base_config, fake_service, free_port, running, wait_until
from supervisord_llm.keys import ApiKey, hash_secret, write_keys

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "docs" / "prometheus"
DASHBOARD = ROOT / "docs" / "grafana" / "llm-supervisor.json"
PROMTOOL = shutil.which("promtool")
NAME_RE = re.compile(r"\bllm_supervisor_[a-z_]+\b")
SERIES_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}$")
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
SCRAPE_LABELS = {"instance", "job"}  # what Prometheus adds at scrape time
# labels whose values the daemon enumerates (every value has a series, 0 or 1)
ENUMERATED = {"state", "reason", "mode", "kind", "flag"}

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed "
                                "(scripts/setup.sh installs the prometheus package)")


Scrape = dict[str, dict[str, Any]]  # family -> {"labels": {names}, "values": {name: {values}}}


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scrape]:
    if (why := nut_missing()) is not None:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("monitoring")
    with NutServer(tmp / "nut") as ups:
        chat = fake_service("chat", free_port(), gpus=[0],
                            gate={"listen": f"127.0.0.1:{free_port()}"}, metrics_url="")
        lazy = fake_service("lazy", free_port(), gpus=[1], start="on-demand", vram_gb=1,
                            metrics_url="")
        rport = free_port()
        write_keys(str(tmp / "keys.toml"), (ApiKey("ops", hash_secret("sk-ops")),), None)
        doc = base_config(tmp, [chat, lazy], gpus=2, router={"listen": f"127.0.0.1:{rport}"},
                          auth={"keys_file": str(tmp / "keys.toml")},
                          audit={"path": str(tmp / "audit.log")},
                          power={"source": "nut", "ups": ups.ups, "poll_interval_s": 0.2},
                          checkpoint=[{"name": "rag-store", "kind": "command",
                                       "command": ["/bin/true"]}])
        with running(tmp, doc) as d:
            d.wait_state("chat", "ready")
            req = urllib.request.Request(
                f"http://127.0.0.1:{rport}/v1/chat/completions",
                json.dumps({"model": "lazy", "messages": [], "stream": True}).encode(),
                {"Content-Type": "application/json", "Authorization": "Bearer sk-ops"})
            wait_until(lambda: _answers(req), 15, what="the router loads lazy")
            req.remove_header("Authorization")
            assert not _answers(req)  # 401: a rejection, under key "-"
            assert d.llmctl("checkpoint").returncode == 0
            wait_until(lambda: d.status()["power"]["state"] == "online", 10)
            listen = doc["metrics"]["listen"]
            with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as resp:
                text = resp.read().decode()
    families: Scrape = {}
    for fam in text_string_to_metric_families(text):
        entry = families.setdefault(fam.name, {"labels": set(), "values": {}, "samples": set()})
        for sample in fam.samples:
            entry["samples"].add(sample.name)
            entry["labels"] |= set(sample.labels) - {"le", "quantile"}
            for k, v in sample.labels.items():
                entry["values"].setdefault(k, set()).add(v)
    yield families


def _answers(req: urllib.request.Request) -> bool:
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
            resp.read()
            return bool(resp.status == 200)
    except OSError:
        return False


def family_of(name: str, scrape: Scrape) -> str | None:
    """The family a sample name belongs to (`_total`, `_bucket`, `_sum`, `_count` off)."""
    for suffix in ("", "_total", "_bucket", "_sum", "_count"):
        if suffix and not name.endswith(suffix):
            continue
        base = name[: len(name) - len(suffix)] if suffix else name
        if base in scrape:
            return base
    return None


def test_the_families_alerts_lean_on_have_samples(scrape: Scrape) -> None:
    """The set-up exports samples for the families whose labels the checks below compare."""
    for fam in ("llm_supervisor_gpu_thermal_state", "llm_supervisor_gpu_temperature_celsius",
                "llm_supervisor_service_state", "llm_supervisor_service_restarts",
                "llm_supervisor_service_up", "llm_supervisor_ups_on_battery",
                "llm_supervisor_ups_status", "llm_supervisor_ups_reachable",
                "llm_supervisor_ups_low_battery",
                "llm_supervisor_ups_battery_charge_ratio", "llm_supervisor_checkpoint_runs",
                "llm_supervisor_checkpoint_last_success_timestamp_seconds",
                "llm_supervisor_model_loaded", "llm_supervisor_model_cold_starts",
                "llm_supervisor_gate_requests", "llm_supervisor_loop_lag_seconds",
                "llm_supervisor_watchdog_pings", "llm_supervisor_mode",
                "llm_supervisor_key_rejected", "llm_supervisor_key_requests",
                "llm_supervisor_audit_lines_dropped"):
        assert scrape[fam]["samples"], fam


def test_rules_check_and_unit_tests() -> None:
    assert PROMTOOL is not None
    check = subprocess.run([PROMTOOL, "check", "rules", str(PROM / "alerts.yml")],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([PROMTOOL, "test", "rules", "alerts.test.yml"], cwd=PROM,
                          capture_output=True, text=True, check=False)
    assert test.returncode == 0, test.stdout + test.stderr


def test_alerts_name_only_exported_series(scrape: Scrape) -> None:
    text = (PROM / "alerts.yml").read_text()
    names = set(NAME_RE.findall(text))
    assert len(names) >= 15
    missing = sorted(n for n in names if family_of(n, scrape) is None)
    assert not missing, missing
    for match in re.finditer(r'(llm_supervisor_[a-z_]+)\{([^}]*)\}', text):
        fam = family_of(match.group(1), scrape)
        assert fam is not None
        for key, value in re.findall(r'([a-z_]+)=~?"([^"]*)"', match.group(2)):
            if scrape[fam]["samples"]:
                assert key in scrape[fam]["labels"], (match.group(0), scrape[fam]["labels"])
            if key in ENUMERATED and scrape[fam]["samples"]:
                for v in value.split("|"):
                    assert v in scrape[fam]["values"][key], (match.group(0), v)
    # every alert has a runbook section that exists
    ops = (ROOT / "docs" / "operations.md").read_text()
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", ops, re.M)}
    for anchor in set(re.findall(r"docs/operations\.md#([a-z0-9-]+)", text)):
        assert anchor in anchors, anchor


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^a-z0-9 -]", "", heading.strip().lower()).replace(" ", "-")


def test_alert_tests_use_exported_series(scrape: Scrape) -> None:
    text = (PROM / "alerts.test.yml").read_text()
    series = re.findall(r"series: '([^']+)'", text)
    assert len(series) >= 20
    for s in series:
        m = SERIES_RE.match(s)
        assert m is not None, s
        name, labels = m.group(1), dict(LABEL_RE.findall(m.group(2)))
        if name == "up":
            continue  # Prometheus' own
        fam = family_of(name, scrape)
        assert fam is not None, name
        got = set(labels) - SCRAPE_LABELS
        if scrape[fam]["samples"]:
            assert got == scrape[fam]["labels"], (s, scrape[fam]["labels"])
        for key in got & ENUMERATED:
            if scrape[fam]["samples"]:
                assert labels[key] in scrape[fam]["values"][key], (s, key)


def test_dashboard_queries_parse_and_name_exported_series(scrape: Scrape,
                                                          tmp_path: Path) -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash["annotations"]["list"]]
    assert len(exprs) >= 40
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("temperature", "power and limit", "thermal state", "health flags",
                  "service state", "restarts", "models loaded", "swaps", "in flight",
                  "request rate", "latency", "first token", "ups charge", "power events",
                  "checkpoint age"):
        assert topic in titles, topic
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:q{i}", "expr": e.replace("$__rate_interval", "5m")
         .replace("$instance", ".*")} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))  # YAML is a superset of JSON
    assert PROMTOOL is not None
    check = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True,
                           text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    names = {n for e in exprs for n in NAME_RE.findall(e)}
    missing = sorted(n for n in names if family_of(n, scrape) is None)
    assert not missing, missing
    for e in exprs:
        for match in re.finditer(r'(llm_supervisor_[a-z_]+)\{([^}]*)\}', e):
            fam = family_of(match.group(1), scrape)
            assert fam is not None
            for key, _value in re.findall(r'([a-z_]+)=~?"([^"]*)"', match.group(2)):
                if key != "instance" and scrape[fam]["samples"]:
                    assert key in scrape[fam]["labels"], (e, key)


def _samples(listen: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One scrape of /metrics: (sample name, labels) -> value."""
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _ups(listen: str) -> dict[str, float]:
    """The scraped llm_supervisor_ups_* samples without labels, and the current mode."""
    got = _samples(listen)
    out = {name: v for (name, labels), v in got.items()
           if name.startswith("llm_supervisor_ups_") and not labels}
    out["flags"] = sum(1 for name, _ in got if name == "llm_supervisor_ups_status")
    out.update({f"mode={dict(labels)['mode']}": v for (name, labels), v in got.items()
                if name == "llm_supervisor_mode"})
    return out


def _firing(prom: PromServer, name: str, instance: str) -> bool:
    return any(a["labels"]["alertname"] == name and a["labels"].get("instance") == instance
               and a["state"] == "firing" for a in prom.alerts())


def test_power_events_export_the_ups_state_and_fire_the_alerts_with_source_none(
        tmp_path: Path) -> None:
    """No UPS is read (`source = "none"`): upsmon/upssched send `llmctl power-event`. The
    on-battery and low-battery series follow the events (nothing about reachability, flags,
    charge or runtime is made up), and alerts.yml's LLMSupervisorOnBattery and
    LLMSupervisorLowBattery fire in a real Prometheus scraping the daemon."""
    if (why := prometheus_missing()) is not None:
        pytest.skip(why)
    chat = fake_service("chat", free_port(), gpus=[0], metrics_url="",
                        gate={"listen": f"127.0.0.1:{free_port()}"})
    doc = base_config(tmp_path, [chat], gpus=1, power={
        "source": "none", "on_battery_grace_s": 600, "drain_timeout_s": 5,
        "stop_timeout_s": 5})
    listen = doc["metrics"]["listen"]
    conf = json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": "llm-supervisor",
                            "static_configs": [{"targets": [listen]}]}]})
    prom = PromServer(tmp_path / "prometheus", conf,
                      files={"alerts.yml": (PROM / "alerts.yml").read_text()})
    with running(tmp_path, doc) as d, prom:
        d.wait_state("chat", "ready")
        quiet = _ups(listen)
        assert quiet == {"llm_supervisor_ups_on_battery": 0.0,
                         "llm_supervisor_ups_low_battery": 0.0, "flags": 0,
                         **{k: v for k, v in quiet.items() if k.startswith("mode=")}}, quiet
        assert quiet["mode=normal"] == 1.0
        wait_until(lambda: prom.query('up{job="llm-supervisor"} == 1'), 30, 0.2,
                   what="the first scrape")

        r = d.llmctl("power-event", "on-battery")
        assert r.returncode == 0, r.stderr
        ups = _ups(listen)
        assert ups["mode=on_battery"] == 1.0 and ups["llm_supervisor_ups_on_battery"] == 1.0
        assert ups["llm_supervisor_ups_low_battery"] == 0.0
        assert "llm_supervisor_ups_reachable" not in ups and ups["flags"] == 0
        wait_until(lambda: _firing(prom, "LLMSupervisorOnBattery", listen), 30, 0.2,
                   what="LLMSupervisorOnBattery firing")
        assert not _firing(prom, "LLMSupervisorLowBattery", listen)

        r = d.llmctl("power-event", "low-battery")
        assert r.returncode == 0, r.stderr
        ups = _ups(listen)
        assert ups["llm_supervisor_ups_on_battery"] == 1.0
        assert ups["llm_supervisor_ups_low_battery"] == 1.0
        wait_until(lambda: _firing(prom, "LLMSupervisorLowBattery", listen), 30, 0.2,
                   what="LLMSupervisorLowBattery firing")
        wait_until(lambda: d.status()["supervisor"]["mode"] == "powered_down", 15,
                   what="powered down")

        r = d.llmctl("power-event", "on-line")
        assert r.returncode == 0, r.stderr
        ups = _ups(listen)
        assert ups["llm_supervisor_ups_on_battery"] == 0.0
        assert ups["llm_supervisor_ups_low_battery"] == 0.0
        d.wait_state("chat", "ready", 15)
        wait_until(lambda: not _firing(prom, "LLMSupervisorOnBattery", listen)
                   and not _firing(prom, "LLMSupervisorLowBattery", listen), 30, 0.2,
                   what="the power alerts resolved")
    assert not prom.storage.exists()
