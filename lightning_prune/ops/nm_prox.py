"""N:M sparsity regulariser and its proximal operator (ProxSparse, EnumALM generalised).

A weight ``w`` of shape ``[..., cols]`` is split into *groups* of ``m`` consecutive entries along
the last dimension (``cols % m == 0``).  The ProxSparse regulariser of a group is the elementary
symmetric polynomial ``e_{n+1}(|w_g|)``, which is zero iff the group has at most ``n`` nonzeros.

Arithmetic runs in float32 (float64 inputs stay float64); results come back in the input dtype.

``nm_prox`` is the hot path (called after every optimizer step).  ``prox_backend`` says which of
its implementations serves a tensor (details in docs/prox.md):

- ``native``: 2:4 on CPU (float32/bf16/fp16), a C kernel compiled on first use
  (``nm_prox_native``; ``LIGHTNING_PRUNE_NM_NATIVE=0`` disables it);
- ``compiled``: the vectorised torch implementation (``nm_prox_torch``) through
  ``torch.compile``, on CUDA (``LIGHTNING_PRUNE_NM_COMPILE=0`` disables it; a compilation
  failure warns once and falls back to ``torch``);
- ``torch``: the same vectorised implementation, eager, everywhere else.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import Tensor

from lightning_prune.ops import nm_prox_native
from lightning_prune.ops.nm_prox_torch import (
    compile_failure,
    compute_dtype,
    esym_cols,
    prox_groups,
    prox_groups_compiled,
    ranks,
)

__all__ = [
    "elementary_symmetric",
    "is_nm",
    "nm_group_fraction",
    "nm_prox",
    "nm_regularizer",
    "backend_for",
    "nm_topn_mask",
    "prox_backend",
]

Backend = Literal["auto", "native", "torch", "compiled"]
ResolvedBackend = Literal["native", "torch", "compiled"]  # what "auto" resolves to
COMPILE_ENV = "LIGHTNING_PRUNE_NM_COMPILE"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _check_nm(n: int, m: int) -> None:
    if m < 1 or n < 0 or n > m:
        raise ValueError(f"invalid N:M pattern {n}:{m} (need 0 <= n <= m, m >= 1)")


def _groups(w: Tensor, m: int, name: str | None = None) -> Tensor:
    """View ``w`` as ``[..., cols // m, m]``; raise ValueError naming the shape if impossible."""
    if w.dim() < 1 or w.shape[-1] % m != 0:
        where = f"{name}: " if name else ""
        raise ValueError(
            f"{where}tensor of shape {tuple(w.shape)} cannot be split into groups of m={m} along "
            f"its last dimension (last dim must be a multiple of {m})"
        )
    return w.reshape(*w.shape[:-1], w.shape[-1] // m, m)


def _lam_per_group(lam: float | Tensor, z: Tensor, group_shape: torch.Size) -> Tensor:
    """``lam`` as a (possibly expanded) tensor of ``group_shape`` in the compute dtype."""
    lam_t = torch.as_tensor(lam, dtype=compute_dtype(z.dtype), device=z.device)
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
    xf = x.to(compute_dtype(x.dtype))
    return esym_cols(list(xf.unbind(-1)), k).to(x.dtype)


def nm_regularizer(w: Tensor, n: int, m: int) -> Tensor:
    """Scalar ``sum_g e_{n+1}(|w_g|)`` over all groups; zero iff ``w`` is N:M sparse."""
    _check_nm(n, m)
    g = _groups(w, m)
    if n + 1 > m:
        return torch.zeros((), dtype=w.dtype, device=w.device)
    a = g.to(compute_dtype(w.dtype)).abs()
    if n == 2 and m == 4:
        a0, a1, a2, a3 = a.unbind(-1)
        pen = (a0 * a1) * (a2 + a3) + (a2 * a3) * (a0 + a1)
    else:
        pen = esym_cols(list(a.unbind(-1)), n + 1)
    return pen.sum().to(w.dtype)


def nm_topn_mask(w: Tensor, n: int, m: int) -> Tensor:
    """Boolean mask keeping the ``n`` largest ``|w|`` of each group (ties: lower index wins)."""
    _check_nm(n, m)
    a = _groups(w, m).abs()
    if a.is_floating_point():
        a = a.to(compute_dtype(w.dtype))
    return (ranks(a) < n).reshape(w.shape)


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
# prox: dispatch
# --------------------------------------------------------------------------------------------
def _native_fits(device: torch.device, dtype: torch.dtype, n: int, m: int) -> bool:
    return (n, m) == (2, 4) and device.type == "cpu" and dtype in nm_prox_native.NATIVE_DTYPES


def _compile_enabled() -> bool:
    return os.environ.get(COMPILE_ENV, "1").lower() not in ("0", "false", "no", "off")


def prox_backend(z: Tensor, n: int, m: int) -> ResolvedBackend:
    """The implementation ``nm_prox(z, lam, n, m)`` uses for ``z``; see ``backend_for``."""
    return backend_for(z.device, z.dtype, n, m)


def backend_for(device: torch.device | str, dtype: torch.dtype, n: int, m: int) -> ResolvedBackend:
    """``native`` (2:4 on CPU, float32/bf16/fp16, kernel loaded), ``compiled`` (CUDA, unless
    ``LIGHTNING_PRUNE_NM_COMPILE=0`` or compiling failed before), else ``torch``."""
    device = torch.device(device)
    if _native_fits(device, dtype, n, m) and nm_prox_native.kernel() is not None:
        return "native"
    if device.type == "cuda" and _compile_enabled() and compile_failure() is None:
        return "compiled"
    return "torch"


def _native_or_raise(z: Tensor, n: int, m: int, name: str | None):
    """The native kernel for an explicit ``backend="native"``; ValueError if it cannot serve."""
    what = f"{name}: " if name else ""
    if not _native_fits(z.device, z.dtype, n, m):
        raise ValueError(
            f"{what}the native nm_prox kernel handles 2:4 float32/bf16/fp16 CPU tensors, got "
            f"{n}:{m} on a {z.dtype} {z.device.type} tensor of shape {tuple(z.shape)}"
        )
    fn = nm_prox_native.kernel()
    if fn is None:
        raise RuntimeError(
            f"{what}native nm_prox kernel unavailable ({nm_prox_native.unavailable_reason()})"
        )
    return fn


def _prox_vectorised(
    z: Tensor, g: Tensor, lam_g: Tensor, n: int, max_sweeps: int, tol: float, compiled: bool
) -> Tensor:
    """Vectorised torch prox of ``z`` (groups ``g``) in the compute dtype, shaped like ``z``."""
    flat = g.to(compute_dtype(z.dtype)).reshape(-1, g.shape[-1])
    lam_f = lam_g.reshape(-1).contiguous()
    fn = prox_groups_compiled if compiled else prox_groups
    return fn(flat, lam_f, n, max_sweeps, tol).reshape(z.shape)


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
    backend: Backend = "auto",
    name: str | None = None,
) -> Tensor:
    """Group-wise prox ``argmin_w 1/2 ||w - z||^2 + lam * sum_g e_{n+1}(|w_g|)`` (EnumALM).

    ``lam`` is a float or a non-negative tensor broadcastable to the per-group shape
    ``[..., cols // m]`` (e.g. a per-row ``[rows, 1]``).  For every support size ``k`` in
    ``n..m`` the candidate supported on the top-``k`` magnitudes is solved (closed form for
    ``k = n``, Gauss-Seidel coordinate descent otherwise, at most ``max_sweeps`` sweeps, a group
    stops once a sweep moves it less than ``tol`` (or a few ulps of its largest entry)) and the
    lowest objective wins.  Signs of ``z`` are kept.  ``out`` (same shape and dtype as ``z``,
    may be ``z`` itself for an in-place update) receives the result if given.  ``backend``
    forces an implementation (``auto``: ``prox_backend``); ``name`` (e.g. the layer's) prefixes
    error messages.
    """
    _check_nm(n, m)
    if max_sweeps < 0:
        raise ValueError(f"max_sweeps must be >= 0, got {max_sweeps}")
    if backend not in ("auto", "native", "torch", "compiled"):
        raise ValueError(f"backend must be auto, native, torch or compiled, got {backend!r}")
    g = _groups(z, m, name)
    lam_g = _lam_per_group(lam, z, g.shape[:-1])
    if out is not None and (out.shape != z.shape or out.dtype != z.dtype):
        raise ValueError(
            f"out has shape {tuple(out.shape)} / {out.dtype}, expected {tuple(z.shape)} / {z.dtype}"
        )
    if backend == "auto":
        backend = prox_backend(z, n, m)
    kernel = _native_or_raise(z, n, m, name) if backend == "native" else None
    if n >= m or z.numel() == 0:  # the penalty e_{m+1} is identically zero
        return z.clone() if out is None else out.copy_(z)
    if kernel is not None:
        return nm_prox_native.prox24(kernel, z, lam_g, max_sweeps, tol, out)
    res = _prox_vectorised(z, g, lam_g, n, max_sweeps, tol, backend == "compiled")
    return res.to(z.dtype) if out is None else out.copy_(res)
