#!/usr/bin/env bash
# A self-contained demo, no GPU needed: llm-supervisor with two simulated GPUs supervising
# real llama.cpp model servers (generated tiny models). It shows `llmctl status`, a chat
# completion through the request gate, two models on demand behind one OpenAI endpoint (the
# router) swapping on a GPU too small for both, a crash (kill -9) and the automatic restart, the
# supervisor itself killed (its models adopted by the next one), a hot
# swap and a drain, API keys and the audit log switched on live, a hot GPU, a power cut on a real NUT server (upsd + dummy-ups) and the
# return of the power, then stops cleanly. With --keep it leaves the supervisor
# running for you to explore.
#
#   scripts/demo.sh          # run the tour, then stop
#   scripts/demo.sh --keep   # leave it running
#   scripts/demo.sh --stop   # stop what --keep left: the supervisor (its models with it) and the UPS
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=0
case "${1:-}" in
  --keep) KEEP=1 ;;
  --stop|"") ;;
  *) echo "usage: scripts/demo.sh [--keep | --stop]" >&2; exit 2 ;;
esac
RUN=$PWD/demo-run
if [ -t 1 ]; then B=$'\033[1m'; N=$'\033[0m'; else B=; N=; fi  # bold only on a terminal

stop_earlier() {  # a demo left by --keep: the supervisor, then its UPS (each only if it is one)
  local pidf=$RUN/daemon.pid p
  if [ -f "$pidf" ] && grep -qa 'supervisord_llm\|llm-supervisor' "/proc/$(cat "$pidf")/cmdline" 2>/dev/null; then
    echo "demo: stopping the demo supervisor (pid $(cat "$pidf"); its models stop with it)"
    kill "$(cat "$pidf")"
    for _ in $(seq 300); do kill -0 "$(cat "$pidf")" 2>/dev/null || break; sleep 0.1; done
  fi
  for p in model upsd driver; do
    pidf=$RUN/nut/$p.pid
    if [ -f "$pidf" ] && grep -qaE 'upsd|dummy-ups|ups_model' "/proc/$(cat "$pidf")/cmdline" 2>/dev/null; then
      kill "$(cat "$pidf")" 2>/dev/null || true
    fi
  done
}
if [ "${1:-}" = "--stop" ]; then
  stop_earlier
  echo "demo: stopped"
  exit 0
fi

# the set-up (the first run installs Debian packages, a .venv and builds llama-server): its
# output goes to a log; one line per step here, with the time since the start
mkdir -p "$RUN"
echo "demo: setting up (log: demo-run/setup.log; the first run takes 6-12 minutes on 2 cores)"
T0=$SECONDS
if ! LLAMA_SERVER=$(scripts/setup.sh 2> >(tee "$RUN/setup.log" | \
      grep --line-buffered -E '^(setup|build-llama-server):' | \
      while IFS= read -r line; do printf '  [%3d s] %s\n' $((SECONDS - T0)) "$line"; done >&2)); then
  echo "demo: the set-up failed; the end of demo-run/setup.log:" >&2
  tail -30 "$RUN/setup.log" >&2
  exit 1
fi
echo "demo: set up in $((SECONDS - T0)) s"
stop_earlier
[ -f "$RUN/tiny.gguf" ] || .venv/bin/python tests/make_tiny_gguf.py "$RUN/tiny.gguf" >/dev/null
[ -f "$RUN/writer.gguf" ] || .venv/bin/python tests/make_tiny_gguf.py "$RUN/writer.gguf" \
  --embd 96 --layers 3 >/dev/null

free_port() {  # below the ephemeral range, none of "$@"
  .venv/bin/python -c 'import sys; from supervisord_llm.ports import pick_free_port
print(pick_free_port(set(map(int, sys.argv[1:]))))' "$@"
}
P1=$(free_port); P2=$(free_port "$P1"); PM=$(free_port "$P1" "$P2"); PG=$(free_port "$P1" "$P2" "$PM")
PU=$(free_port "$P1" "$P2" "$PM" "$PG")
PR=$(free_port "$P1" "$P2" "$PM" "$PG" "$PU"); P3=$(free_port "$P1" "$P2" "$PM" "$PG" "$PU" "$PR")
P4=$(free_port "$P1" "$P2" "$PM" "$PG" "$PU" "$PR" "$P3")

# A real NUT server: upsd with the dummy-ups driver, whose file scripts/ups_model.py keeps
# writing (battery.runtime follows what the simulated GPUs draw; OL/OB from $RUN/ups-control).
NUT=$RUN/nut
rm -rf "$NUT"; mkdir -p "$NUT/etc" "$NUT/state"; chmod 0700 "$NUT/state"
printf '[dummy]\n  driver = dummy-ups\n  port = %s\n  mode = dummy-once\n  pollinterval = 1\n' \
  "$NUT/etc/dummy.dev" > "$NUT/etc/ups.conf"
echo "LISTEN 127.0.0.1 $PU" > "$NUT/etc/upsd.conf"
: > "$NUT/etc/upsd.users"
chmod 0600 "$NUT/etc/ups.conf" "$NUT/etc/upsd.conf" "$NUT/etc/upsd.users"
printf 'ups.status: OL\nbattery.charge: 100\nbattery.runtime: 1200\n' > "$NUT/etc/dummy.dev"
echo OL > "$RUN/ups-control"

cat > "$RUN/config.toml" <<EOF
# llm-supervisor demo: simulated GPUs, real llama.cpp servers on a tiny random model.
[supervisor]
control_socket = "$RUN/control.sock"
state_dir = "$RUN/state"
log_format = "text"

[metrics]
listen = "127.0.0.1:$PM"

[router]                             # one OpenAI endpoint for every model, by "model"
listen = "127.0.0.1:$PR"

[audit]                              # one JSON line per request
path = "$RUN/audit.log"

[gpu]
backend = "sim"
poll_interval_s = 1.0
sim_state_file = "$RUN/sim-gpus.json"
[thermal]                            # relative to the GPU's slowdown (89 C): throttle at 85 C
step_interval_s = 1

[power]                              # a real upsd on loopback, with the dummy-ups driver
source = "nut"
ups = "dummy@127.0.0.1:$PU"
poll_interval_s = 0.5
on_battery_grace_s = 6               # short for the demo (default 20)
drain_timeout_s = 10
stop_timeout_s = 10

[[checkpoint]]                       # stands in for a vector store's snapshot
name = "rag-store"
kind = "command"
command = ["sh", "-c", "date -u +%FT%TZ > $RUN/rag-store.snapshot && sync"]
timeout_s = 5

[[gpu.sim]]
uuid = "GPU-5a1e0000-0000-4000-8000-000000000000"
name = "Simulated RTX 6000 Ada"
pci_bus_id = "00000000:41:00.0"
numa_node = 0
memory_total_bytes = 103079215104
default_power_limit_w = 300
min_power_limit_w = 150
slowdown_c = 89
shutdown_c = 95
[[gpu.sim]]
uuid = "GPU-5a1e0000-0000-4000-8000-000000000001"
name = "Simulated Radeon PRO W7900"
pci_bus_id = "00000000:c1:00.0"
vendor = "amd"
numa_node = -1
memory_total_bytes = 51539607552
default_power_limit_w = 295
min_power_limit_w = 150

[[service]]
name = "chat"
command = ["$LLAMA_SERVER", "-m", "$RUN/tiny.gguf", "--host", "127.0.0.1", "--port", "{port}",
           "-c", "1024", "-t", "1", "--no-webui"]
port = $P1
gpus = [0]
[service.health]
interval_s = 1
timeout_s = 1
failures = 3
startup_timeout_s = 60
[service.restart]
backoff_initial_s = 0.5
[service.gate]                 # clients use the gate: it drains, limits and hot-swaps
listen = "127.0.0.1:$PG"
max_concurrency = 4

[[service]]
name = "embed"
command = ["$LLAMA_SERVER", "-m", "$RUN/tiny.gguf", "--host", "127.0.0.1", "--port", "{port}",
           "-c", "512", "-t", "1", "--no-webui", "--embeddings"]
port = $P2
gpus = ["GPU-5a1e0000-0000-4000-8000-000000000001"]
vram_gb = 8
[service.health]
interval_s = 1
timeout_s = 1

# two models on demand on the 48 GiB card beside embed: 30 GiB each, so only one at a time
[[service]]
name = "coder"
models = ["coder-30b"]
start = "on-demand"
vram_gb = 30
idle_stop_s = 600
command = ["$LLAMA_SERVER", "-m", "$RUN/tiny.gguf", "--host", "127.0.0.1", "--port", "{port}",
           "-c", "512", "-t", "1", "--no-webui"]
port = $P3
gpus = [1]
[service.health]
interval_s = 0.5
timeout_s = 0.5

[[service]]
name = "writer"
models = ["writer-70b", "writer"]
start = "on-demand"
vram_gb = 30
command = ["$LLAMA_SERVER", "-m", "$RUN/writer.gguf", "--host", "127.0.0.1", "--port", "{port}",
           "-c", "512", "-t", "1", "--no-webui"]
port = $P4
gpus = [1]
[service.health]
interval_s = 0.5
timeout_s = 0.5
EOF
rm -f "$RUN/sim-gpus.json"

LLM=.venv/bin/llm-supervisor
CTL=(.venv/bin/llmctl --socket "$RUN/control.sock")
say() { printf '\n%s== %s%s\n' "$B" "$*" "$N"; }

[ -x /lib/nut/upsd ] || { echo "demo: /lib/nut/upsd missing (apt-get install nut-server)" >&2; exit 1; }
NUT_CONFPATH=$NUT/etc NUT_STATEPATH=$NUT/state /lib/nut/dummy-ups -a dummy -F -u root \
  >"$NUT/driver.log" 2>&1 &
echo $! > "$NUT/driver.pid"
for _ in $(seq 100); do [ -S "$NUT/state/dummy-ups-dummy" ] && break; sleep 0.1; done
NUT_CONFPATH=$NUT/etc NUT_STATEPATH=$NUT/state /lib/nut/upsd -F -u root >"$NUT/upsd.log" 2>&1 &
echo $! > "$NUT/upsd.pid"
.venv/bin/python scripts/ups_model.py --device "$NUT/etc/dummy.dev" --control "$RUN/ups-control" \
  --battery-wh 150 --base-w 150 --socket "$RUN/control.sock" >"$NUT/model.log" 2>&1 &
echo $! > "$NUT/model.pid"
stop_nut() {
  local p
  for p in model upsd driver; do
    if [ -f "$NUT/$p.pid" ]; then kill "$(cat "$NUT/$p.pid")" 2>/dev/null || true; fi
  done
}
for _ in $(seq 100); do
  [ "$(upsc "dummy@127.0.0.1:$PU" ups.status 2>/dev/null)" = OL ] && break; sleep 0.1
done

say "llm-supervisor --check (the resolved plan)"
"$LLM" --config "$RUN/config.toml" --check

say "starting llm-supervisor (log: demo-run/daemon.log)"
"$LLM" --config "$RUN/config.toml" >"$RUN/daemon.log" 2>&1 &
echo $! > "$RUN/daemon.pid"
disown  # (its kill -9 below is the demo's, not news for the shell)
cleanup() {
  if [ "$KEEP" = 0 ] && kill -0 "$(cat "$RUN/daemon.pid")" 2>/dev/null; then
    kill "$(cat "$RUN/daemon.pid")"
    for _ in $(seq 300); do kill -0 "$(cat "$RUN/daemon.pid")" 2>/dev/null || break; sleep 0.1; done
  fi
  if [ "$KEEP" = 0 ]; then stop_nut; fi
}
trap cleanup EXIT

ready() {  # every service that is not waiting for its first request (on demand) is ready
  for _ in $(seq 300); do
    n=$("${CTL[@]}" --json status 2>/dev/null | .venv/bin/python -c \
      'import json,sys; print(all(s["state"]=="ready" or "idle" in s["holds"] for s in json.load(sys.stdin)["services"]))' \
      2>/dev/null || echo False)
    [ "$n" = True ] && return 0
    sleep 0.1
  done
  echo "demo: services did not become ready; see $RUN/daemon.log" >&2; tail -20 "$RUN/daemon.log" >&2
  return 1
}
ready
say "llmctl status"
"${CTL[@]}" status

say "a chat completion through the gate (127.0.0.1:$PG) to llama-server (random weights: junk text)"
curl -s "http://127.0.0.1:$PG/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"messages":[{"role":"user","content":"hello"}],"max_tokens":12}' \
  | .venv/bin/python -c 'import json,sys; r=json.load(sys.stdin); c=r["choices"][0]; print("finish_reason:", c["finish_reason"], "| tokens:", r["usage"]["completion_tokens"], "| text:", repr(c["message"]["content"][:60]))'

say "one endpoint for every model: the router (127.0.0.1:$PR) routes by \"model\""
curl -s "http://127.0.0.1:$PR/v1/models" | .venv/bin/python -c 'import json,sys
for m in json.load(sys.stdin)["data"]: print("  %-11s service %-7s %s (%s)" % (m["id"], m["service"], m["state"], m["start"]))'
ask() {
  curl -s -o /dev/null -w "  $1: HTTP %{http_code} in %{time_total} s\n" "http://127.0.0.1:$PR/v1/chat/completions" \
    -H 'Content-Type: application/json' -d "{\"model\":\"$1\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":4}"
}
echo "a request for coder-30b loads it (a cold start), then it answers at once:"
ask coder-30b; ask coder-30b
echo "writer-70b needs 30 GiB too: coder (idle) is stopped to make room, then writer loads:"
ask writer-70b
grep -E "coder: stopping to make room|writer: loaded in" "$RUN/daemon.log" | sed 's/^/  /'
curl -s -o /dev/null -w "  an unknown model: HTTP %{http_code}\n" "http://127.0.0.1:$PR/v1/chat/completions" \
  -H 'Content-Type: application/json' -d '{"model":"gpt-9","messages":[]}'
"${CTL[@]}" status | sed -n '/^router:/,/^$/p'

say "the front door, live: [auth] added by a reload, a key made by llmctl (its secret shown once)"
cp "$RUN/config.toml" "$RUN/config.open.toml"
printf '\n[auth]\nkeys_file = "%s"\n' "$RUN/keys.toml" >> "$RUN/config.toml"
"${CTL[@]}" reload >/dev/null
SECRET=$("${CTL[@]}" key new demo --rpm 60 | sed -n 's/^secret: //p')
echo "  llmctl key new demo --rpm 60 -> ${SECRET:0:12}..."
door() {
  curl -s -o /dev/null -w "  $1: HTTP %{http_code}\n" "http://127.0.0.1:$PR/v1/chat/completions" \
    -H 'Content-Type: application/json' "${@:2}" \
    -d '{"model":"coder-30b","messages":[{"role":"user","content":"hi"}],"max_tokens":4}'
}
door "no key"
door "a wrong key" -H "Authorization: Bearer sk-wrong"
door "the key" -H "Authorization: Bearer $SECRET"
curl -s -o /dev/null -w "  an engine's admin path (POST /slots/0?action=erase): HTTP %{http_code}\n" \
  "http://127.0.0.1:$PG/slots/0?action=erase" -H "Authorization: Bearer $SECRET" -d '{}'
"${CTL[@]}" key list | sed 's/^/  /'
sleep 0.3
echo "  the audit log ($RUN/audit.log), its last line:"
tail -1 "$RUN/audit.log" | sed 's/^/  /'
mv "$RUN/config.open.toml" "$RUN/config.toml"
"${CTL[@]}" reload >/dev/null  # (the rest of the demo without keys)

PID=$("${CTL[@]}" --json status chat | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["services"][0]["pid"])')
say "kill -9 $PID (the chat server crashes); llm-supervisor restarts it"
kill -9 "$PID"
sleep 0.3
ready
"${CTL[@]}" status chat | sed -n '3,4p'

say "kill -9 of llm-supervisor itself: the models keep running; a new one adopts them"
pids() { "${CTL[@]}" --json status | .venv/bin/python -c 'import json,sys
print(" ".join("%s=%s" % (s["name"], s["pid"]) for s in json.load(sys.stdin)["services"] if s["pid"]))'; }
echo "  before: $(pids)"
kill -9 "$(cat "$RUN/daemon.pid")"
sleep 0.2
"$LLM" --config "$RUN/config.toml" >>"$RUN/daemon.log" 2>&1 &
echo $! > "$RUN/daemon.pid"
disown
ready
echo "  after:  $(pids)   (the same: adopted, no model reloaded)"
grep -E "re-attached to" "$RUN/daemon.log" | tail -1 | sed 's/^/  /'

say "llmctl swap chat: a second instance, the gate switches to it, the old one stops"
"${CTL[@]}" swap chat
say "llmctl drain chat: the gate closes to new requests (503) and waits for in-flight ones"
"${CTL[@]}" drain chat --timeout 10
curl -s -o /dev/null -w "a new request now gets HTTP %{http_code}\n" "http://127.0.0.1:$PG/v1/models"
"${CTL[@]}" resume chat

say "GPU0 heats up to 86C (written to the sim state file, re-read at every poll): throttled"
echo '{"GPU-5a1e0000-0000-4000-8000-000000000000": {"temperature_c": 86, "power_w": 291, "utilization_pct": 97, "memory_used_bytes": 61000000000}}' > "$RUN/sim-gpus.json"
sleep 2.5
"${CTL[@]}" status | sed -n '/^GPU/,/^$/p'
"${CTL[@]}" --json status | .venv/bin/python -c 'import json,sys; g=json.load(sys.stdin)["gpus"][0]; print("GPU0: %(thermal_state)s, power limit %(power_limit_w)g W of %(default_power_limit_w)g W, %(throttle_steps)d steps, admission factor %(admission_factor)s" % g)'
grep -E "GPU0 thermal|GPU0: power limit" "$RUN/daemon.log" | sed 's/^/  /'
say "GPU0 cools to 60C: the steps are undone, one a second, up to 300 W"
echo '{"GPU-5a1e0000-0000-4000-8000-000000000000": {"temperature_c": 60}}' > "$RUN/sim-gpus.json"
sleep 4
"${CTL[@]}" status | sed -n '/^GPU/,/^$/p'

say "a power cut: the UPS goes on battery (its runtime follows what the GPUs draw)"
echo '{"GPU-5a1e0000-0000-4000-8000-000000000000": {"power_w": 280, "utilization_pct": 95}, "GPU-5a1e0000-0000-4000-8000-000000000001": {"power_w": 280, "utilization_pct": 95}}' > "$RUN/sim-gpus.json"
runtime() { upsc "dummy@127.0.0.1:$PU" battery.runtime 2>/dev/null; }
mode_is() {
  for _ in $(seq "$2"); do
    "${CTL[@]}" --json status | grep -q "\"mode\": \"$1\"" && return 0; sleep 0.1
  done
  echo "demo: mode $1 not reached; see $RUN/daemon.log" >&2; return 1
}
sleep 2.5
echo "GPUs drawing 280 W each: the UPS would run $(runtime) s on its battery"
echo "OB DISCHRG" > "$RUN/ups-control"
mode_is on_battery 50
sleep 2.5
"${CTL[@]}" status | sed -n '/^GPU/,/^$/p'
echo "on battery: every GPU capped at 60 % of its default (180 W): the UPS now reports $(runtime) s"
echo "riding it out for on_battery_grace_s (6 s); then drain, checkpoint, stop"
mode_is powered_down 300
"${CTL[@]}" status | sed -n '/^power:/,$p'
echo "the rag-store snapshot: $(cat "$RUN/rag-store.snapshot")"
say "the power returns (OL): the services start again; the gates open when they are ready"
echo "OL CHRG" > "$RUN/ups-control"
echo '{}' > "$RUN/sim-gpus.json"  # the load is gone with the models: the GPUs idle again
ready
"${CTL[@]}" status | sed -n '1,4p'
curl -s -o /dev/null -w "a chat through the gate again: HTTP %{http_code}\n" \
  "http://127.0.0.1:$PG/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"messages":[{"role":"user","content":"hello"}],"max_tokens":4}'

say "Prometheus metrics at http://127.0.0.1:$PM/metrics (a few of them)"
curl -s "http://127.0.0.1:$PM/metrics" | grep -E '^llm_supervisor_(service_up|service_restarts_total\{reason="exit"|gpu_temperature_celsius|gate_requests_total|gpu_throttle_actions_total\{.*power|ups_battery_runtime|power_events_total\{event="power_down"|checkpoint_runs_total\{.*ok|model_loaded|model_swaps_total|model_cold_starts_total)'

if [ "$KEEP" = 1 ]; then
  say "llm-supervisor keeps running (pid $(cat "$RUN/daemon.pid"))"
  echo "  .venv/bin/llmctl --socket $RUN/control.sock status"
  echo "  .venv/bin/llmctl --socket $RUN/control.sock restart chat"
  echo "  curl http://127.0.0.1:$PR/v1/models   (the router: one endpoint for every model)"
  echo "  a power cut: echo 'OB DISCHRG' > $RUN/ups-control (and OL to end it)"
  echo "  stop it all (the supervisor, its models and the demo's UPS): scripts/demo.sh --stop"
else
  say "stopping llm-supervisor (SIGTERM: services stop in reverse order)"
  cleanup
  tail -4 "$RUN/daemon.log"
  echo "(run scripts/demo.sh --keep to leave it running)"
fi
