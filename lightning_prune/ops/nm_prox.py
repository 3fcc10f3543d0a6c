"""N:M sparsity regulariser and its proximal operator (ProxSparse, EnumALM generalised).

A weight ``w`` of shape ``[..., cols]`` is split into *groups* of ``m`` consecutive entries along
the last dimension (``cols % m == 0``).  The ProxSparse regulariser of a group is the elementary
symmetric polynomial ``e_{n+1}(|w_g|)``, which is zero iff the group has at most ``n`` nonzeros.

All arithmetic runs in float32 (float64 inputs stay float64); results come back in the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "elementary_symmetric",
    "is_nm",
    "nm_group_fraction",
    "nm_prox",
    "nm_regularizer",
    "nm_topn_mask",
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_nm(n: int, m: int) -> None:
    if m < 1 or n < 0 or n > m:
        raise ValueError(f"invalid N:M pattern {n}:{m} (need 0 <= n <= m, m >= 1)")


def _groups(w: Tensor, m: int) -> Tensor:
    """View ``w`` as ``[..., cols // m, m]``; raise ValueError naming the shape if impossible."""
    if w.dim() < 1 or w.shape[-1] % m != 0:
        raise ValueError(
            f"tensor of shape {tuple(w.shape)} cannot be split into groups of m={m} along its "
            f"last dimension (last dim must be a positive multiple of {m})"
        )
    return w.reshape(*w.shape[:-1], w.shape[-1] // m, m)


def _esym_cols(cols: list[Tensor], k: int) -> Tensor:
    """``e_k`` of the values held in a list of equally shaped tensors (DP, out of place)."""
    if k == 0:
        return torch.ones_like(cols[0])
    if k > len(cols):
        return torch.zeros_like(cols[0])
    e: list[Tensor | None] = [None] * (k + 1)  # e[0] == 1 implicitly, None means 0
    for j, c in enumerate(cols):
        for t in range(min(j + 1, k), 0, -1):
            term = c if t == 1 else (None if e[t - 1] is None else e[t - 1] * c)
            if term is not None:
                e[t] = term if e[t] is None else e[t] + term
    out = e[k]
    return torch.zeros_like(cols[0]) if out is None else out


def _lam_per_group(lam: float | Tensor, group_shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """``lam`` broadcast to ``group_shape`` (``[..., cols // m]``), as a tensor of ``dtype``."""
    lam_t = torch.as_tensor(lam, dtype=dtype)
    if lam_t.dim() > len(group_shape):
        lam_t = (
            lam_t.reshape(lam_t.shape[-len(group_shape) :]) if group_shape else lam_t.reshape(())
        )
    try:
        return torch.broadcast_to(lam_t, group_shape)
    except RuntimeError as err:
        raise ValueError(
            f"lam of shape {tuple(lam_t.shape)} is not broadcastable to the per-group shape "
            f"{tuple(group_shape)} (use a scalar or a [rows, 1] tensor)"
        ) from err


# --------------------------------------------------------------------------------------------
# public: polynomials, regulariser, masks
# --------------------------------------------------------------------------------------------
def elementary_symmetric(x: Tensor, k: int) -> Tensor:
    """Elementary symmetric polynomial ``e_k`` over the last dimension of ``x`` (``[..., M]``)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    xf = x.to(_compute_dtype(x.dtype))
    if x.shape[-1] == 0 or k > x.shape[-1]:
        val = 1.0 if k == 0 else 0.0
        return torch.full(x.shape[:-1], val, dtype=x.dtype, device=x.device)
    return _esym_cols(list(xf.unbind(-1)), k).to(x.dtype)


def nm_regularizer(w: Tensor, n: int, m: int) -> Tensor:
    """Scalar ``sum_g e_{n+1}(|w_g|)`` over all groups; zero iff ``w`` is N:M sparse."""
    _check_nm(n, m)
    g = _groups(w, m).to(_compute_dtype(w.dtype)).abs()
    if n + 1 > m:
        return torch.zeros((), dtype=w.dtype, device=w.device)
    if n == 2 and m == 4:
        a0, a1, a2, a3 = g.unbind(-1)
        e3 = (a0 * a1) * (a2 + a3) + (a2 * a3) * (a0 + a1)
    else:
        e3 = _esym_cols(list(g.unbind(-1)), n + 1)
    return e3.sum().to(w.dtype)


def _ranks(a: Tensor) -> Tensor:
    """Rank of each entry inside its group (0 = largest); ties: lower index ranks first."""
    m = a.shape[-1]
    cols = a.unbind(-1)
    ranks = [torch.zeros(a.shape[:-1], dtype=torch.uint8, device=a.device) for _ in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            i_first = cols[i] >= cols[j]
            ranks[j] += i_first
            ranks[i] += ~i_first
    return torch.stack(ranks, dim=-1)


def nm_topn_mask(w: Tensor, n: int, m: int) -> Tensor:
    """Boolean mask keeping the ``n`` largest ``|w|`` of each group (ties: lower index wins)."""
    _check_nm(n, m)
    g = _groups(w, m)
    a = g.abs()
    if a.is_floating_point():
        a = a.to(_compute_dtype(w.dtype))
    return (_ranks(a) < n).reshape(w.shape)


def nm_group_fraction(w: Tensor, n: int, m: int) -> float:
    """Share of groups of ``w`` already holding at most ``n`` nonzeros (1.0 for empty ``w``)."""
    _check_nm(n, m)
    g = _groups(w, m)
    nnz = (g != 0).sum(-1)
    if nnz.numel() == 0:
        return 1.0
    return (nnz <= n).float().mean().item()


def is_nm(w: Tensor, n: int, m: int) -> bool:
    """True iff every group of ``w`` has at most ``n`` nonzeros."""
    _check_nm(n, m)
    return bool(((_groups(w, m) != 0).sum(-1) <= n).all().item())


# --------------------------------------------------------------------------------------------
# prox: general path (any n, m)
# --------------------------------------------------------------------------------------------
def _tol_eff(a_max: Tensor, tol: float) -> Tensor:
    # tol is absolute, but never ask for more than a few ulps of the group's largest magnitude.
    return tol + 4.0 * torch.finfo(a_max.dtype).eps * a_max


def _cd_support(
    a_k: Tensor, lam: Tensor, n: int, max_sweeps: int, tol: float, check_every: int = 2
) -> Tensor:
    """Coordinate descent ``w_i <- max(a_i - lam e_n(w_{-i}), 0)`` from ``a`` on ``k`` coords.

    ``a_k`` is ``[k, G]`` (coordinate-major), ``lam`` is ``[G]``; groups stop individually once
    their per-sweep change drops below tolerance.
    """
    k = a_k.shape[0]
    w = a_k.clone()
    active = None  # None: all groups active
    aw, aa, al = w, a_k, lam
    atol = _tol_eff(a_k.amax(0), tol)
    sweeps = 0
    while sweeps < max_sweeps and aw.shape[1] > 0:
        todo = min(check_every, max_sweeps - sweeps)
        prev = aw
        for s in range(todo):
            if s == todo - 1:
                prev = aw.clone()
            for i in range(k):
                others = [aw[j] for j in range(k) if j != i]
                e = _esym_cols(others, n)
                aw[i] = torch.clamp_min(aa[i] - al * e, 0.0)
        sweeps += todo
        delta = (aw - prev).abs().amax(0)
        conv = delta <= atol
        if bool(conv.all()):
            break
        if sweeps >= max_sweeps:
            break
        if bool(conv.any()):
            keep = (~conv).nonzero().squeeze(1)
            if active is None:
                w = aw  # all results so far live in aw
                active = keep
            else:
                w[:, active] = aw
                active = active[keep]
            aw, aa, al, atol = aw[:, keep], aa[:, keep], al[keep], atol[keep]
    if active is None:
        return aw
    w[:, active] = aw
    return w


def _prox_general(a: Tensor, lam: Tensor, n: int, m: int, max_sweeps: int, tol: float) -> Tensor:
    """Prox of ``lam e_{n+1}`` on magnitudes ``a`` (``[G, m]``, ``lam`` ``[G]``); returns ``[G, m]``."""
    a_s, idx = torch.sort(a, dim=-1, descending=True, stable=True)
    a_t = a_s.t().contiguous()  # [m, G], coordinate-major
    tail_sq = (a_t * a_t).flip(0).cumsum(0).flip(0)  # tail_sq[k] = sum_{j>=k} a_j^2
    best_w = a_t.clone()
    best_w[n:] = 0.0
    best_obj = 0.5 * tail_sq[n] if n < m else torch.zeros_like(a_t[0])
    best_k = torch.full_like(best_obj, n, dtype=torch.uint8)
    cands: dict[int, Tensor] = {}
    for k in range(n + 1, m + 1):
        w_k = _cd_support(a_t[:k], lam, n, max_sweeps, tol)
        obj = 0.5 * ((w_k - a_t[:k]) ** 2).sum(0) + lam * _esym_cols(list(w_k), n + 1)
        if k < m:
            obj = obj + 0.5 * tail_sq[k]
        better = obj < best_obj
        best_obj = torch.where(better, obj, best_obj)
        best_k = torch.where(better, torch.full_like(best_k, k), best_k)
        cands[k] = w_k
    for k, w_k in cands.items():
        sel = best_k == k
        best_w[:k] = torch.where(sel, w_k, best_w[:k])
        best_w[k:] = torch.where(sel, torch.zeros_like(best_w[k:]), best_w[k:])
    out = torch.empty_like(a)
    out.scatter_(1, idx, best_w.t())
    return out


# --------------------------------------------------------------------------------------------
# prox: public entry point
# --------------------------------------------------------------------------------------------
def nm_prox(
    z: Tensor,
    lam: float | Tensor,
    n: int,
    m: int,
    max_sweeps: int = 100,
    tol: float = 1e-8,
) -> Tensor:
    """Group-wise prox ``argmin_w 1/2 ||w - z||^2 + lam * e_{n+1}(|w_g|)`` (EnumALM).

    ``lam`` is a float or a tensor broadcastable to ``[..., 1]`` (e.g. per-row ``[rows, 1]``) or
    to the per-group shape ``[..., cols // m]``.  For every support size ``k`` in ``n..m`` the
    candidate supported on the top-``k`` magnitudes is solved (closed form for ``k = n``,
    Gauss-Seidel coordinate descent otherwise) and the best objective per group wins.
    """
    _check_nm(n, m)
    g = _groups(z, m)
    cdt = _compute_dtype(z.dtype)
    lam_g = _lam_per_group(lam, g.shape[:-1], cdt).to(z.device)
    if bool((lam_g < 0).any()):
        raise ValueError("lam must be non-negative")
    if n >= m or z.numel() == 0:
        return z.clone()
    a = g.to(cdt).abs().reshape(-1, m)
    w = _prox_general(a, lam_g.reshape(-1), n, m, max_sweeps, tol)
    out = torch.copysign(w, g.reshape(-1, m).to(cdt))
    return out.reshape(z.shape).to(z.dtype)
