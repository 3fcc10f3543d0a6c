"""fit → export → evaluate through the real CLI on the 2-layer truncated default model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_prune.cli import main
from lightning_prune.ops.nm_prox import is_nm

CONFIG = Path(__file__).parents[1] / "configs" / "proxsparse_2of4.yaml"


def fit_args(model: str, root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(CONFIG),
        f"--model.model={model}",
        "--data.seq_len=64",
        "--data.num_samples=6",
        "--data.eval_tokens=512",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def fitted(small_model, tmp_path_factory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp("run")
    main(fit_args(small_model, root, "--model.regularizers.init_args.lam=0.3"))
    ckpt = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    return small_model, root, ckpt


def test_fit_writes_small_checkpoint_with_learned_state(fitted) -> None:
    _, root, ckpt = fitted
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    keys = list(state["state_dict"])
    assert keys and all(k.endswith(".surrogate") for k in keys)
    assert len(keys) == 14  # 2 layers x 7 Linears
    assert state["lightning_prune"]["model_type"] == "llama"
    metrics = (root / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    for column in ("train/loss", "reg/nm_groups_done", "reg/NMSparsityRegularizer", "lr"):
        assert column in metrics.splitlines()[0], column


def test_validate_from_checkpoint_uses_the_hard_mask(fitted, capsys) -> None:
    model, _, ckpt = fitted
    main(["validate", "--config", str(CONFIG), f"--model.model={model}", "--data.seq_len=64",
          "--data.eval_tokens=512", f"--ckpt_path={ckpt}", "--trainer.enable_progress_bar=false"])
    assert "val/loss" in capsys.readouterr().out


def test_export_hf_is_2of4_and_loads_with_plain_transformers(fitted, tmp_path) -> None:
    model, root, ckpt = fitted
    out = tmp_path / "export"
    main(
        [
            "export",
            "--config",
            str(CONFIG),
            f"--model.model={model}",
            f"--ckpt_path={ckpt}",
            f"--output_dir={out}",
        ]
    )
    record = json.loads((out / "pruning.json").read_text())
    assert record["pattern"] == "2:4" and len(record["sparsity"]) == 14
    assert all(abs(v - 0.5) < 1e-6 for v in record["sparsity"].values())
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM as A;"
        f"m = A.from_pretrained({str(out)!r});"
        "assert 'lightning_prune' not in sys.modules;"
        "w = m.model.layers[0].mlp.down_proj.weight;"
        "print(float((w.view(w.shape[0], -1, 4) != 0).sum(-1).max()))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip().splitlines()[-1]) <= 2
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for layer in reloaded.model.layers:
        assert is_nm(layer.self_attn.q_proj.weight, 2, 4)
    with pytest.raises(SystemExit):  # refuses to overwrite without being told
        main(
            [
                "export",
                "--config",
                str(CONFIG),
                f"--model.model={model}",
                f"--ckpt_path={ckpt}",
                f"--output_dir={out}",
            ]
        )
    assert (out / "pruning.json").is_file()


def test_evaluate_reports_dense_baseline_and_learned(fitted, tmp_path) -> None:
    model, _, ckpt = fitted
    output = tmp_path / "eval.json"
    main(
        [
            "evaluate",
            "--config",
            str(CONFIG),
            f"--model.model={model}",
            "--data.seq_len=64",
            "--data.eval_tokens=512",
            f"--ckpt_path={ckpt}",
            "--sources=[wikipedia,shakespeare]",
            "--baselines=[magnitude]",
            f"--output={output}",
        ]
    )
    result = json.loads(output.read_text())
    rows = {row["model"].split(" ")[0]: row for row in result["rows"]}
    assert set(rows) == {"dense", "magnitude", "learned"}
    for row in rows.values():
        assert row["wikipedia"] > 1 and row["shakespeare"] > 1
    assert rows["dense"]["wikipedia"] < rows["magnitude"]["wikipedia"]
    protocol = result["protocol"][0]
    assert protocol["seq_len"] == 64 and protocol["tokens"] == 512
