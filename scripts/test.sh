#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine (as root): installs what the tests need
# (scripts/setup.sh), then runs ruff, mypy --strict and pytest (warnings are errors).
# Extra arguments go to pytest, e.g. scripts/test.sh -k llama
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_SERVER=$(scripts/setup.sh)
export LLAMA_SERVER LLM_SUPERVISOR_REQUIRE_E2E=1
echo "== ruff" >&2
.venv/bin/ruff check .
echo "== mypy --strict" >&2
.venv/bin/mypy
echo "== pytest" >&2
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
