"""Closed-form least-squares refit of the kept weights under a fixed mask (plain tensors).

For one Linear with dense weight ``W0`` (``rows``: ``[out, in]``), input Gram matrix
``H = X^T X`` and a fixed bool mask ``M`` (``True`` = kept), every output row ``r`` with kept
inputs ``K`` gets

    w_r[K] = (Hd[K, K])^-1 (Hd[K, :] w0_r),    w_r[not K] = 0,

with ``Hd = H + λ I`` and ``λ = damping * mean(diag H)``. That minimises
``||X_K w_r[K] - X w0_r||^2 + λ ||w_r[K] - w0_r[K]||^2``: the kept weights reproduce the
dense row's output on the calibration inputs as well as they can, pulled towards their own
dense values by the damping. When the Linear has an output bias, the same fit with an
intercept uses the centred Gram matrix (:func:`centred_gram`) and moves the inputs' mean
contribution of what changed into the bias (:func:`mean_shift_bias`).

Two solvers: :func:`refit_rows` (every row its own ``K``, e.g. N:M) and
:func:`refit_columns` (one ``K`` shared by every row, e.g. removed heads or MLP channels).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: most elements of the per-row ``[rows, k, k]`` systems solved at once
CHUNK_ELEMENTS = 1 << 24
#: float64 refinement steps of the float32 per-row solves
REFINEMENTS = 2
#: largest relative residual (max norm, per row) accepted before a float64 solve
TOLERANCE = 1e-9


def damped_gram(gram: Tensor, damping: float) -> Tensor:
    """``H + damping * mean(diag H) * I`` in float64 (``H`` is not modified)."""
    if damping < 0:
        raise ValueError(f"damping: expected >= 0, got {damping}")
    damped = gram.detach().double().clone()
    damped.diagonal().add_(damping * damped.diagonal().mean())
    return damped


def centred_gram(gram: Tensor, total: Tensor, count: int) -> Tensor:
    """``sum_t (x_t - mean)(x_t - mean)^T`` from ``H = sum_t x_t x_t^T``, ``total = sum_t x_t``
    and the token ``count`` (the Gram matrix of a least-squares fit with an intercept)."""
    if count < 1:
        raise ValueError("centred_gram: needs at least one token")
    total = total.detach().double()
    return gram.detach().double() - torch.outer(total, total) / count


def mean_shift_bias(bias: Tensor, mean: Tensor, dense_rows: Tensor, new_rows: Tensor) -> Tensor:
    """``bias + (W0 - W) @ mean(X)``: the bias that keeps the layer's mean output on the
    calibration inputs when its weight changes from ``dense_rows`` to ``new_rows`` (both
    ``[out, in]``). With ``new_rows = W0 ⊙ M`` this is FLAP's compensation of pruned inputs."""
    change = dense_rows.detach().double() - new_rows.detach().to(dense_rows.device).double()
    shift = change @ mean.detach().to(dense_rows.device).double()
    return (bias.detach().double() + shift).to(bias.dtype)


def _triangular_solve(factor: Tensor, rhs: Tensor) -> Tensor:
    """``(L L^T)^-1 rhs`` from the lower Cholesky factors ``L`` (``[b, k, k]``, ``rhs``
    ``[b, k]``)."""
    half = torch.linalg.solve_triangular(factor, rhs[:, :, None], upper=False)
    return torch.linalg.solve_triangular(factor.mT, half, upper=True)[:, :, 0]


def _kept_product(damped: Tensor, index: Tensor, solution: Tensor) -> Tensor:
    """``Hd[K_r, K_r] x_r`` for every row ``r`` (kept indices ``index``, ``[b, k]``), by one
    dense float64 product instead of gathering the float64 systems."""
    full = solution.new_zeros(solution.shape[0], damped.shape[0]).scatter(1, index, solution)
    return (full @ damped).gather(1, index)


def _relative_residual(rhs: Tensor, residual: Tensor) -> Tensor:
    scale = rhs.abs().amax(1).clamp_min(torch.finfo(torch.float64).tiny)
    return residual.abs().amax(1) / scale


def _solve_kept(damped: Tensor, damped32: Tensor, index: Tensor, rhs: Tensor) -> Tensor:
    """Solve ``Hd[K_r, K_r] x_r = rhs_r`` for a chunk of rows: float32 Cholesky factors refined
    in float64 (at most ``REFINEMENTS`` steps); rows that do not reach ``TOLERANCE`` (or whose
    float32 factor fails) are solved again with float64 factors."""
    systems = damped32[index[:, :, None], index[:, None, :]]
    factor, info = torch.linalg.cholesky_ex(systems)
    solution = _triangular_solve(factor, rhs.float()).double()
    for _ in range(REFINEMENTS):
        residual = rhs - _kept_product(damped, index, solution)
        solution = solution + _triangular_solve(factor, residual.float()).double()
    residual = rhs - _kept_product(damped, index, solution)
    retry = (info != 0) | ~(_relative_residual(rhs, residual) <= TOLERANCE)
    if retry.any():
        chosen = index[retry]
        factor64, info64 = torch.linalg.cholesky_ex(damped[chosen[:, :, None], chosen[:, None, :]])
        if (info64 != 0).any():
            raise ValueError(
                "refit: the damped Gram matrix is not positive definite; raise the damping "
                "or use more calibration tokens"
            )
        solution[retry] = _triangular_solve(factor64, rhs[retry])
    return solution


@torch.no_grad()
def refit_rows(
    rows: Tensor,
    gram: Tensor,
    mask: Tensor,
    damping: float = 0.01,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Tensor:
    """Per-row least-squares refit of ``rows`` (``[out, in]``) under ``mask`` (bool, same
    shape), every row with its own kept inputs (N:M and unstructured masks).

    Rows are grouped by their kept count, and each group is solved in chunks of batched
    ``[rows, k, k]`` Cholesky systems (at most ``chunk_elements`` elements at once). Returns
    the refit weight in ``rows``' dtype, exactly zero outside ``mask``.
    """
    if mask.shape != rows.shape or gram.shape != (rows.shape[1], rows.shape[1]):
        raise ValueError(
            f"refit_rows: rows {tuple(rows.shape)}, mask {tuple(mask.shape)} and gram "
            f"{tuple(gram.shape)} do not fit together"
        )
    damped = damped_gram(gram, damping).to(rows.device)
    dense = rows.detach().double()
    mask = mask.to(rows.device, torch.bool)
    if damped.diagonal().max() == 0:  # no signal at all: nothing to fit
        return (dense * mask).to(rows.dtype)
    damped32 = damped.float()
    target = dense @ damped  # row r: Hd w0_r (Hd is symmetric)
    refit = torch.zeros_like(dense)
    counts = mask.sum(1)
    for k in counts.unique().tolist():
        if k == 0:
            continue
        members = (counts == k).nonzero().squeeze(1)
        # kept input indices of each row, ascending (a stable sort keeps True entries in order)
        kept = torch.sort((~mask[members]).to(torch.int8), dim=1, stable=True).indices[:, :k]
        step = max(1, chunk_elements // (k * k))
        for start in range(0, members.numel(), step):
            chunk, index = members[start : start + step], kept[start : start + step]
            solution = _solve_kept(damped, damped32, index, target[chunk].gather(1, index))
            refit[chunk] = refit.new_zeros(chunk.numel(), refit.shape[1]).scatter(
                1, index, solution
            )
    return refit.to(rows.dtype)


@torch.no_grad()
def refit_columns(rows: Tensor, gram: Tensor, kept: Tensor, damping: float = 0.01) -> Tensor:
    """Least-squares refit of ``rows`` (``[out, in]``) when every row keeps the same input
    columns ``kept`` (bool ``[in]``; removed heads or MLP channels): one solve for all rows.
    Returns the refit weight in ``rows``' dtype, exactly zero in the removed columns."""
    if kept.shape != (rows.shape[1],) or gram.shape != (rows.shape[1], rows.shape[1]):
        raise ValueError(
            f"refit_columns: rows {tuple(rows.shape)}, kept {tuple(kept.shape)} and gram "
            f"{tuple(gram.shape)} do not fit together"
        )
    damped = damped_gram(gram, damping).to(rows.device)
    dense = rows.detach().double()
    kept = kept.to(rows.device, torch.bool)
    refit = torch.zeros_like(dense)
    if not kept.any():
        return refit.to(rows.dtype)
    if damped.diagonal().max() == 0:
        return (dense * kept[None, :]).to(rows.dtype)
    system = damped[kept][:, kept]
    factor, info = torch.linalg.cholesky_ex(system)
    if info != 0:
        raise ValueError(
            "refit: the damped Gram matrix is not positive definite; raise the damping or use "
            "more calibration tokens"
        )
    refit[:, kept] = torch.cholesky_solve((dense @ damped)[:, kept].t(), factor).t()
    return refit.to(rows.dtype)
