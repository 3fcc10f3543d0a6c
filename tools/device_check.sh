#!/usr/bin/env bash
# One prepared device check (docs/gpu.md): make lightning-prune importable without touching
# torch, then run tools/device_check.py (at most 8 minutes on one GPU). Arguments go to the .py.
#   bash tools/device_check.sh                  # CUDA; JSON to $OUT/ or bench_results/
#   bash tools/device_check.sh --cpu            # tiny, on CPU
#   bash tools/device_check.sh --no-install ... # never run pip
# PYTHON picks the interpreter that has torch (default: python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
INSTALL=1
ARGS=()
for arg in "$@"; do
  if [ "$arg" = "--no-install" ]; then INSTALL=0; else ARGS+=("$arg"); fi
done

# Installed means: the distribution with its entry points (architecture adapters, solvers), not
# just an importable folder. --no-deps keeps torch (and everything else) as it is.
if [ "$INSTALL" = 1 ] && ! "$PYTHON" -c "import importlib.metadata as m; m.distribution('lightning-prune')" 2>/dev/null; then
  # no index, no isolated build: nothing is fetched (device machines are offline); needs the
  # setuptools and wheel that are installed
  if ! "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --no-index \
      --no-build-isolation -e "$ROOT"; then
    echo "device_check.sh: could not install lightning-prune offline (needs setuptools>=68 and" \
      "wheel in $PYTHON's environment)" >&2
    exit 1
  fi
fi

cd "$ROOT"
# the .py guards its own budget (450 s); this is the hard stop should a kernel hang
exec timeout --signal=KILL 480 "$PYTHON" tools/device_check.py "${ARGS[@]+"${ARGS[@]}"}"
