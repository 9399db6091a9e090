#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, as root: the NVML backend against the real driver
# (scripts/nvml_check.py), then the daemon with gpu.backend = "nvml" supervising a service
# pinned to GPU 0: its plan, its status and metrics with real readings, and the launched
# process's CUDA_VISIBLE_DEVICES. Results go to $OUT (default /tmp/device-check).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,uuid,power.limit,power.default_limit --format=csv | tee "$OUT/nvidia-smi.csv"
"$PY" scripts/nvml_check.py | tee "$OUT/nvml_check.json"
T=$(mktemp -d)
cat > "$T/config.toml" <<CONF
[supervisor]
control_socket = "$T/ctl.sock"
state_dir = "$T/state"
log_format = "text"
[metrics]
listen = "127.0.0.1:19468"
[gpu]
backend = "nvml"
poll_interval_s = 0.5
[[service]]
name = "pinned"
command = ["$PY", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
port = 18080
gpus = [0]
[service.health]
url = "http://127.0.0.1:{port}/"
interval_s = 1
timeout_s = 1
CONF
"$PY" -m supervisord_llm --config "$T/config.toml" --check | tee "$OUT/check.txt"
"$PY" -m supervisord_llm --config "$T/config.toml" > "$OUT/daemon.log" 2>&1 &
D=$!
CTL=("$PY" -m supervisord_llm.ctl --socket "$T/ctl.sock")
for _ in $(seq 100); do "${CTL[@]}" status >/dev/null 2>&1 && break; sleep 0.1; done
for _ in $(seq 100); do
  "${CTL[@]}" --json status | grep -q '"state": "ready"' && break; sleep 0.1; done
sleep 1.2
"${CTL[@]}" status | tee "$OUT/status.txt"
"${CTL[@]}" --json status > "$OUT/status.json"
PID=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["services"][0]["pid"])' "$OUT/status.json")
tr '\0' '\n' < "/proc/$PID/environ" | grep -E '^CUDA_' | tee "$OUT/service_env.txt"
grep -E 'Cpus_allowed_list|Mems_allowed_list' "/proc/$PID/status" | tee -a "$OUT/service_env.txt"
"$PY" -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:19468/metrics").read().decode())' \
  | grep -E '^llm_supervisor_gpu_' > "$OUT/metrics.txt" || true
head -20 "$OUT/metrics.txt"
kill -TERM "$D"; wait "$D"; echo "daemon exit: $?"
tail -3 "$OUT/daemon.log"
