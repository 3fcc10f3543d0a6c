"""Gates of structured units: hard-concrete (L0) and a sigmoid score with straight-through top-k.

Hard-concrete (Louizos et al. 2018, as used by CoFi / Sheared-LLaMA): with ``u ~ U(0, 1)``,
``s = sigmoid((log u − log(1−u) + log α) / β)``, stretched to ``(l, r)`` and clipped to
``[0, 1]``. The probability that a gate is nonzero, ``sigmoid(log α − β·log(−l/r))``, is the
*expected score* whose sum is the expected kept count of a layer.

``uniform_topk`` keeps the same number of units in every row (layer), and optionally the same
number inside every group of a row (query heads of one KV head), which is what makes the
pruned model an ordinary smaller config.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "BETA",
    "LIMIT_L",
    "LIMIT_R",
    "deterministic_gate",
    "expected_score",
    "sample_hard_concrete",
    "straight_through_topk",
    "uniform_topk",
]

#: temperature β and stretch interval (l, r) of the hard-concrete distribution
BETA, LIMIT_L, LIMIT_R = 2.0 / 3.0, -0.1, 1.1
_EPS = 1e-6


def expected_score(
    log_alpha: Tensor, beta: float = BETA, limit_l: float = LIMIT_L, limit_r: float = LIMIT_R
) -> Tensor:
    """``P(gate > 0) = sigmoid(log α − β·log(−l/r))``, differentiable in ``log_alpha``."""
    return torch.sigmoid(log_alpha - beta * math.log(-limit_l / limit_r))


def sample_hard_concrete(
    log_alpha: Tensor,
    beta: float = BETA,
    limit_l: float = LIMIT_L,
    limit_r: float = LIMIT_R,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One reparametrised sample of the gates in ``[0, 1]`` (exact zeros and ones occur)."""
    u = torch.rand(
        log_alpha.shape, generator=generator, device=log_alpha.device, dtype=log_alpha.dtype
    ).clamp(_EPS, 1 - _EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (limit_r - limit_l) + limit_l).clamp(0.0, 1.0)


def deterministic_gate(
    log_alpha: Tensor, limit_l: float = LIMIT_L, limit_r: float = LIMIT_R
) -> Tensor:
    """The noise-free gate ``clip(sigmoid(log α)·(r − l) + l, 0, 1)``."""
    return (torch.sigmoid(log_alpha) * (limit_r - limit_l) + limit_l).clamp(0.0, 1.0)


def uniform_topk(scores: Tensor, keep: int, groups: int = 1) -> Tensor:
    """Bool mask keeping the ``keep`` highest scores of every row, ``keep // groups`` per group.

    ``scores`` is ``[..., units]``; the units of a row are split into ``groups`` equal,
    contiguous groups and every group keeps the same number. Ties go to the lower index.
    """
    units = scores.shape[-1]
    if groups < 1 or units % groups:
        raise ValueError(f"{units} units cannot be split into {groups} equal groups")
    if keep % groups or not 0 <= keep <= units:
        raise ValueError(f"keep={keep} is not a multiple of groups={groups} within [0, {units}]")
    per_group = keep // groups
    grouped = scores.detach().reshape(*scores.shape[:-1], groups, units // groups)
    # stable ordering: ties keep the lower index
    order = torch.sort(grouped, dim=-1, descending=True, stable=True).indices[..., :per_group]
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    mask.scatter_(-1, order, True)
    return mask.reshape(scores.shape)


def straight_through_topk(scores: Tensor, keep: int, groups: int = 1) -> Tensor:
    """Forward: the hard top-``keep`` mask (uniform per group); backward: the scores' gradient."""
    hard = uniform_topk(scores, keep, groups).to(scores.dtype)
    return hard + scores - scores.detach()
