#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and PyTorch, as root: models outlive the supervisor on a real
# GPU. A service holds 1 GiB of GPU memory (PyTorch) and answers /health; the daemon launches
# it; kill -9 of the daemon leaves the same compute process with the same memory
# (nvidia-smi --query-compute-apps); a new daemon adopts it (same pid, "adopted"); its stop
# (SIGTERM, as `systemctl stop` sends) leaves no compute process. Results go to $OUT (default
# /tmp/keeper-device-check); exit 1 at the first check that fails. About a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/keeper-device-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
T=$(mktemp -d)
trap 'kill -9 ${D:-0} ${D2:-0} 2>/dev/null || true; pkill -9 -f "$T" 2>/dev/null || true; rm -rf "$T"' EXIT
cat > "$T/engine.py" <<'ENGINE'
import http.server, sys, torch
x = torch.ones(1 << 28, device="cuda")  # 1 GiB
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
ENGINE
cat > "$T/config.toml" <<CONF
[supervisor]
control_socket = "$T/ctl.sock"
state_dir = "$T/state"
log_format = "text"
adopt_grace_s = 60
[metrics]
listen = ""
[gpu]
backend = "nvml"
[[service]]
name = "holder"
command = ["$PY", "$T/engine.py", "{port}"]
port = 18081
gpus = [0]
[service.health]
url = "http://127.0.0.1:{port}/"
interval_s = 1
timeout_s = 2
startup_timeout_s = 120
CONF
CTL=("$PY" -m supervisord_llm.ctl --socket "$T/ctl.sock")
fail() { echo "FAILED: $*" | tee -a "$OUT/result.txt"; exit 1; }
apps() { nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits | sort; }
ready() {
  for _ in $(seq 600); do
    "${CTL[@]}" --json status 2>/dev/null | "$PY" -c \
      'import json,sys; s=json.load(sys.stdin)["services"][0]; sys.exit(0 if s["state"]=="ready" else 1)' \
      && return 0
    sleep 0.2
  done
  return 1
}
svc() { "${CTL[@]}" --json status | "$PY" -c "import json,sys; print(json.load(sys.stdin)['services'][0]['$1'])"; }
: > "$OUT/result.txt"
"$PY" -m supervisord_llm --config "$T/config.toml" > "$OUT/daemon1.log" 2>&1 & D=$!
ready || fail "not ready (daemon1.log)"
sleep 2  # the memory allocated and seen by NVML
PID=$(svc pid)
apps | tee "$OUT/apps_before.txt"
grep -q "^$PID," "$OUT/apps_before.txt" || fail "the engine $PID is not a compute process"
kill -9 "$D"; wait "$D" 2>/dev/null || true
sleep 2
apps | tee "$OUT/apps_after_kill.txt"
cmp -s "$OUT/apps_before.txt" "$OUT/apps_after_kill.txt" || fail "compute processes changed after kill -9"
"$PY" -m supervisord_llm --config "$T/config.toml" > "$OUT/daemon2.log" 2>&1 & D2=$!
T0=$(date +%s%N)
ready || fail "not ready after the restart (daemon2.log)"
echo "ready again $(( ($(date +%s%N) - T0) / 1000000 )) ms after the start (polled every 0.2 s)" \
  | tee -a "$OUT/result.txt"
[ "$(svc pid)" = "$PID" ] || fail "pid changed: $(svc pid) != $PID"
[ "$(svc adopted)" = "True" ] || fail "not adopted"
apps | tee "$OUT/apps_after_adopt.txt"
cmp -s "$OUT/apps_before.txt" "$OUT/apps_after_adopt.txt" || fail "compute processes changed"
kill -TERM "$D2"; wait "$D2" || fail "daemon exit $?"
apps | tee "$OUT/apps_after_stop.txt"
[ ! -s "$OUT/apps_after_stop.txt" ] || fail "compute processes left after the stop"
echo "ok: same compute process and memory after kill -9, adopted, nothing after the stop" \
  | tee -a "$OUT/result.txt"
