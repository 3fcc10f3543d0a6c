#!/usr/bin/env bash
# Install everything, learn a 2:4 mask for the embedded default model on the embedded corpus,
# export it, and print a held-out perplexity table (dense vs magnitude 2:4 vs learned 2:4).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
RUN="${RUN:-$ROOT/runs/proxsparse_2of4}"
VENV="$VENV" bash "$ROOT/tools/install.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
CLI="$VENV/bin/lightning-prune"
CONFIGS=(--config "$ROOT/configs/proxsparse_2of4.yaml" --config "$ROOT/configs/proxsparse_2of4_weight_rms.yaml")
rm -rf "$RUN"
"$CLI" fit "${CONFIGS[@]}" --trainer.default_root_dir "$RUN"
CKPT="$(ls -t "$RUN"/lightning_logs/version_*/checkpoints/last.ckpt | head -1)"
"$CLI" export "${CONFIGS[@]}" --ckpt_path "$CKPT" --output_dir "$RUN/export-hf" --overwrite true
"$CLI" evaluate "${CONFIGS[@]}" --ckpt_path "$CKPT" --sources '[wikipedia, shakespeare]' \
  --baselines '[magnitude]' --exported "[$RUN/export-hf]" --output "$RUN/evaluation.json"
"$CLI" report "$RUN" --output "$RUN/report.html"
