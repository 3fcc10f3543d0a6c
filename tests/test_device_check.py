"""tools/device_check.sh --cpu: every section of the device check runs at tiny sizes on CPU
and records numbers (the 2:4 kernels, CUDA only, are recorded as skipped)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from numbers import Number
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("matmul_2to4", "prox", "train_proximal", "train_minimax", "fsdp2",
            "compressed_loader", "compile")


def test_cpu_device_check_runs_every_section(tmp_path) -> None:
    out = tmp_path / "device_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "unused")}
    command = ["bash", str(ROOT / "tools" / "device_check.sh"), "--no-install", "--cpu",
               "--output", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "cpu" and set(result["sections"]) == set(SECTIONS)
    sections = result["sections"]
    for name, section in sections.items():
        assert "error" not in section, f"{name}: {section['error']}"
        assert isinstance(section["section_s"], Number)
    assert sections["matmul_2to4"]["skipped"].startswith("needs CUDA")
    for measured in sections["prox"]["results"]:
        assert measured["adamw_s"] > 0 and measured["backends"]
        assert all(b["median_s"] > 0 for b in measured["backends"].values())
    for name in ("train_proximal", "train_minimax", "fsdp2"):
        assert sections[name]["tokens_per_s"] > 0 and sections[name]["planned_total_bytes"] > 0
        assert sections[name]["mask_state_dtype"]
    assert 0 < sections["train_proximal"]["prox_share"] < 1
    assert sections["fsdp2"]["surrogates_sharded"] is True
    loader = sections["compressed_loader"]
    assert loader["export_s"] > 0 and loader["load_s"] > 0 and loader["dense_tokens_per_s"] > 0
    assert loader["file_over_dense"] < 1
    assert loader["semi_structured"] == "skipped: needs CUDA"
    compiled = sections["compile"]
    assert compiled["status"].startswith("compiled") and compiled["max_rel_error"] < 1e-2
    assert compiled["compiled_tokens_per_s"] > 0 and compiled["eager_tokens_per_s"] > 0
    assert f"wrote {out}" in done.stdout
    assert not (tmp_path / "unused").exists()  # --output wins over $OUT
