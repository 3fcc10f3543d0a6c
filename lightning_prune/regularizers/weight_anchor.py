"""ProxSparse's optional frozen-weight regularizer (λ2)."""

from __future__ import annotations

import torch

from lightning_prune.contracts import SurrogateWeights, surrogates
from lightning_prune.errors import ConfigError
from lightning_prune.masks.base import MaskFamily
from lightning_prune.regularizers.base import Regularizer


class WeightAnchorRegularizer(Regularizer):
    """``λ2 · Σ (w (w − w0))² / (|w0| + ε)²``: keeps kept weights near W0, free to go to zero.

    Args:
        lam: strength λ2.
        eps: stabiliser ε of the denominator.
    """

    requires = (SurrogateWeights,)

    def __init__(self, lam: float = 0.0, eps: float = 1e-6):
        if not lam >= 0:
            raise ConfigError(f"regularizer weight_anchor.lam: expected a value >= 0, got {lam}")
        self.lam, self.eps = float(lam), float(eps)

    def penalty(self, family: MaskFamily) -> torch.Tensor:
        originals = family.originals()
        terms = []
        for name, parametrization in surrogates(family).items():
            w, w0 = parametrization.surrogate.float(), originals[name].detach().float()
            terms.append(((w * (w - w0)) ** 2 / (w0.abs() + self.eps) ** 2).sum())
        return self.lam * torch.stack(terms).sum()
