"""The proximal solver's learning-rate scaling (``lr_scale``) on a tiny real model."""

from __future__ import annotations

import pytest
import torch
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


def test_distillation_term_is_zero_at_the_teacher_and_trains_the_surrogates(small_model) -> None:
    """``distill_weight`` adds ``KL(dense ‖ masked)``: zero while the masks are off, positive
    once the surrogates left W0, with gradients on them; the teacher pass (masks off) leaves
    the mode as it was."""
    solver = ProximalSolver(distill_weight=0.5)
    module = PruningModule(NMMaskFamily(2, 4), solver, [], small_model)
    module.configure_model()
    tokens = torch.randint(0, 1000, (1, 16))
    family = module.mask_family
    family.set_mode("off")
    assert solver.loss_terms(module, {"input_ids": tokens}, module(tokens))["distill"] == 0
    family.set_mode("learn")
    for parametrization in family.parametrizations().values():
        parametrization.surrogate.data.mul_(0.5)  # the student now differs from the teacher
    term = solver.loss_terms(module, {"input_ids": tokens}, module(tokens))["distill"]
    assert term.item() > 1e-4
    term.backward()
    grads = [p.surrogate.grad for p in family.parametrizations().values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert ProximalSolver().loss_terms(module, {"input_ids": tokens}, None) == {}


@pytest.mark.parametrize(
    ("field", "value"), [("distill_weight", -1.0), ("distill_temperature", 0.0)]
)
def test_bad_distillation_settings_are_named(field, value) -> None:
    with pytest.raises(ConfigError, match=f"solver proximal.{field}: expected"):
        ProximalSolver(**{field: value})
