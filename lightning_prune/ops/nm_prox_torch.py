"""Vectorised torch implementation of the N:M prox (any device, any ``n:m``, compile-friendly).

Groups are processed all at once, coordinate-major (``[m, G]``): no Python loop runs over groups
or rows, only over the ``m`` coordinates, the candidate supports and the sweeps.  The work is
split into pure pieces with static control flow (``Pieces``), each of which
``torch.compile(fullgraph=True)`` traces into one graph.  The driver between them syncs with the
host once per ``rounds`` convergence checks, to stop when every group has converged and to drop
converged groups once few remain active (data-dependent shapes stay outside the pieces).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple, TypedDict

import torch
from torch import Tensor

WARMUP_ITERS = 15  # damped Jacobi warm-up iterations (groups not certified convex only)
WARMUP_DAMPING = 0.4
CHECK_EVERY = 2  # sweeps between convergence checks; a converged group stops at a check
_NEWTON_ITERS = 8  # uniform-shrink Newton steps for n >= 3 (6 reach float32 precision)
_COMPACT_BELOW = 0.5  # drop converged groups once at most this share of the rest is active
_ROUNDS_PER_SYNC = 4  # convergence checks between host syncs off CPU (on CPU: 1, to drop
# converged groups early; on CUDA a sync costs more than a few extra sweeps of a fused kernel)
_RECOMPILE_LIMIT = 64  # per piece: one graph per (n, k) and the odd view / size-1 variant


# --------------------------------------------------------------------------------------------
# helpers shared with the public module
# --------------------------------------------------------------------------------------------
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64, everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def esym_cols(cols: list[Tensor], k: int) -> Tensor:
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
            prev, cur = e[t - 1], e[t]
            if t == 1:
                term = c
            elif prev is None:
                continue
            else:
                term = prev * c
            e[t] = term if cur is None else cur + term
    out = e[k]
    return torch.zeros_like(cols[0]) if out is None else out


def ranks(a: Tensor) -> Tensor:
    """Rank of each entry of ``a`` (``[..., m]``) in its group: 0 = largest, ties -> lower index."""
    m = a.shape[-1]
    rdt = torch.uint8 if m <= 255 else torch.int32
    cols = a.unbind(-1)
    out = [torch.zeros(a.shape[:-1], dtype=rdt, device=a.device) for _ in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            i_first = cols[i] >= cols[j]
            out[j] = out[j] + i_first
            out[i] = out[i] + ~i_first
    return torch.stack(out, dim=-1)


# --------------------------------------------------------------------------------------------
# pure pieces (static control flow: each traces into one graph)
# --------------------------------------------------------------------------------------------
def _prepare(x: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted magnitudes ``s`` (``[m, G]``, descending) and each entry's rank (``[m, G]``, as
    ``ranks``: small integers, widened to int64 only where used as an index)."""
    a = x.abs()
    r = ranks(a)
    s = torch.zeros_like(a).scatter(1, r.long(), a)
    return s.t().contiguous(), r.t().contiguous()


def _uniform_shrink(a_k: Tensor, lam: Tensor, n: int) -> Tensor:
    """``rho`` in ``[0, 1]`` minimising the objective along ``w = rho * a`` (per group).

    Root of ``f = (rho - 1) |a|^2 + c rho^n`` with ``c = (n + 1) lam e_{n+1}(a)``: closed form
    for ``n <= 2``, else a fixed number of Newton steps from ``min(1, (|a|^2 / c)^(1/n))``, where
    ``f >= 0``: ``f`` is convex and increasing on ``[0, 1]``, so the iterates decrease
    monotonically to the root (float32 precision after 6 steps for ``c / |a|^2`` in 1e-8..1e14).
    """
    sq = (a_k * a_k).sum(0)
    c = (n + 1) * lam * esym_cols(list(a_k), n + 1)
    if n == 0:
        rho = torch.clamp(1.0 - c / sq, 0.0, 1.0)
    elif n == 1:
        rho = sq / (sq + c)
    elif n == 2:  # quadratic root in stable form
        rho = 2.0 * sq / (sq + torch.sqrt(sq * (sq + 4.0 * c)))
    else:
        rho = torch.clamp((sq / c) ** (1.0 / n), max=1.0)
        tiny = torch.finfo(sq.dtype).tiny
        for _ in range(_NEWTON_ITERS):
            f = (rho - 1.0) * sq + c * rho**n
            fp = sq + n * c * rho ** (n - 1)
            rho = torch.clamp(rho - f / torch.clamp_min(fp, tiny), 0.0, 1.0)
    return torch.where(sq > 0, rho, torch.ones_like(rho))


def _start(a_k: Tensor, lam: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Coordinate-descent start ``rho * a`` on a support (``a_k``: ``[k, G]``, descending), and
    the groups whose restricted objective is not certified convex on the box ``[0, a]``.

    Gershgorin on the Hessian of the penalty: ``lam (k - n) e_{n-1}(a without its smallest
    entry) > 1``.  Those groups get a damped Jacobi warm-up (``_warmup``) before the descent:
    plain Gauss-Seidel from ``rho * a`` can zero an entry whose optimum is far from zero.
    """
    k = a_k.shape[0]
    w = a_k * _uniform_shrink(a_k, lam, n)
    if n == 0:  # separable (soft threshold): convex
        return w, torch.zeros_like(lam, dtype=torch.bool)
    bound = lam * (k - n) * esym_cols(list(a_k[:-1]), n - 1)
    return w, bound > 1.0


def _warmup(a_k: Tensor, lam: Tensor, w: Tensor, nonconvex: Tensor, n: int) -> Tensor:
    """Damped Jacobi steps ``w <- lerp(w, max(a - lam e_n(w_{-i}), 0))`` on the ``nonconvex``
    groups (tied entries stay tied); the other groups keep ``w``."""
    k = a_k.shape[0]
    ww = w
    for _ in range(WARMUP_ITERS):
        jac = torch.stack([esym_cols([ww[j] for j in range(k) if j != i], n) for i in range(k)])
        ww = torch.lerp(ww, torch.clamp_min(a_k - lam * jac, 0.0), WARMUP_DAMPING)
    return torch.where(nonconvex, ww, w)


def _sweep(a_k: Tensor, lam: Tensor, w: Tensor, n: int) -> Tensor:
    """One Gauss-Seidel sweep ``w_i <- max(a_i - lam e_n(w_{-i}), 0)``, ``i = 0..k-1``."""
    rows = list(w.unbind(0))
    for i in range(len(rows)):
        e = esym_cols([rows[j] for j in range(len(rows)) if j != i], n)
        rows[i] = torch.clamp_min(a_k[i] - lam * e, 0.0)
    return torch.stack(rows)


def _cd_round(
    a_k: Tensor, lam: Tensor, w: Tensor, done: Tensor, atol: Tensor, n: int, sweeps: int
) -> tuple[Tensor, Tensor]:
    """``sweeps`` sweeps on the groups not ``done``; a group whose last sweep moved it at most
    ``atol`` is ``done`` from now on (its value no longer changes)."""
    prev = cur = w
    for _ in range(sweeps):
        prev, cur = cur, _sweep(a_k, lam, cur, n)
    moved = (cur - prev).abs().amax(0)
    return torch.where(done, w, cur), done | (moved <= atol)


def _finish(x: Tensor, s: Tensor, r: Tensor, lam: Tensor, cands: list[Tensor], n: int) -> Tensor:
    """Lowest-objective candidate (support top-``n`` .. top-``m``; ties -> sparser), in the
    original order and with the signs of ``x`` (``[G, m]``)."""
    m = s.shape[0]
    tail_sq = (s * s).flip(0).cumsum(0).flip(0)  # tail_sq[k] = sum_{j >= k} s_j^2
    best_obj = 0.5 * tail_sq[n] if n < m else torch.zeros_like(s[0])
    best_w = torch.cat([s[:n], torch.zeros_like(s[n:])])
    for k, w_k in enumerate(cands, start=n + 1):
        obj = 0.5 * ((w_k - s[:k]) ** 2).sum(0) + lam * esym_cols(list(w_k), n + 1)
        if k < m:
            obj = obj + 0.5 * tail_sq[k]
        better = obj < best_obj
        best_obj = torch.where(better, obj, best_obj)
        best_w = torch.where(better, torch.cat([w_k, torch.zeros_like(s[k:])]), best_w)
    return torch.copysign(torch.gather(best_w, 0, r.long()).t(), x)


class Pieces(NamedTuple):
    """The pure pieces of the prox, eager or compiled."""

    prepare: Callable
    start: Callable
    warmup: Callable
    cd_round: Callable
    finish: Callable


EAGER = Pieces(_prepare, _start, _warmup, _cd_round, _finish)


def compile_pieces(backend: str = "inductor") -> Pieces:
    """``EAGER`` with every piece compiled (dynamic shapes: one graph serves every layer shape
    and every shrinking active set; static ``n``, ``k`` and sweep counts)."""
    return Pieces(
        *(torch.compile(fn, backend=backend, fullgraph=True, dynamic=True) for fn in EAGER)
    )


def recompile_headroom():
    """Context raising torch.compile's recompile limit (default 8) to fit one graph per
    support size ``k`` and pattern in every piece."""
    cfg = torch._dynamo.config
    key = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    return cfg.patch(**{key: max(getattr(cfg, key), _RECOMPILE_LIMIT)})


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def _tol_eff(a_max: Tensor, tol: float) -> Tensor:
    """Per-group stopping threshold: ``tol``, relaxed to a few ulps of the largest magnitude."""
    return tol + 4.0 * torch.finfo(a_max.dtype).eps * a_max


def _start_point(a_k: Tensor, lam: Tensor, n: int, fns: Pieces) -> Tensor:
    """``fns.start``, then ``fns.warmup`` on the groups not certified convex: on those alone
    when they are few (at most half, and at least 2: see ``_cd_support``), else on all."""
    w, nonconvex = fns.start(a_k, lam, n)
    idx = nonconvex.nonzero().squeeze(1)
    if idx.numel() == 0:
        return w
    if 2 <= idx.numel() <= _COMPACT_BELOW * lam.numel():
        sub = fns.warmup(a_k[:, idx], lam[idx], w[:, idx], nonconvex[idx], n)
        return w.index_copy(1, idx, sub)
    return fns.warmup(a_k, lam, w, nonconvex, n)


def _cd_support(
    a_k: Tensor, lam: Tensor, n: int, max_sweeps: int, tol: float, fns: Pieces
) -> Tensor:
    """Coordinate descent on the top-``k`` support (``a_k``: ``[k, G]``), at most
    ``max_sweeps`` sweeps.  Converged groups are dropped once at most half of the groups in
    play are active (and at least 2: ``torch.compile`` specialises sizes 0 and 1)."""
    w = _start_point(a_k, lam, n, fns)
    rounds = 1 if a_k.device.type == "cpu" else _ROUNDS_PER_SYNC
    active: Tensor | None = None  # indices (into w) of the groups in aw; None: all
    aa, al, aw, atol = a_k, lam, w, _tol_eff(a_k[0], tol)
    done = torch.zeros_like(lam, dtype=torch.bool)
    sweeps = 0
    while sweeps < max_sweeps:
        for _ in range(rounds):
            todo = min(CHECK_EVERY, max_sweeps - sweeps)
            if todo == 0:
                break
            aw, done = fns.cd_round(aa, al, aw, done, atol, n, todo)
            sweeps += todo
        left = (~done).nonzero().squeeze(1) if sweeps < max_sweeps else None
        if left is None or left.numel() == 0:
            break
        if 2 <= left.numel() <= _COMPACT_BELOW * done.numel():
            w = aw if active is None else w.index_copy(1, active, aw)
            active = left if active is None else active[left]
            aa, al, aw, atol = aa[:, left], al[left], aw[:, left], atol[left]
            done = done[left]
    return aw if active is None else w.index_copy(1, active, aw)


def prox_groups(
    x: Tensor, lam: Tensor, n: int, max_sweeps: int, tol: float, fns: Pieces = EAGER
) -> Tensor:
    """Prox of ``lam * e_{n+1}(|w|)`` for every group (row) of ``x`` (``[G, m]``, float32 or
    float64, signed; ``lam``: ``[G]``): candidates on the top-``k`` supports, ``k = n..m``
    (``k = n`` in closed form), the lowest objective wins.  Returns ``[G, m]`` (signs kept)."""
    s, r = fns.prepare(x)
    cands = []
    for k in range(n + 1, x.shape[1] + 1):
        a_k = s[:k].clone()  # not a view: torch.compile guards views on their base's shape
        cands.append(_cd_support(a_k, lam, n, max_sweeps, tol, fns))
    return fns.finish(x, s, r, lam, cands, n)


# --------------------------------------------------------------------------------------------
# compiled entry point with a clean fallback
# --------------------------------------------------------------------------------------------
class _CompileState(TypedDict, total=False):
    pieces: Pieces  # the compiled pieces, once built
    failed: str  # why compiling failed (then the eager path runs from now on)


_compile_state: _CompileState = {}


def compile_failure() -> str | None:
    """Why the compiled prox fell back to eager in this process (None: it has not)."""
    reason = _compile_state.get("failed")
    return None if reason is None else str(reason)


def _give_up_compiling(err: Exception) -> None:
    """Record why compiling failed and warn (once: later calls no longer try)."""
    first = str(err).splitlines()[0] if str(err) else ""
    _compile_state["failed"] = reason = f"{type(err).__name__}: {first}"
    warnings.warn(
        f"nm_prox: torch.compile of the vectorised prox failed ({reason}); "
        "using the eager torch path from now on",
        RuntimeWarning,
        stacklevel=4,
    )


def prox_groups_compiled(x: Tensor, lam: Tensor, n: int, max_sweeps: int, tol: float) -> Tensor:
    """``prox_groups`` through ``torch.compile``d pieces; if compiling or running them fails,
    warn once and use the eager pieces from then on (the inputs are never modified)."""
    if "failed" not in _compile_state:
        try:
            if "pieces" not in _compile_state:
                _compile_state["pieces"] = compile_pieces()
            with recompile_headroom():
                return prox_groups(x, lam, n, max_sweeps, tol, _compile_state["pieces"])
        except torch.cuda.OutOfMemoryError:  # not a compiler failure
            raise
        except Exception as err:  # any compiler failure means: run eager
            _give_up_compiling(err)
    return prox_groups(x, lam, n, max_sweeps, tol)
