"""Prometheus metrics: a custom collector that renders the supervisor's current state.

No I/O while scraping: GPU values are the hub's last snapshots, service values the actors'
own fields. The collector has its own registry (no process-global default registry).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import __version__, logs
from .config import GIB
from .guard import ACTIONS
from .modes import Mode
from .parts import Parts
from .sensors.base import CLOCK_EVENTS
from .states import RestartReason, State
from .supervisor import load_state
from .systemd import Notifier

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
GPU_LABELS = ["gpu", "uuid", "pci_bus_id", "name"]
THERMAL_STATES = ("ok", "warm", "throttled", "critical", "lost", "unresponsive")
P_FLAGS = ("OL", "OB", "LB", "FSD", "CHRG", "DISCHRG", "RB", "OVER", "BYPASS")
KEY_REJECTIONS = ("requests", "tokens", "concurrency", "model_not_found", "not_found")
POWER_EVENTS = ("on_battery", "power_back", "power_down", "powered_down", "restart",
                "ups_unreachable", "ups_reachable", "override", "fsd_ignored")


class SupervisorCollector(Collector):
    def __init__(self, parts: Parts, notifier: Notifier | None = None) -> None:
        self.parts = parts
        self.sup = parts.sup
        self.host = parts.host
        self.notifier = notifier

    def collect(self) -> Iterator[Metric]:
        sup = self.sup
        info = GaugeMetricFamily("llm_supervisor_build_info", "Build information",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        mode = GaugeMetricFamily("llm_supervisor_mode", "Supervisor mode (1 = current)",
                                 labels=["mode"])
        for m in Mode:
            mode.add_metric([m.value], 1.0 if self.host.mode is m else 0.0)
        yield mode
        yield GaugeMetricFamily("llm_supervisor_loop_lag_seconds",
                                "How late the event loop ran its last timer",
                                value=sup.loop.lag_s)
        yield CounterMetricFamily("llm_supervisor_watchdog_pings",
                                  "WATCHDOG=1 messages sent to systemd",
                                  value=sup.loop.watchdog_pings)
        pipe = logs.pipeline()
        yield CounterMetricFamily("llm_supervisor_log_lines_dropped",
                                  "Log lines dropped because the journal did not keep up",
                                  value=pipe.dropped if pipe is not None else 0)
        yield CounterMetricFamily("llm_supervisor_sd_notify_dropped",
                                  "sd_notify messages that could not be delivered to systemd",
                                  value=self.notifier.dropped if self.notifier else 0)
        yield CounterMetricFamily("llm_supervisor_adoptions",
                                  "Model instances adopted from an earlier supervisor at start",
                                  value=sup.spawner.keepers.adoptions)
        if sup.reattach_s is not None:
            yield GaugeMetricFamily("llm_supervisor_reattach_seconds",
                                    "From this supervisor's start until every model it "
                                    "adopted was ready", value=sup.reattach_s)
        front = sup.gates
        if front is not None:
            yield CounterMetricFamily("llm_supervisor_front_restarts",
                                      "Times the front process (gates and router) died (a "
                                      "new one is started at once)", value=front.restarts)
            yield CounterMetricFamily("llm_supervisor_front_cut_requests",
                                      "Requests in flight in a front process that died",
                                      value=front.cut_requests)
        errs = CounterMetricFamily("llm_supervisor_sensor_errors", "Failed sensor reads",
                                   labels=["sensor"])
        for sensor, n in sorted(sup.hub.errors_total.items()):
            errs.add_metric([sensor], n)
        yield errs
        yield from self._services()
        yield from self._gates()
        yield from self._door()
        yield from self._models()
        yield from self._gpus()
        yield from self._power()

    def _power(self) -> Iterator[Metric]:
        power = self.parts.power
        reachable = GaugeMetricFamily("llm_supervisor_ups_reachable",
                                      "1 when upsd answers with data for the UPS")
        on_battery = GaugeMetricFamily("llm_supervisor_ups_on_battery",
                                       "1 while the UPS is on battery (OB); with source "
                                       "none, while the last power event says so")
        low = GaugeMetricFamily("llm_supervisor_ups_low_battery",
                                "1 while the UPS reports low battery on battery (OB LB) or "
                                "a forced shutdown (FSD) that the power policy believes; with "
                                "source none, from a low-battery or fsd power event until "
                                "on-line")
        charge = GaugeMetricFamily("llm_supervisor_ups_battery_charge_ratio",
                                   "battery.charge as a ratio (0-1)")
        runtime = GaugeMetricFamily("llm_supervisor_ups_battery_runtime_seconds",
                                    "battery.runtime as the UPS reports it")
        flags = GaugeMetricFamily("llm_supervisor_ups_status",
                                  "ups.status flags (1 = present)", labels=["flag"])
        events = CounterMetricFamily("llm_supervisor_power_events",
                                     "Power events: on_battery, power_back, power_down, "
                                     "powered_down, restart, ups_unreachable, ups_reachable, "
                                     "override (llmctl power-event on-line --force), "
                                     "fsd_ignored (an FSD taken as stale)",
                                     labels=["event"])
        steps = GaugeMetricFamily("llm_supervisor_power_down_step_duration_seconds",
                                  "Duration of each step of the last power-down sequence",
                                  labels=["step"])
        runs = CounterMetricFamily("llm_supervisor_checkpoint_runs",
                                   "Checkpoint hook runs by result (ok, failed, timeout, "
                                   "cancelled)",
                                   labels=["name", "result"])
        cp_duration = GaugeMetricFamily("llm_supervisor_checkpoint_duration_seconds",
                                        "Duration of the last run of each checkpoint hook",
                                        labels=["name"])
        cp_age = GaugeMetricFamily("llm_supervisor_checkpoint_last_success_timestamp_seconds",
                                   "Unix time of the last successful run of each hook",
                                   labels=["name"])
        if power is not None:
            st = power.status(0.0)
            source = power.cfg.source
            if source == "nut":  # what upsd said last
                reachable.add_metric([], 0.0 if st["state"] == "unreachable" else 1.0)
                r = power.reading
                ups_flags = r.flags if r is not None and st["state"] != "unreachable" \
                    else frozenset()
                on_battery.add_metric([], 1.0 if "OB" in ups_flags else 0.0)
                # the policy's view of the reading (an FSD it no longer believes is not low)
                good = st["state"] not in ("unreachable", "unknown")
                low.add_metric([], 1.0 if good and power.state.believed == "low_battery"
                               else 0.0)
                for flag in sorted(P_FLAGS):
                    flags.add_metric([flag], 1.0 if flag in ups_flags else 0.0)
                if st["charge_pct"] is not None:
                    charge.add_metric([], st["charge_pct"] / 100.0)
                if st["runtime_s"] is not None:
                    runtime.add_metric([], st["runtime_s"])
            elif source == "none":
                # no UPS to read (no `reachable`, flags, charge, runtime): what the power
                # policy believes from `llmctl power-event` (upsmon, upssched); 0 until one
                # says otherwise
                believed = power.state.believed
                on_battery.add_metric([], 1.0 if believed in ("on_battery", "low_battery")
                                      else 0.0)
                low.add_metric([], 1.0 if believed == "low_battery" else 0.0)
            counted = dict(power.events)  # every event from 0, and any other counted
            for event in (*POWER_EVENTS, *sorted(set(counted) - set(POWER_EVENTS))):
                events.add_metric([event], counted.get(event, 0))
            for step in power.sequence:
                if step.duration_s is not None:
                    steps.add_metric([step.name], step.duration_s)
            runner = power.checkpoints
            for cp in runner.hooks:
                for result in ("ok", "failed", "timeout", "cancelled"):
                    runs.add_metric([cp.name, result], runner.runs.get((cp.name, result), 0))
                last = runner.last.get(cp.name)
                if last is not None:
                    cp_duration.add_metric([cp.name], last.duration_s)
                ok_at = runner.last_ok.get(cp.name)
                if ok_at is not None:
                    cp_age.add_metric([cp.name], ok_at)
        yield from (reachable, on_battery, low, charge, runtime, flags, events, steps, runs,
                    cp_duration, cp_age)

    def _door(self) -> Iterator[Metric]:
        """Per API key (an id label, bounded by the keys in force; "-" for requests without
        a valid key), the audit log, connections turned away."""
        front = self.sup.gates
        if front is None:
            return
        stats = front.door_stats
        requests = CounterMetricFamily("llm_supervisor_key_requests",
                                       "Requests by API key and status code",
                                       labels=["key", "code"])
        tokens = CounterMetricFamily("llm_supervisor_key_tokens",
                                     "Tokens by API key (prompt, completion; from the "
                                     "engine's usage, else estimated)", labels=["key", "kind"])
        rejected = CounterMetricFamily("llm_supervisor_key_rejected",
                                       "Requests refused at the door, by API key and reason "
                                       "(requests, tokens, concurrency, model_not_found, "
                                       "not_found: a path not served; "
                                       "invalid_api_key under key \"-\": no valid key)",
                                       labels=["key", "reason"])
        inflight = GaugeMetricFamily("llm_supervisor_key_inflight_requests",
                                     "Requests in flight by API key", labels=["key"])
        keys = stats.get("keys")
        for key_id, doc in sorted(keys.items()) if isinstance(keys, dict) else ():
            if not isinstance(doc, dict):
                continue
            for code, n in sorted((doc.get("requests") or {}).items()):
                requests.add_metric([key_id, str(code)], n)
            tokens.add_metric([key_id, "prompt"], doc.get("prompt_tokens") or 0)
            tokens.add_metric([key_id, "completion"], doc.get("completion_tokens") or 0)
            counted = doc.get("rejected") or {}
            for reason in (*KEY_REJECTIONS, *sorted(set(counted) - set(KEY_REJECTIONS))):
                rejected.add_metric([key_id, str(reason)], counted.get(reason, 0))
            inflight.add_metric([key_id], doc.get("inflight") or 0)
        if stats.get("auth"):  # (no key id begins with '-')
            rejected.add_metric(["-", "invalid_api_key"],
                                (stats.get("rejected") or {}).get("invalid_api_key", 0))
        yield from (requests, tokens, rejected, inflight)
        audit = stats.get("audit")
        if isinstance(audit, dict):
            yield CounterMetricFamily("llm_supervisor_audit_lines", "Audit lines written",
                                      value=audit.get("written") or 0)
            yield CounterMetricFamily("llm_supervisor_audit_lines_dropped",
                                      "Audit lines dropped: the writer fell behind, or a "
                                      "write failed", value=audit.get("dropped") or 0)
            yield CounterMetricFamily("llm_supervisor_audit_lines_suppressed",
                                      "Refusals without a key from one address beyond 20 in "
                                      "10 s: summed up in one audit line, not one each",
                                      value=stats.get("audit_suppressed") or 0)
        away = CounterMetricFamily("llm_supervisor_connections_turned_away",
                                   "Connections closed at once: their client address had "
                                   "max_connections_per_client open", labels=["listener"])
        if front.router is not None:
            away.add_metric(["router"], front.router.stats.turned_away)
        for name, gate in sorted(front.gates.items()):
            away.add_metric([name], gate.stats.turned_away)
        yield away

    def _gates(self) -> Iterator[Metric]:
        inflight = GaugeMetricFamily("llm_supervisor_gate_inflight_requests",
                                     "Requests in flight through the gate", labels=["service"])
        requests = CounterMetricFamily("llm_supervisor_gate_requests",
                                       "Requests answered by the gate, by status code",
                                       labels=["service", "code"])
        rejected = CounterMetricFamily("llm_supervisor_gate_rejected",
                                       "Requests the gate refused, by reason",
                                       labels=["service", "reason"])
        duration = HistogramMetricFamily("llm_supervisor_gate_request_duration_seconds",
                                         "Request duration through the gate",
                                         labels=["service"])
        ttfb = HistogramMetricFamily("llm_supervisor_gate_time_to_first_byte_seconds",
                                     "Time to the first byte of the response",
                                     labels=["service"])
        ttft = HistogramMetricFamily("llm_supervisor_gate_time_to_first_token_seconds",
                                     "Event streams: time to the first data: event",
                                     labels=["service"])
        rate = HistogramMetricFamily("llm_supervisor_gate_stream_events_per_second",
                                     "Event streams: data: events per second, per response",
                                     labels=["service"])
        host = self.sup.gates
        gates = list(host.gates.items()) if host is not None else []
        for name, gate in gates:
            inflight.add_metric([name], gate.inflight)
            for code, n in sorted(gate.stats.requests.items()):
                requests.add_metric([name, code], n)
            for reason, n in sorted(gate.stats.rejected.items()):
                rejected.add_metric([name, reason], n)
            for fam, hist in ((duration, gate.stats.duration), (ttfb, gate.stats.ttfb),
                              (ttft, gate.stats.ttft), (rate, gate.stats.event_rate)):
                buckets, total, _count = hist.snapshot()
                fam.add_metric([name], buckets, total)
        yield from (inflight, requests, rejected, duration, ttfb, ttft, rate)

    def _models(self) -> Iterator[Metric]:
        """Models behind the router, and the swapper's work."""
        sup = self.sup
        loaded = GaugeMetricFamily("llm_supervisor_model_loaded",
                                   "1 while the model's service is ready (loaded)",
                                   labels=["model", "service"])
        requests = CounterMetricFamily("llm_supervisor_model_requests",
                                       "Requests for the model through the router, by status "
                                       "code", labels=["model", "service", "code"])
        ttft = HistogramMetricFamily("llm_supervisor_model_time_to_first_token_seconds",
                                     "Event streams: from the request's arrival at the router "
                                     "to the first data: event (a cold start's load counts)",
                                     labels=["model", "service"])
        cold = CounterMetricFamily("llm_supervisor_model_cold_starts",
                                   "Loads of the model's service that a request for this "
                                   "model (or llmctl start) asked for",
                                   labels=["model", "service"])
        cold_s = HistogramMetricFamily("llm_supervisor_model_cold_start_duration_seconds",
                                       "From the first request for an unloaded service to its "
                                       "ready", labels=["service"])
        swaps = CounterMetricFamily("llm_supervisor_model_swaps",
                                    "Times the service was stopped to make room for another",
                                    labels=["service"])
        idle = CounterMetricFamily("llm_supervisor_model_idle_stops",
                                   "Times the service was stopped after idle_stop_s",
                                   labels=["service"])
        memory = GaugeMetricFamily("llm_supervisor_model_memory_bytes",
                                   "GPU memory the service needs on each of its GPUs "
                                   "(declared vram_gb, or learned once ready)",
                                   labels=["service", "uuid", "source"])
        waiting = GaugeMetricFamily("llm_supervisor_model_waiting_requests",
                                    "Requests waiting for their model to be loaded",
                                    labels=["service"])
        sw = self.parts.swapper
        for actor in list(sup.actors.values()):
            gate = sup.gate_of(actor.name)
            is_loaded = 1.0 if load_state(actor) == "loaded" else 0.0
            stats = dict(gate.models) if gate is not None else {}
            st = sw.stats.get(actor.name)
            for model in actor.cfg.models:
                loaded.add_metric([model, actor.name], is_loaded)
                ms = stats.get(model)
                if ms is not None:
                    for code, n in sorted(ms.requests.items()):
                        requests.add_metric([model, actor.name, code], n)
                    buckets, total, _count = ms.ttft.snapshot()
                    ttft.add_metric([model, actor.name], buckets, total)
                cold.add_metric([model, actor.name],
                                st.cold_starts.get(model, 0) if st is not None else 0)
            if actor.cfg.on_demand or actor.cfg.vram_gb is not None:
                if st is not None:
                    buckets, total, _count = st.cold_start.snapshot()
                    cold_s.add_metric([actor.name], buckets, total)
                swaps.add_metric([actor.name], st.swaps if st is not None else 0)
                idle.add_metric([actor.name], st.idle_stops if st is not None else 0)
                if gate is not None:
                    waiting.add_metric([actor.name], sw.wants.waiting.get(actor.name, 0))
            declared = int((actor.cfg.vram_gb or 0) * GIB)
            learned = sw.learned.get(actor.name, {})
            for g in actor.plan.gpus:
                if declared:
                    memory.add_metric([actor.name, g.uuid, "declared"], declared)
                if g.uuid in learned:
                    memory.add_metric([actor.name, g.uuid, "learned"], learned[g.uuid])
        yield from (loaded, requests, ttft, cold, cold_s, swaps, idle, memory, waiting)
        router = sup.gates.router if sup.gates is not None else None
        if router is not None:
            own = CounterMetricFamily("llm_supervisor_router_rejected",
                                      "Requests the router answered itself with an error, by "
                                      "reason (unknown model, no model, bad JSON, ...)",
                                      labels=["reason"])
            for reason, n in sorted(router.stats.rejected.items()):
                own.add_metric([reason], n)
            yield own

    def _services(self) -> Iterator[Metric]:
        actors = list(self.sup.actors.values())
        state = GaugeMetricFamily("llm_supervisor_service_state",
                                  "Service state (1 = current)", labels=["service", "state"])
        up = GaugeMetricFamily("llm_supervisor_service_up", "1 when the service is ready",
                               labels=["service"])
        restarts = CounterMetricFamily("llm_supervisor_service_restarts",
                                       "Service restarts by reason", labels=["service", "reason"])
        fails = CounterMetricFamily("llm_supervisor_service_health_failures",
                                    "Failed health checks", labels=["service"])
        dur = GaugeMetricFamily("llm_supervisor_service_start_duration_seconds",
                                "Time from the last launch to ready", labels=["service"])
        for a in actors:
            for s in State:
                state.add_metric([a.name, s.value], 1.0 if a.state is s else 0.0)
            up.add_metric([a.name], 1.0 if a.state is State.READY else 0.0)
            for reason in RestartReason:
                restarts.add_metric([a.name, reason.value],
                                    a.counters.restarts.get(reason.value, 0))
            fails.add_metric([a.name], a.counters.health_failures)
            if a.start_duration_s is not None:
                dur.add_metric([a.name], a.start_duration_s)
        probes = CounterMetricFamily("llm_supervisor_service_probes",
                                     "Generation probes sent, by result (ok, failed)",
                                     labels=["service", "result"])
        prober = self.parts.probes
        for a in actors:
            if a.cfg.probe is not None:
                for result in ("ok", "failed"):
                    probes.add_metric([a.name, result], prober.results.get((a.name, result), 0))
        yield from (state, up, restarts, fails, dur, probes)

    def _gpus(self) -> Iterator[Metric]:
        def g(name: str, doc: str, extra: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"llm_supervisor_gpu_{name}", doc,
                                     labels=GPU_LABELS + (extra or []))

        temp = g("temperature_celsius", "GPU core temperature")
        mtemp = g("memory_temperature_celsius", "GPU memory temperature")
        power = g("power_watts", "GPU board power draw")
        limit = g("power_limit_watts", "GPU board power limit in force")
        default_limit = g("default_power_limit_watts", "GPU board default power limit")
        target = g("power_limit_target_watts",
                   "The power limit the thermal policy set (only while it holds one)")
        factor = g("admission_factor", "Factor on the admission limits of this GPU's gates")
        hotspot = g("hotspot_temperature_celsius", "GPU junction (hot spot) temperature")
        util = g("utilization_ratio", "GPU utilisation (0-1)")
        used = g("memory_used_bytes", "GPU memory in use")
        total = g("memory_total_bytes", "GPU memory")
        gup = g("up", "1 while the GPU answers its sensor calls")
        thermal = g("thermal_state", "GPU thermal state (1 = current)", ["state"])
        slow = g("slowdown_threshold_celsius", "The GPU's own slowdown temperature")
        actions = CounterMetricFamily("llm_supervisor_gpu_throttle_actions",
                                      "Throttle actions taken", labels=[*GPU_LABELS, "action"])
        xid = CounterMetricFamily("llm_supervisor_gpu_xid_errors", "Xid errors seen",
                                  labels=[*GPU_LABELS, "xid"])
        link_gen = g("pcie_link_generation", "PCIe link generation", ["kind"])
        link_width = g("pcie_link_width", "PCIe link width (lanes)", ["kind"])
        ecc = CounterMetricFamily("llm_supervisor_gpu_ecc_errors",
                                  "ECC errors since the driver loaded (volatile)",
                                  labels=[*GPU_LABELS, "type"])
        retired = g("retired_memory_pages", "Memory pages retired or rows remapped")
        pending = g("memory_retirement_pending",
                    "1 while a page retirement or row remap waits for a reset")
        clocks = g("clock_event_active", "1 while this reason holds the clocks down",
                   ["reason"])
        health = {h.info.uuid: h.health for h in self.sup.hub.health_snapshots()}
        events = self.parts.events
        for snap in self.sup.hub.snapshots():
            info, r = snap.info, snap.reading
            labels0 = [str(info.index), info.uuid, info.pci_bus_id, info.name]
            h = health.get(info.uuid)
            if h is not None:
                for fam, kind, num in ((link_gen, "current", h.pcie_gen),
                                       (link_gen, "max", h.pcie_gen_max),
                                       (link_width, "current", h.pcie_width),
                                       (link_width, "max", h.pcie_width_max)):
                    if num is not None:
                        fam.add_metric([*labels0, kind], num)
                for kind, num in (("uncorrected", h.ecc_uncorrected_volatile),
                                  ("corrected", h.ecc_corrected_volatile)):
                    if num is not None:
                        ecc.add_metric([*labels0, kind], num)
                if h.retired_pages is not None:
                    retired.add_metric(labels0, h.retired_pages)
                if h.retirement_pending is not None:
                    pending.add_metric(labels0, 1.0 if h.retirement_pending else 0.0)
                if h.clock_events is not None:
                    for reason in CLOCK_EVENTS:
                        clocks.add_metric([*labels0, reason],
                                          1.0 if reason in h.clock_events else 0.0)
            for code, n in sorted(events.xid_errors_total.get(info.uuid, {}).items()):
                xid.add_metric([*labels0, str(code)], n)
            labels = [str(info.index), info.uuid, info.pci_bus_id, info.name]
            fresh = snap.status == "ok" and r is not None
            if fresh and r is not None:
                for fam, value in ((temp, r.temperature_c), (mtemp, r.memory_temperature_c),
                                   (power, r.power_w), (used, r.memory_used_bytes),
                                   (hotspot, r.hotspot_c)):
                    if value is not None:
                        fam.add_metric(labels, float(value))
                if r.utilization_pct is not None:
                    util.add_metric(labels, r.utilization_pct / 100.0)
            if snap.power_limit_w is not None:
                limit.add_metric(labels, snap.power_limit_w)
            if info.memory_total_bytes is not None:
                total.add_metric(labels, float(info.memory_total_bytes))
            if info.slowdown_c is not None:
                slow.add_metric(labels, info.slowdown_c)
            gup.add_metric(labels, 1.0 if snap.status == "ok" else 0.0)
            guard = self.parts.guard
            current = guard.thermal_state(snap)
            for st in THERMAL_STATES:
                thermal.add_metric([*labels, st], 1.0 if st == current else 0.0)
            if info.default_power_limit_w is not None:
                default_limit.add_metric(labels, info.default_power_limit_w)
            status = guard.gpu_status(snap)
            if status["power_target_w"] is not None:
                target.add_metric(labels, status["power_target_w"])
            factor.add_metric(labels, status["admission_factor"])
            for action in ACTIONS:
                actions.add_metric([*labels, action],
                                   guard.actions.get((info.uuid, action), 0))
        yield from (temp, mtemp, power, limit, default_limit, target, factor, util, used, total,
                    gup, thermal, slow, hotspot, actions, xid, link_gen, link_width, ecc,
                    retired, pending, clocks)


def make_registry(parts: Parts, notifier: Notifier | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SupervisorCollector(parts, notifier))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
