"""The vectorised torch prox (the CUDA path, run here on CPU tensors) and the prox dispatch."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_nm_prox import _brute_force, _objective

from lightning_prune.ops import nm_prox_native, nm_prox_torch
from lightning_prune.ops.nm_prox import backend_for, nm_prox, prox_backend

PATTERNS = [(2, 4), (1, 4), (2, 8), (4, 8)]
KINDS = ["fp32", "bf16_in_fp32", "ties_and_zeros"]
native = pytest.mark.skipif(nm_prox_native.kernel() is None, reason="no native 2:4 kernel")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _inputs(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """float32 weights: plain normal, rounded to bf16 (many near-ties), or on a coarse grid
    (exact ties) with exact zeros; row scales spread over two decades."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, cols, generator=gen) * torch.logspace(-1, 1, rows)[:, None]
    if kind == "bf16_in_fp32":
        z = z.bfloat16().float()
    elif kind == "ties_and_zeros":
        z = (z * 2).round() / 2
        z[::5, ::3] = 0.0
    return z


def _group_objective(w: torch.Tensor, z: torch.Tensor, lam, n: int, m: int) -> torch.Tensor:
    """Objective of every group of ``w`` (float64), ``lam`` a float or a ``[rows, 1]`` tensor."""
    lam_g = torch.as_tensor(lam, dtype=torch.float64).expand(z.shape[0], z.shape[1] // m)
    return _objective(w.reshape(-1, m), z.double().abs().reshape(-1, m), lam_g.reshape(-1), n)


def _assert_is_prox_of(w: torch.Tensor, z: torch.Tensor) -> None:
    assert w.shape == z.shape and w.dtype == z.dtype
    assert bool(((w == 0) | (torch.sign(w) == torch.sign(z))).all()), "signs of z not kept"
    assert bool((w.abs() <= z.abs() * (1 + 1e-6)).all()), "the prox only shrinks"


@native
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lam", [1e-4, 1e-2, 0.3, 3.0, 1e4, "per_row"])
def test_torch_matches_native_2_4(kind: str, lam) -> None:
    z = _inputs(kind, 48, 256, seed=11)
    if lam == "per_row":
        lam = torch.logspace(-3, 1, 48)[:, None]
    ref = nm_prox(z, lam, 2, 4, backend="native")
    got = nm_prox(z, lam, 2, 4, backend="torch")
    _assert_is_prox_of(got, z)
    scale = 1.0 + (z.double().reshape(-1, 4) ** 2).sum(-1)
    gap = (_group_objective(got, z, lam, 2, 4) - _group_objective(ref, z, lam, 2, 4)).abs()
    assert bool((gap <= 1e-6 * scale).all()), f"objective gap {float((gap / scale).max()):.3g}"
    # the minimiser itself: equal except where ties make it non-unique (a handful of groups)
    differ = ((got - ref).abs() > 1e-3 * z.abs().amax()).sum().item()
    assert differ <= 4, f"{differ} entries differ from the native kernel"


@pytest.mark.parametrize(("n", "m"), PATTERNS)
@pytest.mark.parametrize("kind", KINDS)
def test_torch_at_least_as_good_as_brute_force(n: int, m: int, kind: str) -> None:
    """Against the global minimum of every group (all supports, multi-start), float64."""
    z = _inputs(kind, 6, 8 * m, seed=n * 10 + m).reshape(-1, m)
    z = z / z.abs().amax(-1, keepdim=True).clamp_min(1e-12)  # unit groups: lam is relative
    for lam in (1e-3, 0.1, 1.0, 30.0):
        w = nm_prox(z, lam, n, m, backend="torch")
        _assert_is_prox_of(w, z)
        lam_g = torch.full((z.shape[0],), lam, dtype=torch.float64)
        best = _brute_force(z.double().abs(), lam_g, n, starts=3, sweeps=15)
        ours = _objective(w, z.double().abs(), lam_g, n)
        assert bool((ours <= best + 1e-5 * (1 + (z.double() ** 2).sum(-1))).all()), (n, m, lam)


@pytest.mark.parametrize(("n", "m"), PATTERNS)
def test_torch_half_precision_inputs(n: int, m: int) -> None:
    z = _inputs("fp32", 16, 64, seed=5)
    for dtype in (torch.bfloat16, torch.float16):
        w = nm_prox(z.to(dtype), 0.5, n, m, backend="torch")
        assert w.dtype == dtype
        ref = nm_prox(z.to(dtype).float(), 0.5, n, m, backend="torch").to(dtype)
        assert torch.equal(w, ref)  # computed in float32, rounded once


def test_torch_path_is_pure_and_handles_out() -> None:
    z = _inputs("ties_and_zeros", 8, 32, seed=3)
    before = z.clone()
    w = nm_prox(z, 1.0, 2, 4, backend="torch")
    assert torch.equal(z, before)
    res = nm_prox(z, 1.0, 2, 4, backend="torch", out=z)
    assert res is z and torch.equal(z, w)


def test_pieces_compile_without_graph_breaks() -> None:
    """Every piece traces into one graph (``fullgraph=True``; the eager backend keeps it quick)
    and gives the eager pieces' result."""
    x = _inputs("bf16_in_fp32", 24, 32, seed=8).reshape(-1, 4)
    lam = torch.logspace(-2, 1, x.shape[0])
    ref = nm_prox_torch.prox_groups(x, lam, 2, 100, 1e-8)
    with nm_prox_torch.recompile_headroom():
        fns = nm_prox_torch.compile_pieces("eager")
        got = nm_prox_torch.prox_groups(x, lam, 2, 100, 1e-8, fns)
    assert torch.equal(got, ref)


def test_compile_failure_falls_back_once(monkeypatch) -> None:
    def broken(*args):
        raise RuntimeError("no backend here")

    monkeypatch.setattr(nm_prox_torch, "_compile_state", {})
    pieces = nm_prox_torch.Pieces(*[broken] * len(nm_prox_torch.Pieces._fields))
    monkeypatch.setattr(nm_prox_torch, "compile_pieces", lambda: pieces)
    z = _inputs("fp32", 8, 32, seed=4)
    ref = nm_prox(z, 0.5, 2, 8, backend="torch")
    with pytest.warns(RuntimeWarning, match="torch.compile of the vectorised prox failed"):
        assert torch.equal(nm_prox(z, 0.5, 2, 8, backend="compiled"), ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert torch.equal(nm_prox(z, 0.5, 2, 8, backend="compiled"), ref)
    assert "no backend here" in nm_prox_torch.compile_failure()


def test_dispatch(monkeypatch) -> None:
    z = torch.randn(4, 16)
    expect = "native" if nm_prox_native.kernel() is not None else "torch"
    assert prox_backend(z, 2, 4) == expect
    assert prox_backend(z.bfloat16(), 2, 4) == expect
    assert prox_backend(z.double(), 2, 4) == "torch"
    assert prox_backend(z, 1, 4) == "torch"
    meta = torch.empty(4, 16, device="meta")  # neither CPU nor CUDA
    assert prox_backend(meta, 2, 4) == "torch"
    monkeypatch.setattr(nm_prox_torch, "_compile_state", {})
    assert backend_for("cuda", torch.bfloat16, 2, 4) == "compiled"
    assert backend_for("cuda:1", torch.float32, 4, 8) == "compiled"
    monkeypatch.setenv("LIGHTNING_PRUNE_NM_COMPILE", "0")
    assert backend_for("cuda", torch.float32, 2, 4) == "torch"
    monkeypatch.delenv("LIGHTNING_PRUNE_NM_COMPILE")
    monkeypatch.setattr(nm_prox_torch, "_compile_state", {"failed": "earlier failure"})
    assert backend_for("cuda", torch.float32, 2, 4) == "torch"


@pytest.mark.parametrize("backend", ["auto", "native", "torch", "compiled"])
def test_refused_shape_names_layer_and_expectation(backend: str) -> None:
    with pytest.raises(ValueError, match=r"layers\.3\.mlp\.up_proj: .*\(3, 6\).*multiple of 4"):
        nm_prox(torch.randn(3, 6), 0.1, 2, 4, backend=backend, name="layers.3.mlp.up_proj")


def test_native_refuses_what_it_cannot_serve() -> None:
    with pytest.raises(ValueError, match=r"q_proj: .*2:4.*got 1:4 .*\(3, 8\)"):
        nm_prox(torch.randn(3, 8), 0.1, 1, 4, backend="native", name="q_proj")
    with pytest.raises(ValueError, match="2:4"):
        nm_prox(torch.randn(3, 8, dtype=torch.float64), 0.1, 2, 4, backend="native")
    with pytest.raises(ValueError, match="backend"):
        nm_prox(torch.randn(3, 8), 0.1, 2, 4, backend="cuda")
