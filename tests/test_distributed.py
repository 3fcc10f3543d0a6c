"""1 rank vs DDP, FSDP2 and FSDP1 on 2 ranks (CPU, gloo) on the 2-layer truncated default model.

Every run sees the same global batch (2 sequences: batch_size 2 on one rank, 1 per rank on two).
Tolerances: minimax agrees to float32 summation order (losses within 1e-5, identical masks). It
runs the recipe's own ``hard_concrete`` gates: every rank seeds alike, so each draws the gate
noise that the single device draws, and the loss is smooth in the gate logits. A one-ulp change
of ``init_logit`` moves its losses by ~1e-7 (``tools/measure_repeatability.py``). The
``sigmoid_topk`` gate is not comparable this way: the logits start equal, Adam's first step is
``lr * sign(g)``, so hundreds of channel logits tie to the last bit, and the next step's hard
top-k among them is decided by float rounding; a one-ulp change of ``init_logit`` on one device
moves its losses by up to ~2%, as far as another summation order does.
Proximal: AdamW's first steps are ``lr * sign(g)`` for tiny gradients, so gradients that differ
in the last bits (another summation order) can move a weight by ``2 * lr`` and swap a near-tie
inside a group; losses agree within 1e-3 and masks on >= 99.9% of entries, while the training
itself moves far more entries than that. Each fit runs once (module-scoped fixture).

FSDP1 is Lightning's ``FSDPStrategy``, which Lightning refuses on CPU: a test-only subclass
(``tests/fixtures/cpu_fsdp.py``) runs its code path unchanged over gloo. Its fits save a full
file (proximal) or a sharded folder (minimax) and resume on 2 ranks into the other kind, so both
kinds are saved, resumed and exported.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_prune.checkpoints import (
    check_resume_layout,
    check_sharded_strategy,
    consolidate_checkpoint,
    load_learned_state,
)
from lightning_prune.cli import main
from lightning_prune.errors import ConfigError
from lightning_prune.module import PruningModule
from lightning_prune.ops.nm_prox import nm_topn_mask

CONFIGS = Path(__file__).parents[1] / "configs"
FIXTURES = Path(__file__).parent / "fixtures"
RECIPES = {
    "proximal": [
        f"--config={CONFIGS / 'proxsparse_2of4.yaml'}",
        "--model.init_mask=null",
        "--model.regularizers.init_args.lam=1.0",
        "--model.solver.init_args.lr=1.0e-3",
    ],
    "minimax": [
        f"--config={CONFIGS / 'maskprune_uniform.yaml'}",  # hard_concrete gates (see above)
        "--model.solver.init_args.warmup_ratio=0.0",
    ],
}
STRATEGIES = {
    "single": ["--trainer.devices=1", "--data.batch_size=2"],
    "ddp": [f"--config={CONFIGS / 'ddp.yaml'}", "--data.batch_size=1"],
    "fsdp2": [f"--config={CONFIGS / 'fsdp2.yaml'}", "--data.batch_size=1"],
    "fsdp1": [
        f"--config={CONFIGS / 'fsdp.yaml'}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy.class_path=cpu_fsdp.CPUFSDPStrategy",  # FSDPStrategy on CPU
        "--data.batch_size=1",
    ],
}
#: what the FSDP1 fit saves; it resumes into the other kind
FSDP1_SAVES = {"proximal": "full", "minimax": "sharded"}
OTHER_KIND = {"full": "sharded", "sharded": "full"}
# proximal's FSDP2 run is a simulated 2-node job: torchrun twice (node_rank 0 and 1, one process
# each) on the loopback address, with the multi-node config and num_nodes=2
TWO_NODES = [
    f"--config={CONFIGS / 'fsdp_multinode.yaml'}",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.num_nodes=2",
    "--trainer.strategy.init_args.data_parallel_size=2",
    "--data.batch_size=1",
]
ONE_RANK_FSDP2 = [  # resume a 2-rank sharded checkpoint on 1 rank: DCP reshards
    f"--config={CONFIGS / 'fsdp2.yaml'}",
    "--trainer.devices=1",
    "--trainer.strategy.init_args.data_parallel_size=1",
    "--trainer.strategy.init_args.save_distributed_checkpoint=false",
    "--data.batch_size=2",
]
LOSS_RTOL = {"proximal": 1e-3, "minimax": 1e-5}
REG_COLUMN = {"proximal": "reg/nm_groups_done", "minimax": "reg/heads_expected_mean"}
MASK_AGREEMENT = {"proximal": 0.999, "minimax": 1.0}  # share of equal mask entries


def fit_args(solver: str, model: str, root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        *RECIPES[solver],
        f"--model.model={model}",
        "--data.seq_len=32",
        "--data.num_samples=6",
        "--data.seed=3",  # same global batches at any seed, not only where samplers coincide
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
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(FIXTURES), **(env or {})}
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


def launch_two_nodes(args: list[str], cwd: Path) -> None:
    """Two torchrun agents, one per simulated node, meeting on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    script = Path(sys.executable).with_name("lightning-prune")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [cwd / f"node{rank}.log" for rank in (0, 1)]
    agents = []
    for rank, log in enumerate(logs):
        command = [
            str(torchrun),
            "--nnodes=2",
            f"--node_rank={rank}",
            "--nproc_per_node=1",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "--no-python",
            str(script),
            *args,
        ]
        with open(log, "w") as handle:
            agents.append(subprocess.Popen(command, env=env, cwd=cwd, stdout=handle, stderr=handle))
    for agent, log in zip(agents, logs):
        assert agent.wait(timeout=600) == 0, log.read_text()[-4000:]


def run_dir(root: Path) -> Path:
    return next((root / "lightning_logs").glob("version_*"))


def losses(root: Path, column: str = "train/loss") -> list[float]:
    with open(run_dir(root) / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get(column)]
    return [float(r[column]) for r in sorted(rows, key=lambda r: int(r["step"]))]


def load_module(solver: str, model: str, ckpt: Path) -> PruningModule:
    """A fresh module of ``solver``'s recipe with a checkpoint (full or sharded) loaded."""
    module = load_module_shell(solver, model)
    load_learned_state(module, ckpt)
    return module


def load_module_shell(solver: str, model: str) -> PruningModule:
    """A fresh module of ``solver``'s recipe (the LM is loaded on first use)."""
    from lightning_prune.cli_names import install_short_names

    install_short_names()
    if solver == "proximal":
        from lightning_prune.masks.nm import NMMaskFamily
        from lightning_prune.solvers.proximal import ProximalSolver

        module = PruningModule(NMMaskFamily(), ProximalSolver(), model=model)
    else:
        from lightning_prune.masks.structured import UniformStructuredFamily
        from lightning_prune.solvers.minimax import MinimaxSolver

        family = UniformStructuredFamily(budget=0.25, channel_multiple=32)
        module = PruningModule(family, MinimaxSolver(), model=model)
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
        if strategy == "fsdp1":
            kind = f"--trainer.strategy.init_args.state_dict_type={FSDP1_SAVES[solver]}"
            launch(fit_args(solver, small_model, root, *extra, kind), cwd=root)
        elif strategy == "fsdp2" and solver == "proximal":
            launch_two_nodes(fit_args(solver, small_model, root, *TWO_NODES), cwd=root)
        else:
            launch(fit_args(solver, small_model, root, *extra), cwd=root)
        roots[strategy] = root
    return {"solver": solver, "model": small_model, "roots": roots}


def test_ddp_fsdp2_and_fsdp1_match_one_rank(runs) -> None:
    solver, model, roots = runs["solver"], runs["model"], runs["roots"]
    reference = losses(roots["single"])
    assert len(reference) == 3  # 6 sequences, global batch 2
    ckpts = {s: run_dir(r) / "checkpoints" / "last.ckpt" for s, r in roots.items()}
    assert ckpts["fsdp2"].is_dir()  # sharded: one file per rank
    assert len(list(ckpts["fsdp2"].glob("*.distcp"))) == 2
    assert_checkpoint_kind(ckpts["fsdp1"], FSDP1_SAVES[solver], fsdp1=True, world_size=2)
    modules = {s: load_module(solver, model, c) for s, c in ckpts.items()}
    masks = {s: hard_masks(m) for s, m in modules.items()}
    moved = None
    if solver == "proximal":  # how far training moved the masks from those of W0
        originals = modules["single"].mask_family.originals()
        start = {n: nm_topn_mask(w.detach(), 2, 4) for n, w in originals.items()}
        moved = disagreement(masks["single"], start)
    for strategy in ("ddp", "fsdp2", "fsdp1"):
        got = losses(roots[strategy])
        assert got == pytest.approx(reference, rel=LOSS_RTOL[solver]), strategy
        val = losses(roots[strategy], "val/loss")  # hard masks, held-out windows over ranks
        assert val == pytest.approx(losses(roots["single"], "val/loss"), rel=LOSS_RTOL[solver])
        differ = disagreement(masks[strategy], masks["single"])
        assert differ <= 1 - MASK_AGREEMENT[solver], (strategy, differ)
        if moved is not None:
            assert moved > 20 * max(differ, 1e-5), (strategy, moved, differ)
        # the logged regularizer metrics (FSDP1: gathered and combined one unit at a time)
        column = REG_COLUMN[solver]
        expected = losses(roots["single"], column)
        assert losses(roots[strategy], column) == pytest.approx(expected, rel=1e-4), strategy


def assert_checkpoint_kind(path: Path, kind: str, fsdp1: bool, world_size: int) -> None:
    """``path`` is a full file or a sharded folder (one ``.distcp`` a rank) with this layout."""
    if kind == "sharded":
        assert path.is_dir() and len(list(path.glob("*.distcp"))) == world_size, path
        header = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    else:
        assert path.is_file(), path
        header = torch.load(path, map_location="cpu", weights_only=True)
    layout = {"fsdp2": False, "world_size": world_size} | ({"fsdp1": True} if fsdp1 else {})
    assert header["lightning_prune_layout"] == layout


@pytest.fixture(scope="module")
def resumed(runs, tmp_path_factory) -> dict:
    """Epoch 2 of every run resumed: the 2-rank FSDP2 sharded checkpoint on 1 FSDP2 rank
    (resharded, saving a full file), the single-device one on one device, and the FSDP1 one
    under FSDP1 on 2 ranks, saving the other kind of checkpoint."""
    solver, model, roots = runs["solver"], runs["model"], runs["roots"]
    fsdp1 = [*STRATEGIES["fsdp1"], "--trainer.strategy.init_args.state_dict_type="]
    fsdp1[-1] += OTHER_KIND[FSDP1_SAVES[solver]]
    sources = {"fsdp2": ONE_RANK_FSDP2, "single": STRATEGIES["single"], "fsdp1": fsdp1}
    folders = {}
    for source, extra in sources.items():
        root = tmp_path_factory.mktemp(f"{solver}-{source}-resumed")
        ckpt = run_dir(roots[source]) / "checkpoints" / "last.ckpt"
        args = fit_args(
            solver, model, root, *extra, "--trainer.max_epochs=2", f"--ckpt_path={ckpt}"
        )
        launch(args, cwd=root)
        folders[source] = root
    return {**runs, "resumed": folders}


def test_resume_from_sharded_matches_resume_from_full(resumed) -> None:
    """Epoch 2 resumed from the 2-rank FSDP2 sharded checkpoint on 1 FSDP2 rank (resharded), and
    from the FSDP1 checkpoint (full or sharded) on 2 FSDP1 ranks, repeats epoch 2 resumed from
    the single-device full checkpoint."""
    solver, roots = resumed["solver"], resumed["resumed"]
    reference = losses(roots["single"])
    assert len(reference) == 3  # steps 3-5 only: the first epoch was restored
    for source in ("fsdp2", "fsdp1"):
        assert losses(roots[source]) == pytest.approx(reference, rel=LOSS_RTOL[solver]), source
        val = losses(roots[source], "val/loss")
        assert val == pytest.approx(losses(roots["single"], "val/loss"), rel=LOSS_RTOL[solver])
    ckpt = run_dir(roots["fsdp2"]) / "checkpoints" / "last.ckpt"
    header = torch.load(ckpt, map_location="cpu", weights_only=True)  # one full file
    assert header["lightning_prune_layout"] == {"fsdp2": True, "world_size": 1}
    ckpt = run_dir(roots["fsdp1"]) / "checkpoints" / "last.ckpt"
    assert_checkpoint_kind(ckpt, OTHER_KIND[FSDP1_SAVES[solver]], fsdp1=True, world_size=2)


def test_export_from_sharded_equals_export_from_full(resumed, tmp_path) -> None:
    """Exports of one run's sharded checkpoint and of its consolidated file are byte-identical
    (FSDP2; FSDP1 for proximal). Minimax masks agree exactly, so the single-device and the
    FSDP1 (sharded) runs export the same model as FSDP2 too."""
    solver, model, roots = resumed["solver"], resumed["model"], resumed["roots"]
    sharded = run_dir(roots["fsdp2"]) / "checkpoints" / "last.ckpt"
    full = consolidate_checkpoint(load_module_shell(solver, model), sharded, tmp_path / "full.ckpt")
    groups = [{"sharded": sharded, "full": full}]
    if solver == "minimax":
        groups[0]["single"] = run_dir(roots["single"]) / "checkpoints" / "last.ckpt"
        groups[0]["fsdp1"] = run_dir(roots["fsdp1"]) / "checkpoints" / "last.ckpt"
    else:  # the FSDP1 fit saved a full file; its resumed run a sharded folder
        fsdp1 = run_dir(resumed["resumed"]["fsdp1"]) / "checkpoints" / "last.ckpt"
        assert fsdp1.is_dir()
        shell = load_module_shell(solver, model)
        fsdp1_full = consolidate_checkpoint(shell, fsdp1, tmp_path / "fsdp1-full.ckpt")
        groups.append({"fsdp1-sharded": fsdp1, "fsdp1-full": fsdp1_full})
    for group in groups:
        folders = {label: export(solver, model, ckpt, tmp_path) for label, ckpt in group.items()}
        assert_same_files(folders)


def export(solver: str, model: str, ckpt: Path, tmp_path: Path) -> Path:
    """``lightning-prune export`` of ``ckpt`` into a new folder of ``tmp_path`` (the CLI in
    this process: one process per export would only add interpreter starts)."""
    folder = tmp_path / f"export-{len(list(tmp_path.glob('export-*')))}"
    args = [
        "export",
        *RECIPES[solver],
        f"--model.model={model}",
        f"--ckpt_path={ckpt}",
        f"--output_dir={folder}",
    ]
    main(args)
    return folder


def refused(args: list[str], capsys) -> str:
    """The CLI in this process refuses ``args`` (exit status 2): its last line of stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def assert_same_files(folders: dict[str, Path]) -> None:
    """Every export folder holds the same files, byte for byte (but the run config)."""
    (first, reference), *others = folders.items()
    names = sorted(p.name for p in reference.iterdir())
    assert "model.safetensors" in names and "pruning.json" in names
    for label, folder in others:
        assert sorted(p.name for p in folder.iterdir()) == names, label
        for name in names:
            a, b = (reference / name).read_bytes(), (folder / name).read_bytes()
            if name == "pruning.json":  # the run config names the checkpoint path
                a, b = (_without_config(json.loads(x)) for x in (a, b))
            assert a == b, (first, label, name)


def _without_config(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "config"}


def test_resume_refuses_checkpoints_it_cannot_reshard(runs, tmp_path, capsys) -> None:
    solver, model, roots = runs["solver"], runs["model"], runs["roots"]
    sharded = run_dir(roots["fsdp2"]) / "checkpoints" / "last.ckpt"
    single = run_dir(roots["single"]) / "checkpoints" / "last.ckpt"
    check_resume_layout(sharded, fsdp2=True, world_size=1)  # DCP reshards 2 -> 1
    check_resume_layout(single, fsdp2=False, world_size=2)  # DDP replicates
    with pytest.raises(ConfigError, match="saved by an unsharded strategy .* on 1 rank"):
        check_resume_layout(single, fsdp2=True, world_size=2)
    full = consolidate_checkpoint(load_module_shell(solver, model), sharded, tmp_path / "c.ckpt")
    with pytest.raises(ConfigError, match="holds no optimizer state"):
        check_resume_layout(full, fsdp2=True, world_size=2)
    # FSDP1 checkpoints (full or sharded) resume under FSDPStrategy only, and only they do
    fsdp1 = run_dir(roots["fsdp1"]) / "checkpoints" / "last.ckpt"
    check_resume_layout(fsdp1, fsdp2=False, world_size=4, fsdp1=True)
    saved_by_fsdp1 = r"saved by FSDPStrategy \(FSDP1\) on 2 rank\(s\); resume it with FSDPStrategy"
    for fsdp2, world in ((True, 2), (False, 1)):
        with pytest.raises(ConfigError, match=saved_by_fsdp1):
            check_resume_layout(fsdp1, fsdp2=fsdp2, world_size=world)
    for ckpt, saved_by in ((sharded, "FSDP2"), (single, "an unsharded strategy")):
        with pytest.raises(ConfigError, match=f"saved by {saved_by}.*onto FSDPStrategy"):
            check_resume_layout(ckpt, fsdp2=False, world_size=2, fsdp1=True)
    with pytest.raises(ConfigError, match="validate it with ModelParallelStrategy"):
        check_sharded_strategy(sharded, fsdp2=False, fsdp1=True)
    if fsdp1.is_dir():
        check_sharded_strategy(fsdp1, fsdp2=False, fsdp1=True)
        with pytest.raises(ConfigError, match="validate it with FSDPStrategy"):
            check_sharded_strategy(fsdp1, fsdp2=True, fsdp1=False)
    # through the CLI: refused in setup, before the LM is loaded
    args = fit_args(solver, model, tmp_path, *STRATEGIES["single"], f"--ckpt_path={sharded}")
    error = refused(args, capsys)
    assert "saved by FSDP2 on 2 rank(s); resume it with ModelParallelStrategy" in error


def test_validate_reads_a_sharded_checkpoint_on_one_fsdp2_rank(runs, tmp_path, capsys) -> None:
    """The 2-rank sharded checkpoint validates on 1 rank (resharded) to the fit's own final
    validation loss; an unsharded strategy refuses it before loading anything. The FSDP1
    checkpoint (full file or sharded folder) validates under FSDP1 to its fit's loss too."""
    solver, model, roots = runs["solver"], runs["model"], runs["roots"]
    common = [*RECIPES[solver], f"--model.model={model}", "--data.seq_len=32"]
    common += ["--data.eval_tokens=64", "--data.seed=3"]
    common += [f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    for strategy, extra in (("fsdp2", ONE_RANK_FSDP2), ("fsdp1", STRATEGIES["fsdp1"])):
        ckpt = run_dir(roots[strategy]) / "checkpoints" / "last.ckpt"
        result = launch(["validate", *common, f"--ckpt_path={ckpt}", *extra], cwd=tmp_path)
        line = next(x for x in result.stdout.splitlines() if "val/loss" in x)
        value = float(line.replace("│", " ").split()[-1])
        assert value == pytest.approx(losses(roots[strategy], "val/loss")[-1], rel=1e-5)
    sharded = run_dir(roots["fsdp2"]) / "checkpoints" / "last.ckpt"
    error = refused(["validate", *common, f"--ckpt_path={sharded}", "--trainer.devices=1"], capsys)
    assert "is a sharded checkpoint; validate it with ModelParallelStrategy" in error


def test_gpt2_conv1d_groups_stay_whole_under_fsdp2(tiny_models, tmp_path) -> None:
    """GPT-2 stores ``[in, out]``: its N:M groups run along dim 0, the dim FSDP2 shards by
    default. Its W0 and surrogate are sharded along the output features instead, so the prox
    sees whole groups: the 2-rank surrogates equal the 1-rank ones, and they moved."""
    model = tiny_models["gpt2"]
    surrogates = {}
    for strategy in ("single", "fsdp2"):
        root = tmp_path / strategy
        launch(fit_args("proximal", model, root, *STRATEGIES[strategy]), cwd=tmp_path)
        module = load_module("proximal", model, run_dir(root) / "checkpoints" / "last.ckpt")
        family = module.mask_family
        assert all(p.transposed for p in family.parametrizations().values())
        surrogates[strategy] = {
            n: p.surrogate.detach() for n, p in family.parametrizations().items()
        }
    originals = family.originals()
    for name, reference in surrogates["single"].items():
        close = (surrogates["fsdp2"][name] - reference).abs() <= 1e-5
        assert close.float().mean() >= MASK_AGREEMENT["proximal"], name  # AdamW sign flips
        assert (reference - originals[name]).abs().max() > 1e-3, name
