#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine (as root): installs what the tests need
# (scripts/setup.sh), then runs ruff, mypy --strict and pytest (warnings are errors).
# Extra arguments go to pytest, e.g. scripts/test.sh -k llama
# LLM_SUPERVISOR_TEST_WORKERS=2 runs pytest in 2 pytest-xdist workers (off by default: CI
# runs it serially): a module's tests on one worker, the systemd and install labs on the
# same one (tests/conftest.py). The suite mostly waits on its daemons: 2 workers about
# halve it.
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_SERVER=$(scripts/setup.sh)
export LLAMA_SERVER LLM_SUPERVISOR_REQUIRE_E2E=1
echo "== ruff" >&2
.venv/bin/ruff check .
echo "== mypy --strict" >&2
.venv/bin/mypy
echo "== pytest" >&2
workers=()
if [ "${LLM_SUPERVISOR_TEST_WORKERS:-0}" != 0 ]; then
  workers=(-n "$LLM_SUPERVISOR_TEST_WORKERS" --dist loadgroup)
fi
exec .venv/bin/pytest -q -p no:cacheprovider "${workers[@]}" "$@"
