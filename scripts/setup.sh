#!/usr/bin/env bash
# Create .venv at the repository root and install lightning_logits with its pinned dependencies.
# Idempotent: a second run only checks that everything is installed (a few seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# requirements/constraints.txt pins every package (torch 2.14.1 + torchvision 0.29.1: the pair that
# imports together here) so a fresh machine and CI get the set the tests ran against.
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
  -c requirements/constraints.txt -e ".[dev]"
