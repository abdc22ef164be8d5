#!/usr/bin/env bash
# Set up, then run every check CI runs: format, lint, types, the docs build, and the test suite (doctests included).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
.venv/bin/ruff format --check lightning_logits tests benchmarks || exit 1
.venv/bin/ruff check lightning_logits tests benchmarks || exit 1
.venv/bin/mypy || exit 1
# The documentation site: a broken link, a page missing from the nav or an API reference that no
# longer resolves fails here (--strict; not with --quiet, which drops the warnings strict counts).
# Built into a temporary folder, never into the repository.
site_dir="$(mktemp -d)"
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir "$site_dir" || { rm -rf "$site_dir"; exit 1; }
rm -rf "$site_dir"
.venv/bin/python -m pytest tests lightning_logits "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$status"
