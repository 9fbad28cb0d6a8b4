#!/usr/bin/env bash
# Slow chaos and load tests (marked `slow`), then the benchmarks (writes BENCHMARKS.md).
# Set STUDIONOVA_TEST_POSTGRES_URL=postgresql+psycopg://user:pw@127.0.0.1/db to include PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/run_tests.sh --co -q >/dev/null  # installs .venv if needed
.venv/bin/python -m pip install -q -e '.[test,postgres]'
.venv/bin/python -m pytest -q -m slow "$@"
if [ -n "${STUDIONOVA_TEST_POSTGRES_URL:-}" ]; then
  # The same engine tests against PostgreSQL (same code, no SQLite tricks).
  .venv/bin/python -m pytest -q tests/test_store.py tests/test_jobs.py tests/test_generate.py
fi
.venv/bin/python -m tests.benchmarks.run_benchmarks
