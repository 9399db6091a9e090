"""What `llmctl status` and systemd's STATUS= show: rendered from the registry, the host and
the sensor snapshots; no I/O."""

from __future__ import annotations

import os
import time
from typing import Any

from . import __version__
from .parts import Parts
from .sensors.base import CLOCK_TROUBLE
from .sensors.hub import GpuSnapshot
from .service import ServiceActor
from .states import State
from .supervisor import Supervisor


def gpu_status(parts: Parts, snap: GpuSnapshot, now: float) -> dict[str, Any]:
    g, r = snap.info, snap.reading
    fresh = snap.status == "ok"
    data = {
        "index": g.index,
        "uuid": g.uuid,
        "name": g.name,
        "pci_bus_id": g.pci_bus_id,
        "numa_node": g.numa_node,
        "temperature_c": r.temperature_c if r and fresh else None,
        "memory_temperature_c": r.memory_temperature_c if r and fresh else None,
        "power_w": r.power_w if r and fresh else None,
        "power_limit_w": snap.power_limit_w,
        "default_power_limit_w": g.default_power_limit_w,
        "utilization_pct": r.utilization_pct if r and fresh else None,
        "memory_used_bytes": r.memory_used_bytes if r and fresh else None,
        "memory_total_bytes": g.memory_total_bytes,
        "hotspot_c": r.hotspot_c if r and fresh else None,
        "thermal_state": parts.guard.thermal_state(snap),
        "thresholds": {"slowdown_c": g.slowdown_c, "shutdown_c": g.shutdown_c},
        "reading_age_s": None if snap.read_at is None else round(now - snap.read_at, 3),
        "error": snap.error,
        "vendor": g.vendor,
        "backend": g.backend,
    }
    if g.memory_total_bytes:
        # what the services on it need (vram_gb or learned): the no-room message's figure
        data["memory_committed_bytes"] = parts.swapper.committed(g.uuid)
    data["health"] = health_status(parts.sup, g.uuid, now)
    data["xid_errors"] = {str(k): v for k, v in
                          sorted(parts.events.xid_errors_total.get(g.uuid, {}).items())}
    extra = parts.guard.gpu_status(snap)
    thresholds = extra.pop("thresholds")
    if thresholds:
        data["thresholds"] = {**data["thresholds"], **thresholds}  # type: ignore[dict-item]
    data.update(extra)
    return data


def health_status(sup: Supervisor, uuid: str, now: float) -> dict[str, Any] | None:
    """Health beyond heat: clock-event reasons, the PCIe link, ECC and retired memory."""
    snap = next((h for h in sup.hub.health_snapshots() if h.info.uuid == uuid), None)
    if snap is None or snap.health is None:
        return None
    h = snap.health
    return {
        "clock_events": list(h.clock_events) if h.clock_events is not None else None,
        "clock_trouble": sorted(set(h.clock_events or ()) & CLOCK_TROUBLE),
        "pcie_gen": h.pcie_gen, "pcie_gen_max": h.pcie_gen_max,
        "pcie_width": h.pcie_width, "pcie_width_max": h.pcie_width_max,
        "link_degraded": h.link_degraded,
        "ecc_uncorrected": h.ecc_uncorrected_volatile,
        "ecc_corrected": h.ecc_corrected_volatile,
        "retired_pages": h.retired_pages,
        "retirement_pending": h.retirement_pending,
        "remap_failed": h.remap_failed,
        "memory_trouble": h.memory_trouble,
        "age_s": None if snap.read_at is None else round(now - snap.read_at, 3),
        "error": snap.error,
    }


def service_status(parts: Parts, actor: ServiceActor, now: float) -> dict[str, Any]:
    sup = parts.sup
    data = actor.status(now)
    data["throttled"] = parts.guard.throttled(actor.name)
    gate = sup.gate_of(actor.name)
    if gate is not None:
        data["inflight"] = gate.inflight
        data["gate"] = gate.state
        data["gate_listen"] = str(actor.cfg.gate.listen) if actor.cfg.gate else None
        data["queued"] = gate.queued
        data["max_concurrency"] = gate.limit
        data["drain_reasons"] = sorted(gate.drains)
    extra = sup.extra.get(actor.name)
    if extra is not None:
        role, other = extra
        data["swap"] = {"role": role, "state": other.state.value,
                        "pid": other.status(now)["pid"], "port": other.port}
    probe = parts.probes.status(actor.name, now)
    if probe is not None:
        data["probe"] = probe
    cfg = actor.cfg
    if cfg.models:
        data["models"] = list(cfg.models)
    data["start"] = cfg.start
    sw = parts.swapper
    if cfg.on_demand or cfg.vram_gb is not None or cfg.exclusive:
        waiting = sw.wants.waiting.get(actor.name, 0)
        st = sw.stats.get(actor.name)
        data["on_demand"] = {
            "pinned": actor.name in sw.pinned,
            "pending": actor.name in sw.pending,
            "idle_s": (round(time.monotonic() - gate.last_active, 3)
                       if gate is not None and gate.active == 0 else 0.0)
            if actor.state is State.READY else None,
            "idle_stop_s": cfg.idle_stop_s,
            "min_residency_s": cfg.min_residency_s,
            # kept loaded this much longer by min_residency_s (no victim before)
            "resident_s": round(sw.resident_left(actor), 3),
            "draining_for": sw.draining_for(actor.name),
            "exclusive": cfg.exclusive,
            "vram_bytes": sw.need(actor),
            "learned_bytes": sw.learned.get(actor.name, {}),
            "cold_starts": sum(st.cold_starts.values()) if st else 0,
            "swaps": st.swaps if st else 0,
            "idle_stops": st.idle_stops if st else 0,
            "waiting": waiting,
            # the last no-room note, while something still waits for it
            "message": gate.cold_message if gate is not None and (
                actor.name in sw.pending or waiting) else None,
        }
    return data


def models_status(parts: Parts) -> list[dict[str, Any]]:
    """Every model behind the router: where it is served, whether it is loaded, its
    requests."""
    sup = parts.sup
    out = []
    for entry in sup.model_entries():
        name, service = str(entry["id"]), str(entry["service"])
        gate = sup.gate_of(service)
        stats = gate.models.get(name) if gate is not None else None
        st = parts.swapper.stats.get(service)
        ttft = None
        if stats is not None:
            _buckets, total, count = stats.ttft.snapshot()
            ttft = round(total / count, 4) if count else None
        out.append({"model": name, "service": service, "state": entry["state"],
                    "start": entry["start"],
                    "requests": sum(stats.requests.values()) if stats is not None else 0,
                    "ttft_mean_s": ttft,
                    "cold_starts": st.cold_starts.get(name, 0) if st is not None else 0,
                    "swaps": st.swaps if st is not None else 0})
    return out


def status(parts: Parts, now: float, service: str | None = None) -> dict[str, Any]:
    sup, host = parts.sup, parts.host
    actors = [sup.actor(service)] if service is not None else list(sup.actors.values())
    return {
        "supervisor": {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(now - sup.started_at, 3),
            "config_path": sup.cfg.path,
            "mode": host.mode.value,
            "operations": [op.describe() for op in host.ops.values()],
            "gpu_backend": sup.hub.backend_names,
            "loop_lag_s": round(sup.loop.lag_s, 6),
        },
        "services": [service_status(parts, a, now) for a in actors],
        "router": {"listen": str(sup.cfg.router.listen)} if sup.cfg.router else None,
        "front": front_status(parts),
        "models": models_status(parts) if service is None else [
            m for m in models_status(parts) if m["service"] == service],
        "gpus": [gpu_status(parts, s, now) for s in sup.hub.snapshots()],
        "power": parts.power.status(now),
    }


def front_status(parts: Parts) -> dict[str, Any] | None:
    """The front process (gates and router): None when no gate or router is configured."""
    front = parts.sup.gates
    if front is None:
        return None
    return {"pid": front.pid, "attached": front.attached, "adopted": front.adopted,
            "restarts": front.restarts, "cut_requests": front.cut_requests}


def status_line(parts: Parts) -> str:
    """The systemd STATUS= text: "3/4 services ready; GPU0 62C"."""
    sup, host, guard = parts.sup, parts.host, parts.guard
    actors = list(sup.actors.values())
    ready = sum(1 for a in actors if a.state is State.READY)
    bits = [f"{ready}/{len(actors)} services ready"]
    failed = [a.name for a in actors if a.state is State.FAILED]
    if failed:
        bits.append("failed: " + ",".join(failed))
    for snap in sup.hub.snapshots():
        r = snap.reading
        if snap.status != "ok":
            bits.append(f"GPU{snap.info.index} {snap.status}")
        elif r is not None and r.temperature_c is not None:
            text = f"GPU{snap.info.index} {(r.policy_c or r.temperature_c):.0f}C"
            state = guard.thermal_state(snap)
            if state in ("throttled", "critical"):
                text += f" {state}"
                target = guard.targets.get(snap.info.uuid)
                if target is not None:
                    text += f" {target:.0f}W"
            bits.append(text)
    power = parts.power
    if power.cfg.source == "nut":
        p = power.status(0.0)
        if p["state"] == "unreachable":
            bits.append("UPS unreachable")
        else:
            text = f"UPS {p['status'] or p['state']}"
            if p["state"] != "online":
                if p["charge_pct"] is not None:
                    text += f" {p['charge_pct']:.0f}%"
                if p["runtime_s"] is not None:
                    text += f" {p['runtime_s']:.0f}s"
            bits.append(text)
    if host.mode.value != "normal":
        mode = host.mode.value
        if power.sequence and host.mode.value == "powering_down":
            mode += f" ({power.sequence[-1].name})"
        bits.append(mode)
    return "; ".join(bits)
