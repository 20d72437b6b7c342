#!/usr/bin/env bash
# Build the ImageNet pair in one command: its own venv (.venv-imagenet, never a runtime
# dependency), then build.py. About 11 minutes on 2 cores (README.md here has the steps' times).
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PYTHON:-python3}
[ -x .venv-imagenet/bin/python ] || "$PY" -m venv .venv-imagenet
.venv-imagenet/bin/pip install -q --disable-pip-version-check -r models/recipes/imagenet/requirements.txt -e .
.venv-imagenet/bin/pip install -q --disable-pip-version-check --no-deps -r models/recipes/imagenet/requirements-nodeps.txt
exec .venv-imagenet/bin/python models/recipes/imagenet/build.py "$@"
