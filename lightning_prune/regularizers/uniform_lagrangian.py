"""The uniform-width Lagrangian of the minimax solver (MaskPrune, our reconstruction)."""

from __future__ import annotations

import torch

from lightning_prune.contracts import GatedUnits
from lightning_prune.ops.lagrangian import lagrangian_terms
from lightning_prune.regularizers.base import Regularizer


class UniformLagrangian(Regularizer):
    """``Σ_{k,l} y1_{k,l}(ŝ_{k,l} − s_k) + y2_{k,l}(ŝ_{k,l} − s_k)²`` over unit types and layers.

    ``ŝ_{k,l}`` is layer ``l``'s expected kept share of unit type ``k`` and ``s_k`` the shared
    (ramped) target. The multipliers live in the mask family's gates; the ``minimax`` solver
    ascends on them while the loss (this term included) descends on the gate logits.
    """

    requires = (GatedUnits,)
    #: provides :class:`~lightning_prune.contracts.UniformTargets`: this term carries the
    #: multipliers (what the minimax solver requires from the regularizers)
    enforces_uniform_targets = True

    def terms(self, family: GatedUnits) -> dict[str, torch.Tensor]:
        """The Lagrangian of every unit type, summed over layers (differentiable)."""
        values = {}
        for kind in family.kinds():
            y1, y2 = family.multipliers(kind)
            expected = family.expected_kept(kind)
            target = family.current_target(kind)
            values[kind] = lagrangian_terms(expected, target, y1, y2).sum()
        return values

    def penalty(self, family) -> torch.Tensor:
        return torch.stack(list(self.terms(family).values())).sum()

    @torch.no_grad()
    def metrics(self, family) -> dict[str, float]:
        values: dict[str, float] = {}
        for kind, term in self.terms(family).items():
            expected = family.expected_kept(kind)
            y1, y2 = family.multipliers(kind)
            values.update(
                {
                    f"lagrangian_{kind}": float(term),
                    f"{kind}_expected_mean": float(expected.mean()),
                    f"{kind}_expected_spread": float(expected.max() - expected.min()),
                    f"{kind}_target": float(family.current_target(kind)),
                    f"{kind}_final_target": float(family.final_target(kind)),
                    f"{kind}_y1_mean": float(y1.mean()),
                    f"{kind}_y2_mean": float(y2.mean()),
                }
            )
            for index, value in enumerate(expected.tolist()):
                values[f"{kind}_expected_l{index}"] = value
        return values
