"""1 rank vs DDP 2 ranks vs FSDP2 2 ranks (CPU, gloo) on the 2-layer truncated default model.

Every run sees the same global batch (2 sequences: batch_size 2 on one rank, 1 per rank on two).
Tolerances: minimax agrees to float32 summation order (losses within 1e-5, identical masks).
Proximal: AdamW's first steps are ``lr * sign(g)`` for tiny gradients, so gradients that differ
in the last bits (another summation order) can move a weight by ``2 * lr`` and swap a near-tie
inside a group; losses agree within 1e-3 and masks on >= 99.9% of entries, while the training
itself moves far more entries than that. Each fit runs once (module-scoped fixture).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_prune.checkpoints import load_learned_state
from lightning_prune.module import PruningModule
from lightning_prune.ops.nm_prox import nm_topn_mask

CONFIGS = Path(__file__).parents[1] / "configs"
RECIPES = {
    "proximal": [
        f"--config={CONFIGS / 'proxsparse_2of4.yaml'}",
        "--model.init_mask=null",
        "--model.regularizers.init_args.lam=1.0",
        "--model.solver.init_args.lr=1.0e-3",
    ],
    "minimax": [
        f"--config={CONFIGS / 'maskprune_uniform.yaml'}",
        "--model.mask_family.init_args.gate=sigmoid_topk",
        "--model.solver.init_args.warmup_ratio=0.0",
    ],
}
STRATEGIES = {
    "single": ["--trainer.devices=1", "--data.batch_size=2"],
    "ddp": [f"--config={CONFIGS / 'ddp.yaml'}", "--data.batch_size=1"],
    "fsdp2": [f"--config={CONFIGS / 'fsdp2.yaml'}", "--data.batch_size=1"],
}
LOSS_RTOL = {"proximal": 1e-3, "minimax": 1e-5}
MASK_AGREEMENT = {"proximal": 0.999, "minimax": 1.0}  # share of equal mask entries


def fit_args(solver: str, model: str, root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        *RECIPES[solver],
        f"--model.model={model}",
        "--data.seq_len=32",
        "--data.num_samples=6",
        "--data.eval_tokens=64",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
        *extra,
    ]


def launch(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the real console script (Lightning starts the other ranks itself), outside the
    repository folder so that only the installed package metadata is seen."""
    script = Path(sys.executable).with_name("lightning-prune")
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(
        [str(script), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def run_dir(root: Path) -> Path:
    return next((root / "lightning_logs").glob("version_*"))


def losses(root: Path) -> list[float]:
    with open(run_dir(root) / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("train/loss")]
    return [float(r["train/loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


def load_module(solver: str, model: str, ckpt: Path) -> PruningModule:
    """A fresh module of ``solver``'s recipe with a checkpoint (full or sharded) loaded."""
    from lightning_prune.cli_names import install_short_names

    install_short_names()
    if solver == "proximal":
        from lightning_prune.masks.nm import NMMaskFamily
        from lightning_prune.solvers.proximal import ProximalSolver

        module = PruningModule(NMMaskFamily(), ProximalSolver(), model=model)
    else:
        from lightning_prune.masks.structured import UniformStructuredFamily
        from lightning_prune.solvers.minimax import MinimaxSolver

        family = UniformStructuredFamily(budget=0.25, channel_multiple=32, gate="sigmoid_topk")
        module = PruningModule(family, MinimaxSolver(), model=model)
    load_learned_state(module, ckpt)
    return module


def hard_masks(module: PruningModule) -> dict[str, torch.Tensor]:
    module.mask_family.harden()
    return {n: p.hard_mask().clone() for n, p in module.mask_family.parametrizations().items()}


def disagreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Share of mask entries that differ."""
    assert a.keys() == b.keys()
    return sum(int((a[n] != b[n]).sum()) for n in a) / sum(a[n].numel() for n in a)


@pytest.fixture(scope="module", params=["proximal", "minimax"])
def runs(request, small_model, tmp_path_factory) -> dict:
    solver = request.param
    roots = {}
    for strategy, extra in STRATEGIES.items():
        root = tmp_path_factory.mktemp(f"{solver}-{strategy}")
        launch(fit_args(solver, small_model, root, *extra), cwd=root)
        roots[strategy] = root
    return {"solver": solver, "model": small_model, "roots": roots}


def test_ddp_and_fsdp2_match_one_rank(runs) -> None:
    solver, model, roots = runs["solver"], runs["model"], runs["roots"]
    reference = losses(roots["single"])
    assert len(reference) == 3  # 6 sequences, global batch 2
    ckpts = {s: run_dir(r) / "checkpoints" / "last.ckpt" for s, r in roots.items()}
    assert ckpts["fsdp2"].is_dir()  # sharded: one file per rank
    assert len(list(ckpts["fsdp2"].glob("*.distcp"))) == 2
    modules = {s: load_module(solver, model, c) for s, c in ckpts.items()}
    masks = {s: hard_masks(m) for s, m in modules.items()}
    moved = None
    if solver == "proximal":  # how far training moved the masks from those of W0
        originals = modules["single"].mask_family.originals()
        start = {n: nm_topn_mask(w.detach(), 2, 4) for n, w in originals.items()}
        moved = disagreement(masks["single"], start)
    for strategy in ("ddp", "fsdp2"):
        got = losses(roots[strategy])
        assert got == pytest.approx(reference, rel=LOSS_RTOL[solver]), strategy
        differ = disagreement(masks[strategy], masks["single"])
        assert differ <= 1 - MASK_AGREEMENT[solver], (strategy, differ)
        if moved is not None:
            assert moved > 20 * max(differ, 1e-5), (strategy, moved, differ)
