"""tools/bench_quality.py on the 2-layer default model: rows measured by separate runs merge
into one JSON with their seconds, tokens and commit; other settings are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"
SMALL = ["--samples", "2", "--seq-len", "32", "--eval-tokens", "64", "--steps-per-block", "1"]


def bench(model: str, output: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "bench_quality.py", "--model", model, "--output", str(output)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*command, *args], cwd=TOOLS, env=env, capture_output=True, text=True, timeout=600
    )


def test_rows_from_separate_runs_merge(small_model, tmp_path) -> None:
    output = tmp_path / "quality.json"
    first = bench(small_model, output, *SMALL, "--rows", "wanda", "proximal-blockwise-w0")
    assert first.returncode == 0, first.stderr[-2000:]
    second = bench(small_model, output, *SMALL, "--rows", "dense", "minimax")
    assert second.returncode == 0, second.stderr[-2000:]
    result = json.loads(output.read_text())
    rows = {row["row"]: row for row in result["rows"]}
    assert list(rows) == ["dense", "wanda", "proximal-blockwise-w0", "minimax"]  # table order
    assert rows["dense"]["tokens"] == 0 and rows["wanda"]["tokens"] == 64  # one pass
    assert rows["proximal-blockwise-w0"]["tokens"] == 2 * 32  # 2 blocks × 1 step × 32 tokens
    for row in rows.values():
        assert row["wikipedia"] > 1 and row["shakespeare"] > 1 and row["commit"]
    assert result["structured_shape"]["intermediate_size"] < 1536
    other = bench(small_model, output, *SMALL[:-1], "2", "--rows", "dense")
    assert other.returncode != 0 and "other settings" in other.stderr
