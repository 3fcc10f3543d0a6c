"""ProxSparse (ICML 2025): proximal gradient on the N:M sparsity regularizer."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

from lightning_prune.contracts import SurrogateWeights
from lightning_prune.errors import ConfigError
from lightning_prune.solvers.base import (
    Solver,
    SolverHost,
    check_grad_clip,
    warmup_linear_decay,
)
from lightning_prune.solvers.distillation import Distillation


class ProximalSolver(Solver):
    """AdamW step on the smooth loss, then the exact prox of every non-smooth regularizer.

    The learning rate warms up linearly for ``warmup_ratio`` of the steps, then decays
    linearly to zero; in a block-wise fit this schedule restarts on every block (and for the
    end-to-end phase), and the prox applies to the learned block only.

    Args:
        lr: peak learning rate of the surrogate weights.
        lr_scale: ``absolute`` uses ``lr`` for every surrogate (the reference). ``weight_rms``
            gives each layer's surrogate ``lr · rms(W0)``: AdamW moves every weight by about its
            learning rate per step, so this makes a step the same share of each layer's weight
            scale, and one ``lr`` serves models whose weights differ in scale.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_ratio: share of the steps spent warming up.
        grad_clip: gradient-norm clipping before every step (``None`` turns it off).
        distill_weight: weight of ``KL(dense ‖ masked)`` added to the LM loss (0: off; an
            end-to-end term, so not used by the block-wise objective).
        distill_temperature: softmax temperature of the distillation term.
    """

    supports_blockwise = True

    def __init__(
        self,
        lr: float = 1e-4,
        lr_scale: Literal["absolute", "weight_rms"] = "absolute",
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.1,
        grad_clip: float | None = 1.0,
        distill_weight: float = 0.0,
        distill_temperature: float = 1.0,
    ):
        if not lr > 0:
            raise ConfigError(f"solver proximal.lr: expected a value > 0, got {lr}")
        if lr_scale not in ("absolute", "weight_rms"):
            raise ConfigError(
                f"solver proximal.lr_scale: expected 'absolute' or 'weight_rms', got {lr_scale!r}"
            )
        if not 0 <= warmup_ratio < 1:
            raise ConfigError(f"solver proximal.warmup_ratio: expected [0, 1), got {warmup_ratio}")
        self.lr, self.lr_scale = lr, lr_scale
        first, second = betas  # a list from a config file
        self.weight_decay, self.betas = weight_decay, (first, second)
        self.warmup_ratio = warmup_ratio
        self.grad_clip = check_grad_clip("proximal", grad_clip)
        self.distillation = Distillation("proximal", distill_weight, distill_temperature)

    def loss_terms(
        self, module: SolverHost, batch: dict[str, torch.Tensor], outputs: Any
    ) -> dict[str, torch.Tensor]:
        """``distill`` when ``distill_weight > 0``."""
        return self.distillation.terms(module, batch, outputs)

    def configure_optimizers(self, module: SolverHost) -> Any:
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("solver proximal: the mask family exposes no trainable parameters")
        optimizer = torch.optim.AdamW(
            self.param_groups(module, params), betas=self.betas, weight_decay=self.weight_decay
        )
        spans = module.schedule_spans()

        def factor(step: int) -> float:
            position, length = spans(step)
            return warmup_linear_decay(length, int(self.warmup_ratio * length))(position)

        scheduler = LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def param_groups(self, module: SolverHost, params: list) -> list[dict[str, Any]]:
        """One group at ``lr`` (``absolute``), or one per surrogate at ``lr · rms(W0)``."""
        if self.lr_scale == "absolute":
            return [{"params": params, "lr": self.lr}]
        family = module.mask_family
        scale = (
            {id(p.surrogate): p.w0_rms for p in family.surrogates().values()}
            if isinstance(family, SurrogateWeights)
            else {}
        )
        unscaled = [p for p in params if id(p) not in scale]
        if unscaled:
            raise ConfigError(
                "solver proximal.lr_scale: 'weight_rms' scales surrogate weights only, but "
                f"{len(unscaled)} trainable parameter(s) are not surrogates; use 'absolute'"
            )
        return [{"params": [p], "lr": self.lr * scale[id(p)]} for p in params]

    def after_optimizer_step(self, module: SolverHost) -> None:
        group = module.trainer.optimizers[0].param_groups[0]
        lr = self.lr * group["lr"] / group["initial_lr"]  # the base lr on its schedule
        proxes = [r for r in module.regularizers if r.has_prox]
        for family in module.whole_group_views() if proxes else ():  # the backend's views
            for regularizer in proxes:
                regularizer.prox_(family, lr)
