"""Tests for lightning_prune.ops.nm_prox (N:M regulariser, prox, masks)."""

from __future__ import annotations

import itertools
import math
import warnings
from importlib import resources

import pytest
import torch

from lightning_prune.ops import nm_prox_native
from lightning_prune.ops.nm_prox import (
    elementary_symmetric,
    is_nm,
    nm_group_fraction,
    nm_prox,
    nm_regularizer,
    nm_topn_mask,
)

LAM_RELS = [1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0]
SCALES = [1e-2, 1.0, 10.0]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _native_available() -> bool:
    return nm_prox_native.kernel() is not None


BACKENDS_24 = [
    pytest.param(
        "native",
        marks=pytest.mark.skipif(not _native_available(), reason="no native 2:4 kernel"),
    ),
    "torch",
]


def _prox(backend: str, z: torch.Tensor, lam, n: int, m: int) -> torch.Tensor:
    """Run the prox through a chosen implementation (``public``: the default dispatch)."""
    return nm_prox(z, lam, n, m, backend="auto" if backend == "public" else backend)


# ----------------------------------------------------------------------------------------------
# independent float64 reference: objective and brute-force global minimisation
# ----------------------------------------------------------------------------------------------
def _esym_ref(cols: list[torch.Tensor], k: int) -> torch.Tensor:
    e = [torch.ones_like(cols[0])] + [torch.zeros_like(cols[0]) for _ in range(k)]
    for c in cols:
        for t in range(k, 0, -1):
            e[t] = e[t] + c * e[t - 1]
    return e[k]


def _objective(w: torch.Tensor, a: torch.Tensor, lam: torch.Tensor, n: int) -> torch.Tensor:
    """1/2 ||w - a||^2 + lam e_{n+1}(|w|) per group (last dim), float64."""
    w = w.double().abs()
    return 0.5 * ((w - a) ** 2).sum(-1) + lam * _esym_ref(list(w.unbind(-1)), n + 1)


def _brute_force(
    a: torch.Tensor, lam: torch.Tensor, n: int, starts: int, sweeps: int, seed: int = 0
) -> torch.Tensor:
    """Global minimum of 1/2||w - a||^2 + lam e_{n+1}(w) over w >= 0 for each group of ``a``.

    Enumerates *every* support subset S (not only the top-k ones).  |S| <= n: the penalty is 0,
    so w = a on S.  |S| > n: multi-start projected coordinate descent (exact 1-D minimisation,
    random coordinate order) on S, from ``starts`` points of the box [0, a_S] (one of them a_S).
    """
    g, m = a.shape
    gen = torch.Generator().manual_seed(seed)
    total = (a**2).sum(-1)
    best = 0.5 * total  # w = 0
    lam_b = lam[:, None, None]
    for r in range(1, m + 1):
        subsets = torch.tensor(list(itertools.combinations(range(m), r)))  # [P, r]
        a_s = a[:, subsets]  # [G, P, r]
        rest = 0.5 * (total[:, None] - (a_s**2).sum(-1))  # cost of zeroing the complement
        if r <= n:
            best = torch.minimum(best, rest.min(-1).values)
            continue
        a_s = a_s[:, :, None, :].expand(g, subsets.shape[0], starts, r)
        w = a_s * torch.rand(a_s.shape, generator=gen, dtype=a.dtype)
        w[:, :, 0] = a_s[:, :, 0]
        for _ in range(sweeps):
            for i in torch.randperm(r, generator=gen).tolist():
                e = _esym_ref([w[..., j] for j in range(r) if j != i], n)
                w[..., i] = torch.clamp(a_s[..., i] - lam_b * e, min=0.0)
        obj = 0.5 * ((w - a_s) ** 2).sum(-1) + lam_b * _esym_ref(list(w.unbind(-1)), n + 1)
        obj = obj + rest[:, :, None]
        best = torch.minimum(best, obj.reshape(g, -1).min(-1).values)
    return best


def _random_groups(g: int, m: int, seed: int) -> torch.Tensor:
    """Standard-normal groups with a heavy tail, some exact zeros and some ties."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(g, m, generator=gen, dtype=torch.float64)
    q = g // 4
    z[:q] *= 3 * torch.rand(q, 1, generator=gen, dtype=torch.float64)  # spread of group scales
    z[q : q + 8, 1] = 0.0
    z[q + 8 : q + 16, 2] = z[q + 8 : q + 16, 0]  # ties in magnitude
    z[q + 16 : q + 24, 3] = -z[q + 16 : q + 24, 1]
    z[q + 24 : q + 28] = 1.0
    return z.float().double()  # exactly representable in float32


def _check_signs(w: torch.Tensor, z: torch.Tensor) -> None:
    w, z = w.double(), z.double()
    assert bool(((w == 0) | (torch.sign(w) == torch.sign(z))).all()), "sign of z not kept"
    assert bool((w.abs() <= z.abs() * (1 + 1e-6)).all()), "prox must shrink magnitudes"


def _compare_to_brute(backend: str, n: int, m: int, g: int, lam_rels, starts: int, sweeps: int):
    for i, lam_rel in enumerate(lam_rels):
        z_unit = _random_groups(g, m, seed=100 * m + 10 * n + i)
        a_unit = z_unit.abs()
        lam_unit = torch.full((g,), lam_rel, dtype=torch.float64)
        ref = _brute_force(a_unit, lam_unit, n, starts=starts, sweeps=sweeps, seed=i)
        tol = 1e-5 * (1.0 + (a_unit**2).sum(-1))
        for scale in SCALES:
            # scale invariance: prox(s z; lam_rel / s^(n-1)) = s prox(z; lam_rel)
            lam = lam_rel / scale ** (n - 1)
            z = (z_unit * scale).float()
            w = _prox(backend, z, lam, n, m)
            assert w.shape == z.shape and w.dtype == z.dtype
            _check_signs(w, z)
            ours = _objective(w / scale, a_unit, lam_unit, n)
            excess = ours - ref
            worst = int(excess.argmax())
            assert bool((excess <= tol).all()), (
                f"{n}:{m} {backend} lam_rel={lam_rel} scale={scale}: objective "
                f"{ours[worst].item():.8g} > brute force {ref[worst].item():.8g} "
                f"for |z|={a_unit[worst].tolist()}"
            )


# ----------------------------------------------------------------------------------------------
# prox vs brute force
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS_24)
def test_prox_2_4_matches_brute_force(backend: str) -> None:
    _compare_to_brute(backend, 2, 4, g=1500, lam_rels=LAM_RELS, starts=8, sweeps=25)


def test_prox_1_4_matches_brute_force() -> None:
    _compare_to_brute("public", 1, 4, g=1500, lam_rels=LAM_RELS, starts=8, sweeps=25)


@pytest.mark.parametrize("n", [2, 4])
def test_prox_x_8_matches_brute_force(n: int) -> None:
    lam_rels = [1e-3, 0.1, 1.0, 10.0] if n == 2 else [1e-3, 0.03, 1.0]
    _compare_to_brute("public", n, 8, g=120, lam_rels=lam_rels, starts=3, sweeps=15)


@pytest.mark.parametrize("backend", BACKENDS_24)
def test_prox_2_4_below_fine_grid(backend: str) -> None:
    """Grid search (independent of coordinate descent): w0..w2 on a grid, w3 exact."""
    k = 25
    g = 200
    z = _random_groups(g, 4, seed=7)
    a = z.abs()
    t = torch.linspace(0, 1, k, dtype=torch.float64)
    for lam_rel in [0.05, 0.3, 1.0, 3.0]:
        lam = torch.full((g,), lam_rel, dtype=torch.float64)
        w0 = a[:, 0, None, None, None] * t[:, None, None]
        w1 = a[:, 1, None, None, None] * t[None, :, None]
        w2 = a[:, 2, None, None, None] * t[None, None, :]
        lb = lam[:, None, None, None]
        w3 = torch.clamp(a[:, 3, None, None, None] - lb * (w0 * w1 + w2 * (w0 + w1)), min=0.0)
        obj = 0.5 * (
            (w0 - a[:, 0, None, None, None]) ** 2
            + (w1 - a[:, 1, None, None, None]) ** 2
            + (w2 - a[:, 2, None, None, None]) ** 2
            + (w3 - a[:, 3, None, None, None]) ** 2
        ) + lb * (w0 * w1 * (w2 + w3) + w2 * w3 * (w0 + w1))
        grid_best = obj.reshape(g, -1).min(-1).values
        w = _prox(backend, z.float(), lam_rel, 2, 4)
        ours = _objective(w, a, lam, 2)
        assert bool((ours <= grid_best + 1e-5 * (1 + (a**2).sum(-1))).all())


# ----------------------------------------------------------------------------------------------
# prox: behaviour
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (2, 8), (4, 8)])
def test_prox_limits(n: int, m: int) -> None:
    torch.manual_seed(0)
    z = torch.randn(16, 4 * m) * 0.05
    z_before = z.clone()
    assert torch.equal(nm_prox(z, 0.0, n, m), z)  # lam = 0: identity
    kept = z * nm_topn_mask(z, n, m)
    assert torch.equal(nm_prox(kept, 1e3, n, m), kept)  # N:M input: penalty-free, unchanged
    huge = nm_prox(z, 1e9, n, m)  # lam -> inf: best candidate is the top-n support
    assert is_nm(huge, n, m)
    assert torch.equal(huge, kept)
    assert torch.equal(nm_prox(z, 5.0, m, m), z)  # n = m: no penalty
    assert torch.equal(z, z_before)  # the input is never modified


def test_prox_per_row_lambda_and_out() -> None:
    torch.manual_seed(1)
    z = torch.randn(12, 40) * 0.05
    lam_rows = torch.linspace(0.0, 3.0, 12)[:, None]
    w = nm_prox(z, lam_rows, 2, 4)
    for r in range(12):
        one = nm_prox(z[r : r + 1], lam_rows[r].item(), 2, 4)[0]
        torch.testing.assert_close(w[r], one, rtol=1e-5, atol=1e-7)
    lam_groups = torch.rand(12, 10) * 2  # one lambda per group
    w_g = nm_prox(z, lam_groups, 2, 4)
    for r, c in [(0, 0), (3, 7), (11, 9)]:
        one = nm_prox(z[r : r + 1, 4 * c : 4 * c + 4], lam_groups[r, c].item(), 2, 4)
        torch.testing.assert_close(w_g[r : r + 1, 4 * c : 4 * c + 4], one, rtol=1e-5, atol=1e-7)
    z2 = z.clone()
    res = nm_prox(z2, lam_rows, 2, 4, out=z2)  # in place
    assert res is z2 and torch.equal(z2, w)
    with pytest.raises(ValueError, match="broadcastable"):
        nm_prox(z, torch.ones(5, 1), 2, 4)
    with pytest.raises(ValueError, match="non-negative"):
        nm_prox(z, -1.0, 2, 4)


@pytest.mark.skipif(not _native_available(), reason="no native 2:4 kernel")
def test_native_matches_torch() -> None:
    torch.manual_seed(2)
    z = torch.randn(97, 4 * 77) * 0.05  # odd sizes: tail blocks, rows straddling blocks
    z[:5] *= 20
    lam = torch.rand(97, 1) * 2
    a = _prox("native", z, lam, 2, 4)
    b = _prox("torch", z, lam, 2, 4)
    a_ref = z.double().abs().view(-1, 4)
    lam_ref = lam.double().repeat_interleave(77)
    oa, ob = (
        _objective(a.view(-1, 4), a_ref, lam_ref, 2),
        _objective(b.view(-1, 4), a_ref, lam_ref, 2),
    )
    assert torch.allclose(oa, ob, rtol=1e-5, atol=1e-12)
    assert (a - b).abs().max().item() < 1e-5
    # non-contiguous input and 3-D input go through the same kernel; the input is not modified
    zt = z.t().contiguous().t()
    zt_before = zt.clone()
    assert torch.equal(nm_prox(zt, lam, 2, 4), a)
    assert torch.equal(zt, zt_before)
    z3 = z.view(97, 1, -1)
    assert torch.equal(nm_prox(z3, lam[:, :, None], 2, 4).view_as(a), a)


def test_native_source_ships_and_build_says_why_not(monkeypatch) -> None:
    source = resources.files("lightning_prune.ops").joinpath("csrc", nm_prox_native.SOURCE)
    assert source.is_file()
    monkeypatch.setenv(nm_prox_native.NATIVE_ENV, "0")
    assert nm_prox_native._build() == (None, f"disabled by {nm_prox_native.NATIVE_ENV}")
    monkeypatch.delenv(nm_prox_native.NATIVE_ENV)
    monkeypatch.setattr(nm_prox_native, "_compiler", lambda: "cc")
    monkeypatch.setattr(nm_prox_native, "SOURCE", "missing.c")
    fn, reason = nm_prox_native._build()
    assert fn is None and "missing.c" in reason


def test_native_failure_warns_once_and_falls_back(monkeypatch) -> None:
    monkeypatch.setattr(nm_prox_native, "_state", {})
    monkeypatch.setattr(nm_prox_native, "_build", lambda: (None, "no luck"))
    z = torch.randn(4, 16)
    with pytest.warns(RuntimeWarning, match="native 2:4 kernel unavailable"):
        w = nm_prox(z, 0.5, 2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(nm_prox(z, 0.5, 2, 4), w)
    assert torch.equal(w, nm_prox(z, 0.5, 2, 4, backend="torch"))
    assert nm_prox_native.unavailable_reason() == "no luck"
    with pytest.raises(RuntimeError, match="no luck"):
        nm_prox(z, 0.5, 2, 4, backend="native")


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (2, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_prox_dtypes(n: int, m: int, dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    z = torch.randn(8, 32) * 0.05
    w = nm_prox(z.to(dtype), 1.0, n, m)
    assert w.dtype == dtype and w.shape == z.shape
    ref = nm_prox(z.to(dtype).float(), 1.0, n, m)
    assert torch.allclose(w.float(), ref.to(dtype).float(), atol=1e-2 * 0.05)
    assert nm_regularizer(z.to(dtype), n, m).dtype == dtype
    assert elementary_symmetric(z.to(dtype), 2).dtype == dtype


# ----------------------------------------------------------------------------------------------
# polynomials, regulariser, masks, shape checks
# ----------------------------------------------------------------------------------------------
def test_elementary_symmetric_against_itertools() -> None:
    torch.manual_seed(4)
    x = torch.randn(3, 5, dtype=torch.float64)
    for k in range(0, 7):
        ref = torch.zeros(3, dtype=torch.float64)
        for combo in itertools.combinations(range(5), k):
            ref += torch.prod(x[:, list(combo)], dim=-1) if combo else 1.0
        assert torch.allclose(elementary_symmetric(x, k), ref, rtol=1e-12, atol=1e-12), k
    assert torch.allclose(
        elementary_symmetric(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2), torch.tensor(35.0)
    )
    with pytest.raises(ValueError):
        elementary_symmetric(x, -1)


def test_regularizer_formula_and_zero_set() -> None:
    torch.manual_seed(5)
    w = torch.randn(6, 16, dtype=torch.float64)
    a = w.abs().view(-1, 4)
    w1, w2, w3, w4 = a.unbind(-1)
    explicit = (w1 * w2 * w3 + w2 * w3 * w4 + w3 * w4 * w1 + w4 * w1 * w2).sum()
    assert torch.allclose(nm_regularizer(w, 2, 4), explicit, rtol=1e-12)
    for n, m in [(1, 4), (2, 4), (2, 8), (4, 8), (3, 16)]:
        assert nm_regularizer(w, n, m).item() > 0
        ref = sum(
            math.prod(g[list(c)].tolist())
            for g in w.abs().reshape(-1, m)
            for c in itertools.combinations(range(m), n + 1)
        )
        assert math.isclose(nm_regularizer(w, n, m).item(), ref, rel_tol=1e-10)
        sparse = w * nm_topn_mask(w, n, m)
        assert nm_regularizer(sparse, n, m).item() == 0.0
        assert is_nm(sparse, n, m) and not is_nm(w, n, m)
    # gradient flows (usable as a loss term)
    p = w.clone().requires_grad_(True)
    nm_regularizer(p, 2, 4).backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()


def test_topn_mask() -> None:
    torch.manual_seed(6)
    w = torch.randn(10, 24)
    for n, m in [(1, 4), (2, 4), (3, 4), (2, 8), (4, 8)]:
        mask = nm_topn_mask(w, n, m)
        assert mask.dtype == torch.bool and mask.shape == w.shape
        assert bool((mask.view(-1, m).sum(-1) == n).all())
        assert is_nm(w * mask, n, m)
        top = w.abs().view(-1, m).topk(n, dim=-1).indices  # no ties in random data
        ref = torch.zeros(w.numel() // m, m, dtype=torch.bool).scatter_(1, top, True)
        assert torch.equal(mask.view(-1, m), ref)
    ties = torch.tensor([[1.0, -1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    assert nm_topn_mask(ties, 2, 4).tolist() == [[True, True, False, False] * 2]
    assert torch.equal(nm_topn_mask(ties, 2, 4), nm_topn_mask(ties, 2, 4))


def test_group_fraction_and_is_nm() -> None:
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    assert nm_group_fraction(w, 2, 4) == 0.5
    assert nm_group_fraction(w, 3, 4) == 1.0
    assert not is_nm(w, 2, 4) and is_nm(w, 3, 4)
    assert is_nm(torch.zeros(4, 8), 0, 4)


@pytest.mark.parametrize(
    "fn",
    [
        lambda w: nm_prox(w, 0.1, 2, 4),
        lambda w: nm_regularizer(w, 2, 4),
        lambda w: nm_topn_mask(w, 2, 4),
        lambda w: nm_group_fraction(w, 2, 4),
        lambda w: is_nm(w, 2, 4),
    ],
)
def test_bad_shape_raises(fn) -> None:
    with pytest.raises(ValueError, match=r"\(3, 6\)"):
        fn(torch.randn(3, 6))
