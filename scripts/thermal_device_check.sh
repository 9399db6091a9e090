#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and PyTorch, as root: the thermal policy on the real board.
# The daemon runs with gpu.backend = "nvml", a bf16 matmul load as one service and a gated
# HTTP service on the same GPU, and thresholds set just above the idle temperature so that the
# load triggers throttling. Recorded in $OUT (default /tmp/thermal-check):
#   - the policy's power-limit steps, in `nvidia-smi -q -d POWER` and in the board's power draw
#     (power.csv, one line a second), and in the daemon's log and status;
#   - the gate's admission factor lowered with them (status.json);
#   - the limit restored after SIGTERM, and after kill -9 of the daemon (and its guardian) at
#     the next start (limits.txt).
# Dependencies: if $WHEELS names a directory of wheels (no network on the lent machines), the
# project is installed from it into a venv first (pip download --python-version 3.12
# --only-binary=:all: -d wheels aiohttp httptools nvidia-ml-py prometheus-client psutil pyudev).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/thermal-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m venv --system-site-packages /tmp/thermal-venv
  /tmp/thermal-venv/bin/pip install -q --no-index --find-links "$WHEELS" .
  PY=/tmp/thermal-venv/bin/python
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
limit() { nvidia-smi --query-gpu=power.limit,power.default_limit --format=csv,noheader,nounits -i 0; }
echo "before: $(limit)" | tee "$OUT/limits.txt"
IDLE=$(nvidia-smi --query-gpu=temperature.gpu --format=csv,noheader,nounits -i 0)
T=$(mktemp -d)
cat > "$T/load.py" <<'LOAD'
import torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
while True:
    for _ in range(50):
        a = (a @ a).clamp_(-1, 1)
    torch.cuda.synchronize()
LOAD
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
[thermal]
warn_c = $((IDLE + 3))
throttle_c = $((IDLE + 5))
critical_c = 95
resume_c = $((IDLE + 1))
power_step = 0.1
min_power_fraction = 0.5
step_interval_s = 2
[[service]]
name = "load"
command = ["$PY", "$T/load.py"]
gpus = [0]
[[service]]
name = "api"
command = ["$PY", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
port = 18080
gpus = [0]
[service.health]
url = "http://127.0.0.1:{port}/"
interval_s = 1
timeout_s = 1
[service.gate]
listen = "127.0.0.1:19001"
max_concurrency = 20
CONF
CTL=("$PY" -m supervisord_llm.ctl --socket "$T/ctl.sock")
nvidia-smi --query-gpu=timestamp,temperature.gpu,power.draw,power.limit,clocks.sm,clocks_event_reasons.active \
  --format=csv -i 0 -l 1 > "$OUT/power.csv" &
SMI=$!
run_until_steps() {  # start the daemon; wait until the policy has taken N steps
  "$PY" -m supervisord_llm --config "$T/config.toml" >> "$OUT/daemon.log" 2>&1 &
  D=$!
  for _ in $(seq 600); do
    "${CTL[@]}" --json status > "$OUT/status.json" 2>/dev/null || true
    if "$PY" -c 'import json,sys; g=json.load(open(sys.argv[1]))["gpus"][0]; sys.exit(g.get("throttle_steps",0) < int(sys.argv[2]))' "$OUT/status.json" "$1" 2>/dev/null; then
      return 0
    fi
    sleep 0.5
  done
  echo "no throttle steps within 300 s" >&2; return 1
}
run_until_steps 3
nvidia-smi -q -d POWER -i 0 > "$OUT/power_while_throttled.txt"
"${CTL[@]}" status | tee "$OUT/status_throttled.txt"
echo "throttled: $(limit)" | tee -a "$OUT/limits.txt"
kill -TERM "$D"; wait "$D" || true
echo "after SIGTERM: $(limit)" | tee -a "$OUT/limits.txt"
run_until_steps 2
echo "throttled again: $(limit)" | tee -a "$OUT/limits.txt"
for p in $(pgrep -f _guardian.py); do kill -KILL "$p"; done
kill -KILL "$D"; wait "$D" || true
pkill -KILL -f "$T/load.py" || true
sleep 1
echo "after kill -9: $(limit)" | tee -a "$OUT/limits.txt"
"$PY" -m supervisord_llm --config "$T/config.toml" >> "$OUT/daemon.log" 2>&1 &
D=$!
for _ in $(seq 100); do "${CTL[@]}" status >/dev/null 2>&1 && break; sleep 0.2; done
echo "after the next start: $(limit)" | tee -a "$OUT/limits.txt"
kill -TERM "$D"; wait "$D" || true
kill "$SMI" || true
echo "at the end: $(limit)" | tee -a "$OUT/limits.txt"
grep -E "power limit|thermal|restored" "$OUT/daemon.log" | tail -40
