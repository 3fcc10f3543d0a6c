#!/usr/bin/env bash
# Install everything (tools/install.sh), lint, check for import cycles, type-check the package
# (mypy, configured in pyproject.toml) and run the test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
VENV="$VENV" bash "$ROOT/tools/install.sh"
cd "$ROOT"
"$VENV/bin/ruff" check .
"$VENV/bin/python" tools/check_imports.py
"$VENV/bin/mypy"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "$VENV/bin/python" -m pytest -q "$@"
