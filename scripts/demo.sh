#!/usr/bin/env bash
# The README's first command: set up, then run the whole loop on the shipped
# models and the Fashion-MNIST test split. Extra arguments go to `edge-infer demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/edge-infer demo "$@"
