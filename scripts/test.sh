#!/usr/bin/env bash
# Set up, then run every check CI runs: format, lint, types, and the test suite (doctests included).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
.venv/bin/ruff format --check lightning_logits tests benchmarks || exit 1
.venv/bin/ruff check lightning_logits tests benchmarks || exit 1
.venv/bin/mypy || exit 1
.venv/bin/python -m pytest tests lightning_logits "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$status"
