#!/usr/bin/env bash
# Set up what llm-supervisor's demo and tests need on Debian 12 (run as root for apt):
#   - Debian packages: a C++ toolchain and CMake/Ninja (to build llama-server), python3-venv,
#     util-linux and systemd (the systemd tests run a private systemd as PID 1), nginx (in
#     front of the gates in tests and benchmarks), wrk (load generator), nut-server and
#     nut-client (a real upsd + dummy-ups for the power tests and the demo) and redis-server
#     (a real checkpoint target), prometheus (for promtool), podman and runc (engines in
#     containers);
#   - a virtual environment in .venv with the project and its test dependencies, and the
#     request path (the gate, the router) compiled in place with mypyc (setup.py; again
#     whenever its sources change: supervisord_llm/native.py);
#   - llama.cpp's llama-server, built once and cached (scripts/build-llama-server.sh).
# Prints nothing on stdout but the llama-server path; progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

apt_need=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  for p in cmake ninja-build g++ make util-linux bsdutils systemd procps curl \
           nut-server nut-client redis-server podman runc; do
    have_pkg "$p" || apt_need+=("$p")
  done
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || apt_need+=(nginx-light)
  command -v wrk >/dev/null || apt_need+=(wrk)
  command -v promtool >/dev/null || apt_need+=(prometheus)  # promtool checks engine metrics
  command -v "$PY" >/dev/null || apt_need+=(python3)
  "$PY" -c 'import ensurepip, venv' 2>/dev/null || apt_need+=(python3-venv)
  # Python's headers, to compile the request path
  "$PY" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(
    sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null || apt_need+=(python3-dev)
  if [ ${#apt_need[@]} -gt 0 ]; then
    echo "setup: apt-get install ${apt_need[*]}" >&2
    # another apt (unattended-upgrades, a second setup) may hold the locks: wait for it, up to
    # 10 minutes (install waits by DPkg::Lock::Timeout; update ignores that, so it is retried)
    for i in $(seq 1 120); do
      if out=$(apt-get update -qq 2>&1); then break; fi
      case "$out" in
        *"Could not get lock"*|*"Unable to lock"*)
          [ "$i" = 1 ] && echo "setup: waiting for another apt to finish ..." >&2
          [ "$i" = 120 ] && { echo "$out" >&2; exit 1; }
          sleep 5 ;;
        *) echo "$out" >&2; exit 1 ;;
      esac
    done
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
      --no-install-recommends \
      "${apt_need[@]}" >&2
  fi
fi

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "setup: Python 3.11 or newer is needed ($PY is $("$PY" -V 2>&1))" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv >&2
fi
stamp=.venv/.installed-$(cat pyproject.toml setup.py | sha256sum | cut -c1-16)
if [ ! -e "$stamp" ]; then
  echo "setup: pip install -e .[test]" >&2
  .venv/bin/python -m pip install -q --upgrade pip >&2
  # (editable, pure Python: compiled in place below, where the tests and the demo run it)
  LLM_SUPERVISOR_COMPILE=0 .venv/bin/python -m pip install -q -e '.[test]' >&2
  rm -f .venv/.installed-* && touch "$stamp"
fi
compiled() {
  env -u LLM_SUPERVISOR_PURE .venv/bin/python -c \
    'from supervisord_llm import native as n; raise SystemExit(not n.COMPILED)' 2>/dev/null
}
if ! compiled; then
  echo "setup: compiling the request path (mypyc, about half a minute)" >&2
  .venv/bin/python setup.py -q build_ext --inplace >&2
  compiled || echo "setup: the request path was not compiled; it runs as pure Python:" \
    "$(env -u LLM_SUPERVISOR_PURE .venv/bin/python -c \
       'from supervisord_llm import native as n; print(n.WHY)')" >&2
fi
PYTHON=.venv/bin/python scripts/build-llama-server.sh
