"""Distillation against the dense model, shared by the solvers that learn end to end."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lightning_prune.errors import ConfigError
from lightning_prune.ops.lagrangian import distill_kl

if TYPE_CHECKING:
    from lightning_prune.solvers.base import SolverHost


class Distillation:
    """``weight · KL(dense ‖ masked)`` of temperature-softened next-token distributions.

    The teacher is the same model with its masks switched off (no second copy): one extra
    forward without gradient per step. With few calibration tokens the dense model's full
    distribution carries far more signal per token than the one-hot next token.

    Args:
        solver: the solver's name, for error messages.
        weight: weight of the term (0: off).
        temperature: softmax temperature of both distributions.
    """

    def __init__(self, solver: str, weight: float, temperature: float):
        if not weight >= 0:
            raise ConfigError(
                f"solver {solver}.distill_weight: expected a value >= 0, got {weight}"
            )
        if not temperature > 0:
            raise ConfigError(
                f"solver {solver}.distill_temperature: expected a value > 0, got {temperature}"
            )
        self.weight, self.temperature = float(weight), float(temperature)

    def terms(
        self, module: SolverHost, batch: dict[str, torch.Tensor], outputs: Any
    ) -> dict[str, torch.Tensor]:
        """``{"distill": term}`` for one training step, or nothing when the weight is 0."""
        if self.weight <= 0:
            return {}
        family, model = module.mask_family, module.model
        assert model is not None, "configure_model() loads the model"
        family.set_mode("off")
        try:
            with torch.no_grad():
                teacher = model(input_ids=batch["input_ids"]).logits
        finally:
            family.set_mode("learn")
        return {"distill": self.weight * distill_kl(outputs.logits, teacher, self.temperature)}
