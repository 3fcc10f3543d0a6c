"""NaN/inf in the loss, a gradient or a mask is caught at its step, named, and never saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_prune.callbacks import NumericGuard
from lightning_prune.cli import main
from lightning_prune.errors import ConfigError

CONFIG = Path(__file__).parents[1] / "configs" / "proxsparse_2of4.yaml"
FIXTURES = Path(__file__).parent / "fixtures"
FAULT_STEP = 2


@pytest.fixture(autouse=True)
def fixtures_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))


def fit(root: Path, model: str, kind: str, on_fault: str = "stop") -> None:
    module = "model.model.layers.1.input_layernorm" if kind == "weight" else None
    overrides = root / "callbacks.yaml"
    fault = f"step: {FAULT_STEP}, kind: {kind}" + (f", module: {module}" if module else "")
    overrides.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {save_last: true, every_n_train_steps: 1}\n"
        "    - class_path: faults.InjectFault\n"
        f"      init_args: {{{fault}}}\n"
        "    - class_path: lightning_prune.callbacks.NumericGuard\n"
        f"      init_args: {{on_fault: {on_fault}}}\n"
    )
    main([
        "fit", f"--config={CONFIG}", f"--config={overrides}", f"--model.model={model}",
        "--model.init_mask=null", "--data.seq_len=32", "--data.num_samples=5",
        "--data.eval_tokens=64", f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
    ])


def last_checkpoint(root: Path) -> dict:
    (path,) = root.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_last_good_checkpoint(root: Path, step: int) -> None:
    checkpoint = last_checkpoint(root)
    assert checkpoint["global_step"] == step
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("weight", "the first non-finite output is from model.layers.1.input_layernorm"),
        ("grad", "gradient of model.layers.1.mlp.down_proj (weight.0."),
        ("mask", "mask parameter model.layers.1.mlp.down_proj (weight.0."),
    ],
)
def test_fault_stops_the_run_naming_the_layer(tmp_path, capsys, small_model, kind, message):
    with pytest.raises(SystemExit) as exit_info:
        fit(tmp_path, small_model, kind)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert f"step {FAULT_STEP}" in err or f"step {FAULT_STEP + 1}" in err, err
    # the checkpoint of the step before the fault is the newest, and it is finite
    assert_last_good_checkpoint(tmp_path, FAULT_STEP)


def test_skip_drops_the_faulty_step_and_finishes(tmp_path, small_model, recwarn):
    fit(tmp_path, small_model, "grad", on_fault="skip")
    checkpoint = last_checkpoint(tmp_path)
    assert checkpoint["global_step"] == 5
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())
    (guard,) = [v for k, v in checkpoint["callbacks"].items() if k == "NumericGuard"]
    assert guard == {"skipped": 1}
    assert any("NumericGuard: skipping the step" in str(w.message) for w in recwarn)


def test_guard_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="NumericGuard.on_fault"):
        NumericGuard(on_fault="ignore")
    with pytest.raises(ConfigError, match="NumericGuard.max_skips"):
        NumericGuard(max_skips=-1)


