"""MaskPrune-style minimax (our reconstruction): descent on masks, ascent on multipliers."""

from __future__ import annotations

from typing import Any

import torch

from lightning_prune.contracts import GatedUnits, UniformTargets, require
from lightning_prune.errors import ConfigError
from lightning_prune.solvers.base import Solver, SolverHost, check_grad_clip
from lightning_prune.solvers.distillation import Distillation


class MinimaxSolver(Solver):
    """One Adam optimizer, three parameter groups: gate logits and learned per-type targets are
    minimised, the Lagrange multipliers maximised (``maximize=True``: gradient ascent).

    The objective is the LM loss (optionally plus distillation against the dense model, computed
    with the masks switched off) plus the ``uniform_lagrangian`` regularizer. Targets ramp from
    dense to final during the first ``warmup_ratio`` of the steps; learned targets are projected
    back onto the parameter budget after every step. Base weights stay frozen.

    Args:
        lr: learning rate of the gate logits.
        lr_multipliers: learning rate of the multipliers (ascent).
        lr_targets: learning rate of the learned per-type targets (budget mode).
        warmup_ratio: share of the steps over which targets ramp from 1 to their final value.
        distill_weight: weight of ``KL(dense ‖ masked)`` added to the loss (0: off).
        distill_temperature: softmax temperature of the distillation term.
        grad_clip: gradient-norm clipping of all groups (``None``: off).
    """

    requires = (GatedUnits, UniformTargets)

    def __init__(
        self,
        lr: float = 0.2,
        lr_multipliers: float = 0.05,
        lr_targets: float = 0.01,
        warmup_ratio: float = 0.3,
        distill_weight: float = 0.0,
        distill_temperature: float = 1.0,
        grad_clip: float | None = None,
    ):
        for field, value in (
            ("lr", lr),
            ("lr_multipliers", lr_multipliers),
            ("lr_targets", lr_targets),
        ):
            if not value > 0:
                raise ConfigError(f"solver minimax.{field}: expected a value > 0, got {value}")
        if not 0 <= warmup_ratio <= 1:
            raise ConfigError(f"solver minimax.warmup_ratio: expected [0, 1], got {warmup_ratio}")
        self.lr, self.lr_multipliers, self.lr_targets = lr, lr_multipliers, lr_targets
        self.warmup_ratio = warmup_ratio
        self.grad_clip = check_grad_clip("minimax", grad_clip)
        self.distillation = Distillation("minimax", distill_weight, distill_temperature)
        self.warmup_steps = 0

    def configure_optimizers(self, module: SolverHost) -> Any:
        require("solver", self, module.mask_family, module.regularizers)
        family = gated_units(module)
        groups = [
            {"params": family.mask_parameters(), "lr": self.lr},
            {  # ascent without momentum: it turns as soon as the gap changes sign
                "params": family.multiplier_parameters(),
                "lr": self.lr_multipliers,
                "maximize": True,
                "betas": (0.0, 0.999),
            },
        ]
        if family.target_parameters():
            groups.append({"params": family.target_parameters(), "lr": self.lr_targets})
        total = max(int(module.trainer.estimated_stepping_batches), 1)
        self.warmup_steps = int(round(self.warmup_ratio * total))
        family.set_progress(self.progress(module.global_step))
        return torch.optim.Adam(groups, weight_decay=0.0)

    def progress(self, step: int) -> float:
        """Target ramp after ``step`` optimizer steps (1 once warm-up is over)."""
        return 1.0 if self.warmup_steps <= 0 else min(1.0, step / self.warmup_steps)

    def after_optimizer_step(self, module: SolverHost) -> None:
        family = gated_units(module)
        family.project_targets()
        family.set_progress(self.progress(module.global_step + 1))

    def loss_terms(
        self, module: SolverHost, batch: dict[str, torch.Tensor], outputs: Any
    ) -> dict[str, torch.Tensor]:
        """Extra loss terms of one training step: ``distill`` when ``distill_weight > 0``.

        Also sets the target ramp from the step counter, so a resumed fit uses the same targets.
        """
        gated_units(module).set_progress(self.progress(module.global_step))
        return self.distillation.terms(module, batch, outputs)

    def metrics(self, module: SolverHost) -> dict[str, float]:
        family = gated_units(module)
        values = {"target_progress": float(family.progress)}
        for kind, count in family.kept_counts().items():
            values[f"{kind}_final_count"] = float(count)
        return values


def gated_units(module: SolverHost) -> GatedUnits:
    """The host's mask family, which provides :class:`GatedUnits` (the solver ``requires`` it:
    checked when the run is assembled and again in ``configure_optimizers``)."""
    family = module.mask_family
    assert isinstance(family, GatedUnits), "the mask family provides no GatedUnits"
    return family
