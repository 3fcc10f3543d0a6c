"""The math of the one-shot baselines, on plain tensors (no model, no Lightning).

Weights are ``rows``: ``[out_features, in_features]`` (callers transpose GPT-2 ``Conv1D``
storage). Masks are bool, ``True`` = kept.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from lightning_prune.errors import ConfigError
from lightning_prune.ops.nm_prox import nm_topn_mask
from lightning_prune.ops.refit import mean_shift_bias


class InputStats:
    """Running statistics of one Linear's inputs (``[tokens, in_features]`` chunks).

    Args:
        hessian: also accumulate ``X^T X`` (``[in, in]``, float64) for SparseGPT.
    """

    def __init__(self, hessian: bool = False):
        self.with_hessian = hessian
        self.count = 0
        self.sum: Tensor | None = None
        self.sumsq: Tensor | None = None
        self.xtx: Tensor | None = None

    def update(self, x: Tensor) -> None:
        x = x.detach().double()
        if self.sum is None:
            width = x.shape[-1]
            self.sum = x.new_zeros(width)
            self.sumsq = x.new_zeros(width)
            if self.with_hessian:
                self.xtx = x.new_zeros(width, width)
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.sumsq += x.pow(2).sum(0)
        if self.with_hessian:
            self.xtx += x.t() @ x

    def norms(self) -> Tensor:
        """``||X_j||_2`` of every input column over all tokens."""
        return self.sumsq.sqrt()

    def mean(self) -> Tensor:
        return self.sum / max(self.count, 1)

    def variance(self) -> Tensor:
        """Per-column variance over tokens (FLAP's fluctuation of the input channel)."""
        if self.count < 2:
            return torch.zeros_like(self.sum)
        mean = self.mean()
        return ((self.sumsq - self.count * mean.pow(2)) / (self.count - 1)).clamp_min(0)


def keep_mask(scores: Tensor, n: int | None, m: int | None, sparsity: float | None) -> Tensor:
    """Keep the top scores: ``n`` of every ``m`` consecutive inputs, or the top ``1 - sparsity``
    share of every output row (unstructured, Wanda's per-output comparison group)."""
    if sparsity is not None:
        if not 0 <= sparsity < 1:
            raise ConfigError(f"sparsity: expected a share in [0, 1), got {sparsity}")
        keep = scores.shape[-1] - int(round(sparsity * scores.shape[-1]))
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :keep]
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True)
    return nm_topn_mask(scores, n, m)


def wanda_scores(rows: Tensor, norms: Tensor) -> Tensor:
    """Wanda's importance ``|W_ij| * ||X_j||_2`` (``norms``: one per input column)."""
    return rows.detach().float().abs() * norms.to(rows.device).float()[None, :]


def _inverse_hessian_factor(
    hessian: Tensor, percdamp: float, max_percdamp: float, name: str
) -> tuple[Tensor, float]:
    """Upper Cholesky factor of ``(H + damp I)^-1``; damping raised (with a warning) until
    ``H`` is positive definite or ``max_percdamp`` is passed."""
    mean_diag = hessian.diagonal().mean().item()
    damp = percdamp
    while True:
        damped = hessian.clone()
        damped.diagonal().add_(damp * mean_diag)
        factor, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                break
        raised = max(damp * 10, 0.01)
        if raised > max_percdamp:
            raise ConfigError(
                f"sparsegpt: the Hessian of '{name}' is singular even with percdamp={damp:g} "
                f"(max_percdamp={max_percdamp:g}); use more calibration data or raise "
                "max_percdamp"
            )
        warnings.warn(
            f"sparsegpt: Hessian of '{name}' is not positive definite with percdamp={damp:g}; "
            f"raised damping to percdamp={raised:g}",
            stacklevel=2,
        )
        damp = raised
    return upper, damp


@torch.no_grad()
def sparsegpt(
    rows: Tensor,
    hessian: Tensor,
    n: int | None = 2,
    m: int | None = 4,
    sparsity: float | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    max_percdamp: float = 10.0,
    name: str = "layer",
) -> tuple[Tensor, Tensor, float]:
    """SparseGPT (Frantar & Alistarh, 2023) on one weight: mask selection by the OBS saliency
    ``w^2 / [H^-1]_jj^2`` column block by column block, each pruned column's error spread over
    the columns not yet visited.

    Args:
        rows: ``[out, in]`` weight.
        hessian: ``X^T X`` of the layer's inputs (``[in, in]``; any positive scale).
        n, m: keep ``n`` of every ``m`` consecutive inputs (ignored when ``sparsity`` is set).
        sparsity: unstructured share to remove (chosen per column block, as the reference).
        blocksize: columns per lazy-update block (a multiple of ``m``).
        percdamp: diagonal damping as a share of the mean Hessian diagonal.
        max_percdamp: the most damping tried when the Hessian is singular.

    Returns:
        ``(mask, updated rows, percdamp used)``; the updated rows are zero outside the mask.
    """
    if sparsity is None and blocksize % m:
        raise ConfigError(f"sparsegpt.blocksize: {blocksize} is not a multiple of m={m}")
    weight = rows.detach().double().clone()
    h = hessian.detach().double().to(weight.device).clone()
    columns = weight.shape[1]
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    weight[:, dead] = 0
    hinv, used = _inverse_hessian_factor(h, percdamp, max_percdamp, name)
    mask = torch.ones_like(weight, dtype=torch.bool)
    for start in range(0, columns, blocksize):
        stop = min(start + blocksize, columns)
        block = weight[:, start:stop].clone()
        hinv_block = hinv[start:stop, start:stop]
        diag = hinv_block.diagonal()
        errors = torch.zeros_like(block)
        pruned = torch.zeros_like(block, dtype=torch.bool)
        if sparsity is not None:
            saliency = block.pow(2) / diag[None, :].pow(2)
            drop = int(saliency.numel() * sparsity)
            if drop:
                threshold = saliency.flatten().sort().values[drop - 1]
                pruned = saliency <= threshold
        for i in range(stop - start):
            if sparsity is None and i % m == 0:
                saliency = block[:, i : i + m].pow(2) / diag[i : i + m][None, :].pow(2)
                drop = torch.topk(saliency, m - n, dim=1, largest=False, sorted=False).indices
                pruned[:, i : i + m].scatter_(1, drop, True)
            column = block[:, i]
            kept = torch.where(pruned[:, i], 0.0, column)
            error = (column - kept) / diag[i]
            block[:, i:] -= error[:, None] * hinv_block[i, i:][None, :]
            block[:, i] = kept
            errors[:, i] = error
        weight[:, start:stop] = block
        weight[:, stop:] -= errors @ hinv[start:stop, stop:]
        mask[:, start:stop] = ~pruned
    return mask, (weight * mask).to(rows.dtype), used


def compensated_bias(rows: Tensor, bias: Tensor, mean: Tensor, kept: Tensor) -> Tensor:
    """FLAP's bias compensation: ``bias + W[:, pruned] @ mean(X)[pruned]``.

    Args:
        rows: ``[out, in]`` weight of the output projection.
        bias: its ``[out]`` output bias.
        mean: per-input-column mean of its calibration inputs, ``[in]``.
        kept: bool per input column, ``True`` = kept.
    """
    return mean_shift_bias(bias, mean, rows, rows * kept.to(rows.device)[None, :])


def unit_sums(column_scores: Tensor, units: int) -> Tensor:
    """Per-unit sums of per-input-column scores (a unit owns consecutive columns)."""
    return column_scores.reshape(units, -1).sum(-1)
