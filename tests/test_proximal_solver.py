"""The proximal solver's learning-rate scaling (``lr_scale``) on a tiny real model."""

from __future__ import annotations

import pytest
from lightning.pytorch import Trainer

from lightning_prune.data import CalibrationDataModule
from lightning_prune.errors import ConfigError
from lightning_prune.masks.nm import NMMaskFamily
from lightning_prune.module import PruningModule
from lightning_prune.solvers.proximal import ProximalSolver


def one_step(model: str, lr_scale: str) -> PruningModule:
    """One AdamW step (no warm-up, no prox) of every surrogate from W0."""
    module = PruningModule(
        NMMaskFamily(2, 4),
        ProximalSolver(lr=1e-2, lr_scale=lr_scale, warmup_ratio=0.0),
        [],
        model,
    )
    data = CalibrationDataModule(tokenizer=model, seq_len=32, num_samples=2, eval_tokens=64)
    trainer = Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    return module


def largest_moves(module: PruningModule) -> dict[str, tuple[float, float]]:
    """Per layer: the largest change of its surrogate in the step, and its W0's RMS."""
    family = module.mask_family
    originals = family.originals()
    return {
        name: (float((p.surrogate.detach() - originals[name]).abs().max()), p.w0_rms)
        for name, p in family.parametrizations().items()
    }


@pytest.mark.parametrize("lr_scale", ["absolute", "weight_rms"])
def test_first_adamw_step_moves_each_layer_by_its_learning_rate(small_model, lr_scale) -> None:
    # Adam's first step moves every weight with a nonzero gradient by about its lr
    moves = largest_moves(one_step(small_model, lr_scale))
    for name, (move, rms) in moves.items():
        expected = 1e-2 * (rms if lr_scale == "weight_rms" else 1.0)
        assert move == pytest.approx(expected, rel=1e-3), name
    scales = sorted(rms for _, rms in moves.values())
    assert scales[-1] > 2 * scales[0]  # the layers differ in scale, so the modes differ


def test_bad_lr_scale_is_named() -> None:
    with pytest.raises(ConfigError, match="proximal.lr_scale"):
        ProximalSolver(lr_scale="relative")
