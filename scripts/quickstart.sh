#!/usr/bin/env bash
# Set up, then train timm's resnet18 on the embedded digits data (the quickstart recipe).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lightning-logits fit --config recipes/quickstart.yaml "$@"
