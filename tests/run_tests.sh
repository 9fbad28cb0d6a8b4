#!/usr/bin/env bash
# The README's test command: create .venv if needed, install StudioNOVA with its test extras, run pytest.
# Extra arguments go to pytest (e.g. `bash tests/run_tests.sh -k jobs`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q -e '.[test]'
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
.venv/bin/lint-imports --no-cache --no-logo  # the layering contracts in pyproject.toml
exec .venv/bin/python -m pytest -q "$@"
