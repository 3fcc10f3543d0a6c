"""N:M sparsity regulariser and its proximal operator (ProxSparse, EnumALM generalised).

A weight ``w`` of shape ``[..., cols]`` is split into *groups* of ``m`` consecutive entries along
the last dimension (``cols % m == 0``).  The ProxSparse regulariser of a group is the elementary
symmetric polynomial ``e_{n+1}(|w_g|)``, which is zero iff the group has at most ``n`` nonzeros.

Arithmetic runs in float32 (float64 inputs stay float64); results come back in the input dtype.

``nm_prox`` is the hot path (called after every optimizer step).  For the common 2:4 pattern on
CPU it uses a small C kernel that is compiled on first use with the system C compiler and loaded
through ``ctypes`` (about 30x faster than the vectorised eager-torch 2:4 path, which remains the
fallback).  Set ``LIGHTNING_PRUNE_NM_NATIVE=0`` to disable the native kernel.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

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
            f"last dimension (last dim must be a multiple of {m})"
        )
    return w.reshape(*w.shape[:-1], w.shape[-1] // m, m)


def _esym_cols(cols: list[Tensor], k: int) -> Tensor:
    """``e_k`` of the values held in a list of equally shaped tensors (DP, out of place)."""
    n_cols = len(cols)
    if k == 0:
        return torch.ones_like(cols[0])
    if k > n_cols:
        return torch.zeros_like(cols[0])
    e: list[Tensor | None] = [None] * (k + 1)  # e[0] == 1 implicitly; None means 0
    for j, c in enumerate(cols):
        # e[t] with t + (columns left after this one) < k can no longer reach e[k]: skip it
        for t in range(min(j + 1, k), max(k - (n_cols - 1 - j), 1) - 1, -1):
            if t == 1:
                term = c
            elif e[t - 1] is None:
                continue
            else:
                term = e[t - 1] * c
            e[t] = term if e[t] is None else e[t] + term
    out = e[k]
    return torch.zeros_like(cols[0]) if out is None else out


def _lam_per_group(lam: float | Tensor, z: Tensor, group_shape: torch.Size) -> Tensor:
    """``lam`` as a (possibly expanded) tensor of ``group_shape`` in the compute dtype."""
    lam_t = torch.as_tensor(lam, dtype=_compute_dtype(z.dtype), device=z.device)
    if bool((lam_t < 0).any()):
        raise ValueError("lam must be non-negative")
    try:
        return torch.broadcast_to(lam_t, group_shape)
    except RuntimeError as err:
        raise ValueError(
            f"lam of shape {tuple(lam_t.shape)} is not broadcastable to the per-group shape "
            f"{tuple(group_shape)} (use a scalar, a [rows, 1] or a [rows, cols // m] tensor)"
        ) from err


# --------------------------------------------------------------------------------------------
# public: polynomials, regulariser, masks
# --------------------------------------------------------------------------------------------
def elementary_symmetric(x: Tensor, k: int) -> Tensor:
    """Elementary symmetric polynomial ``e_k`` over the last dimension of ``x`` (``[..., M]``)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    if x.shape[-1] == 0 or k > x.shape[-1]:
        val = 1.0 if k == 0 else 0.0
        return torch.full(x.shape[:-1], val, dtype=x.dtype, device=x.device)
    xf = x.to(_compute_dtype(x.dtype))
    return _esym_cols(list(xf.unbind(-1)), k).to(x.dtype)


def nm_regularizer(w: Tensor, n: int, m: int) -> Tensor:
    """Scalar ``sum_g e_{n+1}(|w_g|)`` over all groups; zero iff ``w`` is N:M sparse."""
    _check_nm(n, m)
    g = _groups(w, m)
    if n + 1 > m:
        return torch.zeros((), dtype=w.dtype, device=w.device)
    a = g.to(_compute_dtype(w.dtype)).abs()
    if n == 2 and m == 4:
        a0, a1, a2, a3 = a.unbind(-1)
        pen = (a0 * a1) * (a2 + a3) + (a2 * a3) * (a0 + a1)
    else:
        pen = _esym_cols(list(a.unbind(-1)), n + 1)
    return pen.sum().to(w.dtype)


def _ranks(a: Tensor) -> Tensor:
    """Rank of each entry of ``a`` (``[..., m]``) in its group: 0 = largest, ties -> lower index."""
    m = a.shape[-1]
    rdt = torch.uint8 if m <= 255 else torch.int32
    cols = a.unbind(-1)
    ranks = [torch.zeros(a.shape[:-1], dtype=rdt, device=a.device) for _ in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            i_first = cols[i] >= cols[j]
            ranks[j] += i_first
            ranks[i] += ~i_first
    return torch.stack(ranks, dim=-1)


def nm_topn_mask(w: Tensor, n: int, m: int) -> Tensor:
    """Boolean mask keeping the ``n`` largest ``|w|`` of each group (ties: lower index wins)."""
    _check_nm(n, m)
    a = _groups(w, m).abs()
    if a.is_floating_point():
        a = a.to(_compute_dtype(w.dtype))
    return (_ranks(a) < n).reshape(w.shape)


def nm_group_counts(w: Tensor, m: int) -> Tensor:
    """Number of groups of ``w`` holding ``k`` nonzeros, for ``k = 0..m`` (int64, on CPU)."""
    nnz = (_groups(w, m) != 0).sum(-1).flatten()
    return torch.bincount(nnz.cpu(), minlength=m + 1)


def nm_group_fraction(w: Tensor, n: int, m: int) -> float:
    """Share of groups of ``w`` already holding at most ``n`` nonzeros (1.0 if there are none)."""
    _check_nm(n, m)
    counts = nm_group_counts(w, m)
    total = int(counts.sum())
    return 1.0 if total == 0 else float(counts[: n + 1].sum()) / total


def is_nm(w: Tensor, n: int, m: int) -> bool:
    """True iff every group of ``w`` holds at most ``n`` nonzeros."""
    _check_nm(n, m)
    return bool(((_groups(w, m) != 0).sum(-1) <= n).all().item())


# --------------------------------------------------------------------------------------------
# prox, general path (any n:m): sort, coordinate descent per top-k support, pick the best
# --------------------------------------------------------------------------------------------
def _tol_eff(a_max: Tensor, tol: float) -> Tensor:
    """Per-group stopping threshold: ``tol``, relaxed to a few ulps of the largest magnitude."""
    return tol + 4.0 * torch.finfo(a_max.dtype).eps * a_max


_WARMUP_ITERS = 15  # damped Jacobi warm-up iterations (groups not certified convex only)
_WARMUP_DAMPING = 0.4


def _uniform_shrink(a_k: Tensor, lam: Tensor, n: int) -> Tensor:
    """``rho`` in ``[0, 1]`` minimising the objective along ``w = rho * a`` (per group).

    Root of ``(rho - 1) |a|^2 + (n + 1) lam rho^n e_{n+1}(a)``, by Newton from ``rho = 1``
    (the function is convex and increasing on ``[0, 1]``, so the iterates decrease monotonically).
    """
    sq = (a_k * a_k).sum(0)
    c = (n + 1) * lam * _esym_cols(list(a_k), n + 1)
    if n <= 2:  # closed forms (linear / quadratic root in stable form)
        if n == 0:
            rho = torch.clamp(1.0 - c / sq, 0.0, 1.0)
        elif n == 1:
            rho = sq / (sq + c)
        else:
            rho = 2.0 * sq / (sq + torch.sqrt(sq * (sq + 4.0 * c)))
        return torch.where(sq > 0, rho, torch.ones_like(rho))
    rho = torch.ones_like(sq)
    for _ in range(40):
        f = (rho - 1.0) * sq + c * rho**n
        fp = sq + n * c * rho ** (n - 1) if n >= 1 else sq
        step = f / torch.clamp_min(fp, torch.finfo(sq.dtype).tiny)
        rho = torch.clamp(rho - step, 0.0, 1.0)
        if not bool((step.abs() > 1e-6).any()):
            break
    return torch.where(sq > 0, rho, torch.ones_like(rho))


def _cd_start(a_k: Tensor, lam: Tensor, n: int) -> Tensor:
    """Starting point of the coordinate descent on a support (``a_k``: ``[k, G]``, descending).

    ``rho * a`` (best uniform shrink).  Where the objective restricted to the support is not
    certified convex on the box ``[0, a]`` (Gershgorin on the Hessian of the penalty:
    ``lam (k - n) e_{n-1}(a without its smallest entry) > 1``), the start is refined by a few
    damped Jacobi steps, which treat tied entries symmetrically.  Plain ``w = a`` can lose badly
    there: the first Gauss-Seidel update may zero an entry whose optimum is far from zero.
    """
    k = a_k.shape[0]
    w = a_k * _uniform_shrink(a_k, lam, n)
    if n == 0:
        return w  # separable (soft threshold): convex
    bound = lam * (k - n) * _esym_cols(list(a_k[:-1]), n - 1)
    nonconvex = (bound > 1.0).nonzero().squeeze(1)
    if nonconvex.numel() == 0:
        return w
    aa, al, ww = a_k[:, nonconvex], lam[nonconvex], w[:, nonconvex]
    for _ in range(_WARMUP_ITERS):
        jac = torch.stack([_esym_cols([ww[j] for j in range(k) if j != i], n) for i in range(k)])
        ww = torch.lerp(ww, torch.clamp_min(aa - al * jac, 0.0), _WARMUP_DAMPING)
    w[:, nonconvex] = ww
    return w


def _cd_support(
    a_k: Tensor, lam: Tensor, n: int, max_sweeps: int, tol: float, check_every: int = 2
) -> Tensor:
    """Gauss-Seidel ``w_i <- max(a_i - lam e_n(w_{-i}), 0)`` on ``k`` coordinates.

    ``a_k`` is ``[k, G]`` (coordinate-major, sorted descending), ``lam`` is ``[G]``.  Starts from
    ``_cd_start``; every ``check_every`` sweeps the groups whose last sweep moved less than the
    tolerance are retired, the rest go on (at most ``max_sweeps`` sweeps).
    """
    k = a_k.shape[0]
    w = _cd_start(a_k, lam, n)
    active: Tensor | None = None  # indices (into w) of the groups still iterating; None: all
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
                e = _esym_cols([aw[j] for j in range(k) if j != i], n)
                aw[i] = torch.clamp_min(aa[i] - al * e, 0.0)
        sweeps += todo
        conv = (aw - prev).abs().amax(0) <= atol
        if sweeps >= max_sweeps or bool(conv.all()):
            break
        if bool(conv.any()):
            keep = (~conv).nonzero().squeeze(1)
            if active is None:
                active = keep  # w is aw here, so the retired groups are already in place
            else:
                w[:, active] = aw
                active = active[keep]
            aw, aa, al, atol = aw[:, keep], aa[:, keep], al[keep], atol[keep]
    if active is not None:
        w[:, active] = aw
    return w


def _prox_general(a: Tensor, lam: Tensor, n: int, max_sweeps: int, tol: float) -> Tensor:
    """Prox of ``lam * e_{n+1}`` on magnitudes ``a`` (``[G, m]``, ``lam`` ``[G]``), ``[G, m]``."""
    m = a.shape[1]
    a_s, idx = torch.sort(a, dim=-1, descending=True, stable=True)
    a_t = a_s.t().contiguous()  # [m, G], coordinate-major
    tail_sq = (a_t * a_t).flip(0).cumsum(0).flip(0)  # tail_sq[k] = sum_{j >= k} a_j^2
    best_obj = 0.5 * tail_sq[n] if n < m else torch.zeros_like(a_t[0])
    best_k = torch.full(best_obj.shape, n, dtype=torch.int16, device=a.device)
    cands: dict[int, Tensor] = {}
    for k in range(n + 1, m + 1):
        w_k = _cd_support(a_t[:k], lam, n, max_sweeps, tol)
        obj = 0.5 * ((w_k - a_t[:k]) ** 2).sum(0) + lam * _esym_cols(list(w_k), n + 1)
        if k < m:
            obj = obj + 0.5 * tail_sq[k]
        better = obj < best_obj
        best_obj = torch.where(better, obj, best_obj)
        best_k.masked_fill_(better, k)
        cands[k] = w_k
    best_w = a_t.clone()
    best_w[n:] = 0.0
    for k, w_k in cands.items():
        sel = best_k == k
        best_w[:k] = torch.where(sel, w_k, best_w[:k])
        best_w[k:].masked_fill_(sel, 0.0)
    return torch.empty_like(a).scatter_(1, idx, best_w.t())


# --------------------------------------------------------------------------------------------
# prox, 2:4 eager path (vectorised, no sort: a sorting network plus ranks)
# --------------------------------------------------------------------------------------------
def _prox24_eager(g: Tensor, lam: Tensor, max_sweeps: int, tol: float) -> Tensor:
    """2:4 prox of ``g`` (``[..., 4]``) with ``lam`` broadcastable to ``g[..., 0]``.

    Returns the signed result in the compute dtype.  Same algorithm as the general path (and the
    native kernel) without ``torch.sort``: a sorting network plus per-entry ranks.
    """
    x = g.to(_compute_dtype(g.dtype))
    a0, a1, a2, a3 = x.abs().unbind(-1)
    c01, c02, c03 = (a0 >= a1).long(), (a0 >= a2).long(), (a0 >= a3).long()
    c12, c13, c23 = (a1 >= a2).long(), (a1 >= a3).long(), (a2 >= a3).long()
    ranks = torch.stack(
        [3 - c01 - c02 - c03, 2 + c01 - c12 - c13, 1 + c02 + c12 - c23, c03 + c13 + c23]
    ).reshape(4, -1)
    h01, l01 = torch.maximum(a0, a1), torch.minimum(a0, a1)
    h23, l23 = torch.maximum(a2, a3), torch.minimum(a2, a3)
    t1, t2 = torch.minimum(h01, h23), torch.maximum(l01, l23)
    s = torch.stack(
        [torch.maximum(h01, h23), torch.maximum(t1, t2), torch.minimum(t1, t2),
         torch.minimum(l01, l23)]
    ).reshape(4, -1)  # fmt: skip  # sorted magnitudes, [4, G]
    lam_f = torch.broadcast_to(lam, a0.shape).reshape(-1)
    u = _cd_support(s[:3], lam_f, 2, max_sweeps, tol)  # k = 3: support = top 3
    v = _cd_support(s, lam_f, 2, max_sweeps, tol)  # k = 4
    f2 = 0.5 * (s[2] ** 2 + s[3] ** 2)
    f3 = 0.5 * (((u - s[:3]) ** 2).sum(0) + s[3] ** 2) + lam_f * (u[0] * u[1] * u[2])
    f4 = 0.5 * ((v - s) ** 2).sum(0) + lam_f * _esym_cols(list(v), 3)
    w = s.clone()
    w[2:] = 0.0
    w[:3] = torch.where(f3 < f2, u, w[:3])
    w = torch.where(f4 < torch.minimum(f2, f3), v, w)
    out = torch.gather(w, 0, ranks)  # back to the original order
    return torch.copysign(out.t().reshape(x.shape), x)


# --------------------------------------------------------------------------------------------
# prox, 2:4 native CPU kernel (C, compiled on first use, called through ctypes)
# --------------------------------------------------------------------------------------------
_C_SOURCE = r"""
#include <stdint.h>
#include <math.h>

/* Groups are processed in blocks of B with a structure-of-arrays layout so that the compiler
   vectorises every inner loop; a block stops sweeping once all its groups have converged. */
#define B 32
#define EPS4 (4.0f * 1.1920928955078125e-07f)

static inline float rl(float x) { return x > 0.0f ? x : 0.0f; }
static inline float mx(float a, float b) { return a > b ? a : b; }
static inline float mn(float a, float b) { return a < b ? a : b; }

static void prox24_block(const float* z, float* out, int nb, const float* lg, int max_sweeps,
                         float tol)
{
    float x0[B], x1[B], x2[B], x3[B], s0[B], s1[B], s2[B], s3[B], l[B], te[B];
    float u0[B], u1[B], u2[B], v0[B], v1[B], v2[B], v3[B];
    int r0[B], r1[B], r2[B], r3[B], nc3[B], nc4[B];
    if (nb == B) {
        for (int j = 0; j < B; ++j) {
            x0[j] = z[4 * j]; x1[j] = z[4 * j + 1]; x2[j] = z[4 * j + 2]; x3[j] = z[4 * j + 3];
            l[j] = lg[j];
        }
    } else { /* tail block: pad with zero groups (they converge at once) */
        for (int j = 0; j < B; ++j) {
            int ok = j < nb;
            x0[j] = ok ? z[4 * j] : 0.0f; x1[j] = ok ? z[4 * j + 1] : 0.0f;
            x2[j] = ok ? z[4 * j + 2] : 0.0f; x3[j] = ok ? z[4 * j + 3] : 0.0f;
            l[j] = ok ? lg[j] : 0.0f;
        }
    }
    /* ranks (0 = largest, ties -> lower index) and a descending sorting network */
    for (int j = 0; j < B; ++j) {
        float a0 = fabsf(x0[j]), a1 = fabsf(x1[j]), a2 = fabsf(x2[j]), a3 = fabsf(x3[j]);
        int c01 = a0 >= a1, c02 = a0 >= a2, c03 = a0 >= a3;
        int c12 = a1 >= a2, c13 = a1 >= a3, c23 = a2 >= a3;
        r0[j] = 3 - c01 - c02 - c03;
        r1[j] = 2 + c01 - c12 - c13;
        r2[j] = 1 + c02 + c12 - c23;
        r3[j] = c03 + c13 + c23;
        float h01 = mx(a0, a1), l01 = mn(a0, a1), h23 = mx(a2, a3), l23 = mn(a2, a3);
        float t1 = mn(h01, h23), t2 = mx(l01, l23);
        s0[j] = mx(h01, h23); s3[j] = mn(l01, l23);
        s1[j] = mx(t1, t2); s2[j] = mn(t1, t2);
        te[j] = tol + EPS4 * s0[j];
    }
    /* starts: best uniform shrink rho * s (closed form for n = 2); flag the groups whose
       support problem is not certified convex (Gershgorin bound) for a Jacobi warm-up */
    int any3 = 0, any4 = 0;
    for (int j = 0; j < B; ++j) {
        float a3s = s0[j] * s0[j] + s1[j] * s1[j] + s2[j] * s2[j], a4s = a3s + s3[j] * s3[j];
        float e3 = s0[j] * s1[j] * s2[j];
        float e4 = s0[j] * s1[j] * (s2[j] + s3[j]) + s2[j] * s3[j] * (s0[j] + s1[j]);
        float q3 = sqrtf(a3s), q4 = sqrtf(a4s);
        float rho3 = a3s > 0.0f ? 2.0f * q3 / (q3 + sqrtf(a3s + 12.0f * l[j] * e3)) : 1.0f;
        float rho4 = a4s > 0.0f ? 2.0f * q4 / (q4 + sqrtf(a4s + 12.0f * l[j] * e4)) : 1.0f;
        u0[j] = rho3 * s0[j]; u1[j] = rho3 * s1[j]; u2[j] = rho3 * s2[j];
        v0[j] = rho4 * s0[j]; v1[j] = rho4 * s1[j]; v2[j] = rho4 * s2[j]; v3[j] = rho4 * s3[j];
        nc3[j] = l[j] * (s0[j] + s1[j]) > 1.0f;
        nc4[j] = 2.0f * l[j] * (s0[j] + s1[j] + s2[j]) > 1.0f;
        any3 |= nc3[j]; any4 |= nc4[j];
    }
    for (int it = 0; any3 && it < WARM_ITERS; ++it) {
        for (int j = 0; j < B; ++j) {
            float b = nc3[j] ? WARM_DAMP : 0.0f;
            float n0 = rl(s0[j] - l[j] * (u1[j] * u2[j]));
            float n1 = rl(s1[j] - l[j] * (u0[j] * u2[j]));
            float n2 = rl(s2[j] - l[j] * (u0[j] * u1[j]));
            u0[j] += b * (n0 - u0[j]); u1[j] += b * (n1 - u1[j]); u2[j] += b * (n2 - u2[j]);
        }
    }
    for (int it = 0; any4 && it < WARM_ITERS; ++it) {
        for (int j = 0; j < B; ++j) {
            float b = nc4[j] ? WARM_DAMP : 0.0f;
            float p0 = v0[j], p1 = v1[j], p2 = v2[j], p3 = v3[j];
            float n0 = rl(s0[j] - l[j] * (p1 * p2 + p3 * (p1 + p2)));
            float n1 = rl(s1[j] - l[j] * (p0 * p2 + p3 * (p0 + p2)));
            float n2 = rl(s2[j] - l[j] * (p0 * p1 + p3 * (p0 + p1)));
            float n3 = rl(s3[j] - l[j] * (p0 * p1 + p2 * (p0 + p1)));
            v0[j] = p0 + b * (n0 - p0); v1[j] = p1 + b * (n1 - p1);
            v2[j] = p2 + b * (n2 - p2); v3[j] = p3 + b * (n3 - p3);
        }
    }
    /* candidates k=3 (u, top-3 support) and k=4 (v): Gauss-Seidel coordinate descent */
    for (int it = 0; it < max_sweeps; ++it) {
        int go = 0;
        for (int j = 0; j < B; ++j) {
            float p0 = u0[j], p1 = u1[j], p2 = u2[j];
            float n0 = rl(s0[j] - l[j] * (p1 * p2));
            float n1 = rl(s1[j] - l[j] * (n0 * p2));
            float n2 = rl(s2[j] - l[j] * (n0 * n1));
            float d = mx(mx(fabsf(n0 - p0), fabsf(n1 - p1)), fabsf(n2 - p2));
            u0[j] = n0; u1[j] = n1; u2[j] = n2;
            float q0 = v0[j], q1 = v1[j], q2 = v2[j], q3 = v3[j];
            float m0 = rl(s0[j] - l[j] * (q1 * q2 + q3 * (q1 + q2)));
            float m1 = rl(s1[j] - l[j] * (m0 * q2 + q3 * (m0 + q2)));
            float m2 = rl(s2[j] - l[j] * (m0 * m1 + q3 * (m0 + m1)));
            float m3 = rl(s3[j] - l[j] * (m0 * m1 + m2 * (m0 + m1)));
            d = mx(d, mx(mx(fabsf(m0 - q0), fabsf(m1 - q1)), mx(fabsf(m2 - q2), fabsf(m3 - q3))));
            v0[j] = m0; v1[j] = m1; v2[j] = m2; v3[j] = m3;
            go |= d > te[j];
        }
        if (!go) break;
    }
    /* objectives, best candidate (ties -> sparser), unsort, signs */
    for (int j = 0; j < B; ++j) {
        float e0 = u0[j] - s0[j], e1 = u1[j] - s1[j], e2 = u2[j] - s2[j];
        float g0 = v0[j] - s0[j], g1 = v1[j] - s1[j], g2 = v2[j] - s2[j], g3 = v3[j] - s3[j];
        float f2 = 0.5f * (s2[j] * s2[j] + s3[j] * s3[j]);
        float f3 = 0.5f * (e0 * e0 + e1 * e1 + e2 * e2 + s3[j] * s3[j])
                   + l[j] * (u0[j] * u1[j] * u2[j]);
        float f4 = 0.5f * (g0 * g0 + g1 * g1 + g2 * g2 + g3 * g3)
                   + l[j] * (v0[j] * v1[j] * (v2[j] + v3[j]) + v2[j] * v3[j] * (v0[j] + v1[j]));
        int b3 = f3 < f2;
        int b4 = f4 < mn(f2, f3);
        float w0 = b4 ? v0[j] : (b3 ? u0[j] : s0[j]);
        float w1 = b4 ? v1[j] : (b3 ? u1[j] : s1[j]);
        float w2 = b4 ? v2[j] : (b3 ? u2[j] : 0.0f);
        float w3 = b4 ? v3[j] : 0.0f;
        int q;
        q = r0[j]; x0[j] = copysignf(q == 0 ? w0 : q == 1 ? w1 : q == 2 ? w2 : w3, x0[j]);
        q = r1[j]; x1[j] = copysignf(q == 0 ? w0 : q == 1 ? w1 : q == 2 ? w2 : w3, x1[j]);
        q = r2[j]; x2[j] = copysignf(q == 0 ? w0 : q == 1 ? w1 : q == 2 ? w2 : w3, x2[j]);
        q = r3[j]; x3[j] = copysignf(q == 0 ? w0 : q == 1 ? w1 : q == 2 ? w2 : w3, x3[j]);
    }
    if (nb == B) {
        for (int j = 0; j < B; ++j) {
            out[4 * j] = x0[j]; out[4 * j + 1] = x1[j];
            out[4 * j + 2] = x2[j]; out[4 * j + 3] = x3[j];
        }
    } else {
        for (int j = 0; j < nb; ++j) {
            out[4 * j] = x0[j]; out[4 * j + 1] = x1[j];
            out[4 * j + 2] = x2[j]; out[4 * j + 3] = x3[j];
        }
    }
}

/* Groups [g_begin, g_end) of a contiguous [rows, C, 4] float32 tensor (out may alias z);
   the lambda of group (r, c) is lam[r * ls0 + c * ls1]. */
void lp_nm_prox24_f32(const float* z, float* out, int64_t g_begin, int64_t g_end, int64_t C,
                      const float* lam, int64_t ls0, int64_t ls1, int32_t max_sweeps, float tol)
{
    float lg[B];
    int64_t r = g_begin / C, c = g_begin % C;
    for (int64_t g = g_begin; g < g_end; g += B) {
        int nb = (g_end - g) < B ? (int)(g_end - g) : B;
        for (int j = 0; j < nb; ++j) {
            lg[j] = lam[r * ls0 + c * ls1];
            if (++c == C) { c = 0; ++r; }
        }
        prox24_block(z + 4 * g, out + 4 * g, nb, lg, max_sweeps, tol);
    }
}
"""

_C_SOURCE = (
    f"#define WARM_ITERS {_WARMUP_ITERS}\n#define WARM_DAMP {_WARMUP_DAMPING!r}f\n" + _C_SOURCE
)

_NATIVE_ENV = "LIGHTNING_PRUNE_NM_NATIVE"
_MIN_GROUPS_PER_THREAD = 32768
_native_lock = threading.Lock()
_native_state: dict[str, object] = {}  # "fn": callable | None, "reason": str
_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] = (0, 0)  # (pid, workers): a forked child must not reuse the pool


def _build_native() -> tuple[object | None, str]:
    """Compile and load the C kernel; return ``(function, "")`` or ``(None, reason)``."""
    if os.environ.get(_NATIVE_ENV, "1").lower() in ("0", "false", "no", "off"):
        return None, f"disabled by {_NATIVE_ENV}"
    if sys.platform.startswith("win"):
        return None, "native kernel not supported on Windows"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None, "no C compiler found"
    base = ["-O3", "-std=c99", "-fno-math-errno", "-shared", "-fPIC"]
    errors = []
    with tempfile.TemporaryDirectory(prefix="lightning_prune_nm_") as tmp:
        src = os.path.join(tmp, "nm_prox24.c")
        lib_path = os.path.join(tmp, "nm_prox24.so")
        with open(src, "w") as fh:
            fh.write(_C_SOURCE)
        for extra in (["-march=native"], []):
            cmd = [cc, *base, *extra, src, "-o", lib_path, "-lm"]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as err:
                errors.append(str(err))
                continue
            if res.returncode == 0:
                break
            errors.append(res.stderr.strip()[-500:])
        else:
            return None, "compilation failed: " + " | ".join(errors)
        try:
            lib = ctypes.CDLL(lib_path)  # the mapping outlives the deleted file
        except OSError as err:
            return None, f"could not load compiled kernel: {err}"
    fn = lib.lp_nm_prox24_f32
    fn.restype = None
    i64 = ctypes.c_int64
    fn.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, i64, i64, i64,
        ctypes.c_void_p, i64, i64, ctypes.c_int32, ctypes.c_float,
    ]  # fmt: skip
    fn._lp_lib = lib  # keep the library alive with the function
    if not _native_self_check(fn):
        return None, "self-check against the eager implementation failed"
    return fn, ""


def _native_fn() -> object | None:
    """The loaded native kernel, or None (building it on first use, warning once on failure)."""
    if "fn" not in _native_state:
        with _native_lock:
            if "fn" not in _native_state:
                fn, reason = _build_native()
                _native_state["fn"], _native_state["reason"] = fn, reason
                if fn is None and not reason.startswith("disabled"):
                    warnings.warn(
                        f"nm_prox: native 2:4 kernel unavailable ({reason}); "
                        "using the slower eager torch path",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    return _native_state["fn"]


def _run_native(fn, src: Tensor, dst: Tensor, lam2d: Tensor, max_sweeps: int, tol: float) -> None:
    """Run the kernel on contiguous fp32 ``src``/``dst`` ``[R, C, 4]``; ``lam2d`` is ``[R, C]``."""
    global _pool, _pool_key
    rows, c_groups = src.shape[0], src.shape[1]
    for t in (src, dst, lam2d):  # raw pointers below: insist on the layout the C code assumes
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise RuntimeError("native nm_prox kernel needs float32 CPU tensors")
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise RuntimeError("native nm_prox kernel needs contiguous tensors")
    total = rows * c_groups
    if total == 0:
        return
    ls0, ls1 = lam2d.stride()
    args = (src.data_ptr(), dst.data_ptr())
    tail = (c_groups, lam2d.data_ptr(), ls0, ls1, int(max_sweeps), float(tol))
    nthreads = max(1, min(torch.get_num_threads(), total // _MIN_GROUPS_PER_THREAD))
    if nthreads == 1:
        fn(*args, 0, total, *tail)
        return
    with _native_lock:
        key = (os.getpid(), nthreads)
        if _pool is None or _pool_key != key:
            if _pool is not None and _pool_key[0] == key[0]:
                _pool.shutdown(wait=False)
            _pool, _pool_key = ThreadPoolExecutor(nthreads, "nm_prox"), key
        pool = _pool
    step = -(-total // nthreads)
    step = -(-step // 32) * 32
    futures = [
        pool.submit(fn, *args, g, min(g + step, total), *tail) for g in range(0, total, step)
    ]
    for fut in futures:
        fut.result()


def _native_self_check(fn) -> bool:
    """Compare the kernel's objective with the eager path on a small random problem."""
    gen = torch.Generator().manual_seed(1234)
    z = torch.randn(37, 4 * 45, generator=gen) * torch.rand(37, 1, generator=gen) * 3
    lam = torch.rand(37, 1, generator=gen) * 3
    g = z.view(37, 45, 4)
    ref = _prox24_eager(g, lam, 100, 1e-8)
    got = torch.empty_like(g)
    fn(g.data_ptr(), got.data_ptr(), 0, 37 * 45, 45, lam.data_ptr(), 1, 0, 100, 1e-8)

    def obj(w: Tensor) -> Tensor:
        w = w.double().abs()
        a0, a1, a2, a3 = w.unbind(-1)
        pen = a0 * a1 * (a2 + a3) + a2 * a3 * (a0 + a1)
        return 0.5 * ((w - g.double().abs()) ** 2).sum(-1) + lam.double() * pen

    scale = (g.double() ** 2).sum(-1) + 1e-12
    signs_ok = bool(((got * g) >= 0).all())
    return signs_ok and bool(((obj(got) - obj(ref)).abs() <= 1e-5 * scale).all())


def _prox24(
    z: Tensor, g: Tensor, lam_g: Tensor, max_sweeps: int, tol: float, out: Tensor | None
) -> Tensor:
    """2:4 dispatch: native kernel for CPU float32/bf16/fp16 tensors, eager torch otherwise."""
    fn = None
    if z.device.type == "cpu" and z.dtype in (torch.float32, torch.bfloat16, torch.float16):
        fn = _native_fn()
    if fn is None:
        res = _prox24_eager(g, lam_g, max_sweeps, tol).reshape(z.shape)
        if out is None:
            return res.to(z.dtype)
        return out.copy_(res)
    rows = g[..., 0, 0].numel()
    c_groups = g.shape[-2]
    lam2d = lam_g.reshape(rows, c_groups)
    if z.dtype == torch.float32 and z.is_contiguous():
        src = z
        direct = (
            out is not None
            and out.dtype == torch.float32
            and out.is_contiguous()
            and out.shape == z.shape
        )
        dst = out if direct else torch.empty_like(z, memory_format=torch.contiguous_format)
    else:
        src = z.to(torch.float32).contiguous()
        if src.data_ptr() == z.data_ptr():  # never write into the caller's tensor
            src = src.clone()
        dst = src
    _run_native(
        fn, src.view(rows, c_groups, 4), dst.view(rows, c_groups, 4), lam2d, max_sweeps, tol
    )
    if out is not None:
        return out if dst is out else out.copy_(dst)
    return dst.to(z.dtype)


# --------------------------------------------------------------------------------------------
# prox: public entry point
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def nm_prox(
    z: Tensor,
    lam: float | Tensor,
    n: int,
    m: int,
    max_sweeps: int = 100,
    tol: float = 1e-8,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Group-wise prox ``argmin_w 1/2 ||w - z||^2 + lam * sum_g e_{n+1}(|w_g|)`` (EnumALM).

    ``lam`` is a float or a non-negative tensor broadcastable to the per-group shape
    ``[..., cols // m]`` (e.g. a per-row ``[rows, 1]``).  For every support size ``k`` in
    ``n..m`` the candidate supported on the top-``k`` magnitudes is solved (closed form for
    ``k = n``, Gauss-Seidel coordinate descent otherwise, at most ``max_sweeps`` sweeps, a group
    stops once a sweep moves it less than ``tol`` (or a few ulps of its largest entry)) and the
    lowest objective wins.  Signs of ``z`` are kept.  ``out`` (same shape and dtype as ``z``,
    may be ``z`` itself for an in-place update) receives the result if given.
    """
    _check_nm(n, m)
    if max_sweeps < 0:
        raise ValueError(f"max_sweeps must be >= 0, got {max_sweeps}")
    g = _groups(z, m)
    lam_g = _lam_per_group(lam, z, g.shape[:-1])
    if out is not None and (out.shape != z.shape or out.dtype != z.dtype):
        raise ValueError(
            f"out has shape {tuple(out.shape)} / {out.dtype}, expected {tuple(z.shape)} / {z.dtype}"
        )
    if n >= m or z.numel() == 0:  # the penalty e_{m+1} is identically zero
        return z.clone() if out is None else out.copy_(z)
    if n == 2 and m == 4:
        return _prox24(z, g, lam_g, max_sweeps, tol, out)
    cdt = _compute_dtype(z.dtype)
    flat = g.to(cdt).reshape(-1, m)
    w = _prox_general(flat.abs(), lam_g.reshape(-1), n, max_sweeps, tol)
    res = torch.copysign(w, flat).reshape(z.shape)
    return res.to(z.dtype) if out is None else out.copy_(res)
