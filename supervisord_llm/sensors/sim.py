"""Simulated GPUs (`backend = "sim"`): the inventory comes from `[[gpu.sim]]`, the live
readings from an optional JSON state file re-read at every poll, so that a test or an operator
can heat a GPU (`temperature_c`), pull it from the bus (`lost`) or hang its calls (`hang`).
Beyond the documented keys, `processes` ({"PID": bytes}) stands for NVML's per-process
memory (tests/fakebackend.py --sim-memory writes it).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from ..config import SimGpu
from ..errors import GpuLostError, SensorError
from .base import GpuHealth, GpuInfo, GpuReading

SANE_MAX_W = 5000.0  # the hub's plausibility limit: above it a reading is a sensor fault
IDLE_C = 35.0
_HANG_RECHECK_S = 0.1
_FIELDS = {
    "temperature_c": float,
    "memory_temperature_c": float,
    "power_w": float,
    "utilization_pct": float,
    "memory_used_bytes": int,
}


class SimBackend:
    name = "sim"

    def __init__(self, gpus: tuple[SimGpu, ...], state_file: str | None = None) -> None:
        self._gpus = gpus
        self._state_file = Path(state_file) if state_file else None
        # like a real board, the limit a simulated GPU was given outlives the daemon: kept in
        # <state_file>.limits.json (UUID -> watts), read here, written when set
        self._limits_file = (self._state_file.with_name(self._state_file.name + ".limits.json")
                             if self._state_file is not None else None)
        self._limits: dict[str, float] = {g.uuid: g.default_power_limit_w for g in gpus}
        self._limits.update(self._kept_limits())
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def discover(self) -> list[GpuInfo]:
        return [
            GpuInfo(
                index=i,
                uuid=g.uuid,
                name=g.name,
                pci_bus_id=g.pci_bus_id,
                vendor=g.vendor,
                numa_node=g.numa_node,
                memory_total_bytes=g.memory_total_bytes,
                default_power_limit_w=g.default_power_limit_w,
                min_power_limit_w=g.min_power_limit_w,
                max_power_limit_w=g.max_power_limit_w or g.default_power_limit_w,
                slowdown_c=g.slowdown_c,
                shutdown_c=g.shutdown_c,
            )
            for i, g in enumerate(self._gpus)
        ]

    def _state(self, uuid: str) -> dict[str, Any]:
        if self._state_file is None:
            return {}
        try:
            doc = json.loads(self._state_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise SensorError(f"sim state file {self._state_file}: {exc}") from None
        if not isinstance(doc, dict):
            raise SensorError(f"sim state file {self._state_file}: must hold a JSON object")
        entry = doc.get(uuid, {})
        if not isinstance(entry, dict):
            raise SensorError(f"sim state file {self._state_file}: {uuid} must map to an object")
        return entry

    def read(self, gpu: GpuInfo) -> GpuReading:
        state = self._state(gpu.uuid)
        while state.get("hang") is True and not self._closed.is_set():
            # A hung call: block like NVML does when a GPU falls off the bus.
            time.sleep(_HANG_RECHECK_S)
            state = self._state(gpu.uuid)
        if state.get("lost") is True:
            raise GpuLostError(f"GPU {gpu.uuid} is lost (sim)")
        values: dict[str, float | int | None] = {}
        for key, kind in _FIELDS.items():
            raw = state.get(key)
            if raw is None:
                values[key] = None
                continue
            if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(
                raw
            ):
                raise SensorError(f"sim state file: {gpu.uuid}.{key}: not a number: {raw!r}")
            values[key] = kind(raw)
        with self._lock:
            limit = self._limits.get(gpu.uuid)
        temp = values["temperature_c"]
        return GpuReading(
            temperature_c=IDLE_C if temp is None else float(temp),
            memory_temperature_c=(
                None if values["memory_temperature_c"] is None
                else float(values["memory_temperature_c"])
            ),
            # like a real board, it never draws more than its limit: `power_w` in the state
            # file is what the load would draw, the reading what the limit lets through (a
            # value no board draws is a sensor fault, passed on for the hub to refuse)
            power_w=None if values["power_w"] is None else (
                float(values["power_w"]) if limit is None or values["power_w"] > SANE_MAX_W
                else min(float(values["power_w"]), limit)),
            power_limit_w=limit,
            utilization_pct=(
                0.0 if values["utilization_pct"] is None else float(values["utilization_pct"])
            ),
            memory_used_bytes=(
                0 if values["memory_used_bytes"] is None else int(values["memory_used_bytes"])
            ),
        )

    def process_memory(self, gpu: GpuInfo) -> dict[int, int] | None:
        """Per-process memory, like NVML's, from the state file's `processes` ({"PID":
        bytes}); None when it has none (then the swapper learns from the used memory)."""
        state = self._state(gpu.uuid)
        raw = state.get("processes")
        if not isinstance(raw, dict):
            return None
        out: dict[int, int] = {}
        for pid, used in raw.items():
            if isinstance(pid, str) and pid.isdigit() and isinstance(used, int) \
                    and not isinstance(used, bool) and used >= 0:
                out[int(pid)] = used
        return out

    def _kept_limits(self) -> dict[str, float]:
        known = {g.uuid for g in self._gpus}
        if self._limits_file is None:
            return {}
        try:
            doc = json.loads(self._limits_file.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(doc, dict):
            return {}
        return {k: float(v) for k, v in doc.items() if k in known
                and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0}

    def set_power_limit(self, gpu: GpuInfo, watts: float) -> None:
        lo = gpu.min_power_limit_w or 0.0
        hi = gpu.max_power_limit_w or math.inf
        if not lo <= watts <= hi:
            raise SensorError(f"power limit {watts:g} W outside [{lo:g}, {hi:g}] W")
        with self._lock:
            self._limits[gpu.uuid] = watts
            if self._limits_file is not None:
                tmp = self._limits_file.with_name(self._limits_file.name + ".tmp")
                try:
                    tmp.write_text(json.dumps(self._limits, sort_keys=True))
                    os.replace(tmp, self._limits_file)
                except OSError as exc:
                    raise SensorError(f"sim: cannot keep the limit in {self._limits_file}: "
                                      f"{exc}") from None

    def read_health(self, gpu: GpuInfo) -> GpuHealth:
        """From the state file: `clock_events` (a list of names), `pcie_gen`, `pcie_width`
        (against the maxima `pcie_gen_max` 4, `pcie_width_max` 16; a width below 16 is a
        degraded link),
        `ecc_uncorrected`, `retirement_pending`; a healthy board otherwise."""
        state = self._state(gpu.uuid)
        if state.get("lost") is True:
            raise GpuLostError(f"{gpu.uuid} is lost (sim state file)")
        events = state.get("clock_events", [])
        if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
            raise SensorError(f"sim state file: {gpu.uuid} clock_events must be a list of names")

        def num(key: str, default: int, lowest: int) -> int:
            value = state.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise SensorError(f"sim state file: {gpu.uuid} {key} must be an integer >= "
                                  f"{lowest}")
            return value

        return GpuHealth(
            clock_events=tuple(events), pcie_gen=num("pcie_gen", 4, 1), pcie_gen_max=4,
            pcie_width=num("pcie_width", 16, 1), pcie_width_max=16,
            ecc_uncorrected_volatile=num("ecc_uncorrected", 0, 0), ecc_corrected_volatile=0,
            retired_pages=0, retirement_pending=state.get("retirement_pending") is True,
            remap_failed=False)

    def close(self) -> None:
        self._closed.set()
