"""The uniform-width Lagrangian of MaskPrune (our reconstruction) and its target algebra.

Per layer ``l`` and unit type ``k`` (heads, channels) with expected kept fraction ``ŝ_{k,l}``
and one shared target ``s_k``::

    L_{k,l} = y1_{k,l} (ŝ_{k,l} − s_k) + y2_{k,l} (ŝ_{k,l} − s_k)²

minimised over the mask logits (and the targets, when they are learned under a parameter
budget), maximised over the multipliers ``y``. Targets ramp from 1 (dense) during warm-up.
"""

from __future__ import annotations

from typing import overload

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "distill_kl",
    "lagrangian_terms",
    "nearest_allowed",
    "project_to_budget",
    "ramped_target",
]


def lagrangian_terms(expected: Tensor, target: Tensor | float, y1: Tensor, y2: Tensor) -> Tensor:
    """``y1 (ŝ − s) + y2 (ŝ − s)²`` elementwise (one value per layer)."""
    gap = expected - target
    return y1 * gap + y2 * gap.pow(2)


@overload
def ramped_target(final: Tensor, progress: float) -> Tensor: ...
@overload
def ramped_target(final: float, progress: float) -> float: ...
def ramped_target(final: Tensor | float, progress: float) -> Tensor | float:
    """Linear ramp from 1 (keep everything) at ``progress`` 0 to ``final`` at 1 and after."""
    progress = min(max(float(progress), 0.0), 1.0)
    return 1.0 - progress * (1.0 - final)


def project_to_budget(
    values: Tensor,
    costs: Tensor,
    total: float,
    lower: Tensor,
    upper: Tensor,
    iterations: int = 100,
) -> Tensor:
    """Euclidean projection of ``values`` onto ``{s : Σ costs·s = total, lower ≤ s ≤ upper}``.

    The solution is ``clip(values − τ·costs, lower, upper)`` for the ``τ`` that meets the budget
    (found by bisection; the weighted sum is monotone in ``τ``). Raises ``ValueError`` when the
    box cannot meet ``total``.
    """
    values, costs = values.double(), costs.double()
    lower, upper = lower.double(), upper.double()
    low_sum, high_sum = float((costs * lower).sum()), float((costs * upper).sum())
    if not low_sum - 1e-9 <= total <= high_sum + 1e-9:
        raise ValueError(f"budget {total} is outside the reachable range [{low_sum}, {high_sum}]")

    def spend(tau: float) -> Tensor:
        return torch.minimum(torch.maximum(values - tau * costs, lower), upper)

    scale = float(costs.abs().max().clamp_min(1e-30))
    span = float((values.abs().max() + upper.abs().max() + lower.abs().max() + 1) / scale)
    lo_tau, hi_tau = -span, span  # spend(lo_tau) >= total >= spend(hi_tau)
    for _ in range(iterations):
        mid = 0.5 * (lo_tau + hi_tau)
        if float((costs * spend(mid)).sum()) > total:
            lo_tau = mid
        else:
            hi_tau = mid
    return spend(0.5 * (lo_tau + hi_tau))


def nearest_allowed(value: float, allowed: list[int]) -> int:
    """The allowed count closest to ``value`` (ties go to the larger count)."""
    if not allowed:
        raise ValueError("no allowed count")
    return min(allowed, key=lambda a: (abs(a - value), -a))


def distill_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Token-mean ``KL(teacher ‖ student)`` of temperature-softened distributions, times T²."""
    t = float(temperature)
    student = F.log_softmax(student_logits.float() / t, dim=-1).flatten(0, -2)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1).flatten(0, -2)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t
