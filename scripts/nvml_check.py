"""On a machine with an NVIDIA GPU: the NVML backend against the real driver. Discovers the
GPUs, times 200 reads of GPU 0, lowers its power limit by 100 W, reads the enforced limit
back, and restores the default. Prints JSON. Run by scripts/device_check.sh."""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pynvml

from supervisord_llm.sensors.nvml import NvmlBackend


def main() -> None:
    b = NvmlBackend(pynvml)
    out: dict[str, object] = {}
    gpus = b.discover()
    out["gpus"] = [asdict(g) for g in gpus]
    g = gpus[0]
    times = []
    for _ in range(200):
        t = time.perf_counter()
        r = b.read(g)
        times.append((time.perf_counter() - t) * 1e6)
    times.sort()
    out["reading"] = asdict(r)
    out["read_us"] = {"p50": round(statistics.median(times), 1),
                      "p99": round(times[int(0.99 * len(times)) - 1], 1),
                      "max": round(times[-1], 1)}
    default = g.default_power_limit_w or 0.0
    target = max(g.min_power_limit_w or 0.0, default - 100)
    try:
        t = time.perf_counter()
        b.set_power_limit(g, target)
        out["set_limit_ms"] = round((time.perf_counter() - t) * 1000, 2)
        out["limit_after_set_w"] = b.read(g).power_limit_w
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        seen = []
        t0 = time.perf_counter()
        for _ in range(20):  # when does the enforced limit follow?
            seen.append((round(time.perf_counter() - t0, 3),
                         pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000,
                         pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000))
            time.sleep(0.05)
        out["limits_after_set"] = seen[:3] + seen[-2:]
    finally:
        b.set_power_limit(g, default)
        out["limit_restored_w"] = b.read(g).power_limit_w
    b.close()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
