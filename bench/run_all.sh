#!/usr/bin/env bash
# Rerun every benchmark and print one table, each figure beside its target (bench/run_all.py).
#   bench/run_all.sh           # the full forms, as docs/performance.md records them (~25 min)
#   bench/run_all.sh --quick   # shorter forms (~8 min)
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_SERVER=${LLAMA_SERVER:-$(scripts/setup.sh)}
export LLAMA_SERVER
exec .venv/bin/python bench/run_all.py "$@"
