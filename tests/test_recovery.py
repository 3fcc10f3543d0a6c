"""`lightning-prune recover`: LoRA or full fine-tuning of an export, merged, pruning kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_prune.cli import main
from lightning_prune.data.datamodule import CalibrationDataModule
from lightning_prune.evaluation import perplexity
from lightning_prune.export.hf import export_hf
from lightning_prune.export.structured import export_structured_hf
from lightning_prune.masks.nm import NMMaskFamily
from lightning_prune.masks.structured import UniformStructuredFamily
from lightning_prune.module import PruningModule
from lightning_prune.recovery import decoder_linear_weights
from lightning_prune.regularizers.nm_sparsity import NMSparsityRegularizer
from lightning_prune.regularizers.uniform_lagrangian import UniformLagrangian
from lightning_prune.solvers.minimax import MinimaxSolver
from lightning_prune.solvers.proximal import ProximalSolver


@pytest.fixture(scope="module")
def exports(small_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    structured = PruningModule(
        UniformStructuredFamily(keep_heads=0.67, keep_channels=0.5), MinimaxSolver(),
        [UniformLagrangian()], small_model,
    )
    structured.configure_model()
    export_structured_hf(structured, root / "structured")
    nm = PruningModule(NMMaskFamily(2, 4), ProximalSolver(), [NMSparsityRegularizer()], small_model)
    nm.configure_model()
    export_hf(nm, root / "nm")
    return {"structured": root / "structured", "nm": root / "nm"}


def recover(export: Path, out: Path, method: str, *extra: str) -> None:
    main([
        "recover", f"--model.export_dir={export}", f"--model.output_dir={out}",
        f"--model.method={method}", "--model.lr=1e-3", "--data.seq_len=64",
        "--data.num_samples=16", "--data.eval_tokens=512", "--trainer.max_epochs=1",
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={out.parent / (out.name + '-run')}", *extra,
    ])


def heldout_perplexity(folder: Path) -> float:
    data = CalibrationDataModule(tokenizer=str(folder), seq_len=64, eval_tokens=512)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return perplexity(model, data.heldout_windows())


def test_lora_recovery_of_a_structured_export(exports, tmp_path) -> None:
    out = tmp_path / "recovered"
    recover(exports["structured"], out, "lora", "--model.lora_rank=4")
    before = AutoModelForCausalLM.from_pretrained(exports["structured"])
    after = AutoModelForCausalLM.from_pretrained(out)
    assert after.config.to_dict()["intermediate_size"] == before.config.intermediate_size
    assert sum(p.numel() for p in after.parameters()) == sum(p.numel() for p in before.parameters())
    assert not any("lora" in name for name in after.state_dict())  # merged, plain model
    record = json.loads((out / "pruning.json").read_text())
    assert record["recovery"]["method"] == "lora" and record["recovery"]["steps"] == 16
    assert record["recovery"]["verification"]["lightning_prune_imported"] is False
    assert heldout_perplexity(out) < heldout_perplexity(exports["structured"])


def test_full_recovery_keeps_nm_zeros(exports, tmp_path) -> None:
    out = tmp_path / "recovered"
    recover(exports["nm"], out, "full", "--data.num_samples=4")
    before = decoder_linear_weights(AutoModelForCausalLM.from_pretrained(exports["nm"]))
    after = decoder_linear_weights(AutoModelForCausalLM.from_pretrained(out))
    changed = 0
    for name, weight in after.items():
        zeros = before[name] == 0
        assert torch.all(weight[zeros] == 0), name
        changed += int((weight != before[name]).any())
    assert changed == len(after)  # every linear layer was trained


def test_lora_on_nm_export_is_refused(exports, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        recover(exports["nm"], tmp_path / "out", "lora")
    assert "use method: full" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_recover_needs_an_export_folder(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        recover(tmp_path, tmp_path / "out", "full")
    assert "is not a lightning-prune export (no pruning.json)" in capsys.readouterr().err
