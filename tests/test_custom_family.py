"""A new mask family, written against the documented contracts only, runs fit → export on one
rank, under DDP and under FSDP2 (2 gloo ranks), without touching any core file.

The family is ``topk`` (unstructured top-k per output row, learnable float32 scores from |W0|
with a straight-through top-k), shipped by the fixture distribution
``tests/fixtures/plugins/lp-topk-plugin``: it is pip-installed into a scratch folder and found
through its ``lightning_prune.mask_families`` entry point, so the CLI names it ``topk`` like a
built-in. For the sharding backends it declares ``grouped_tensors()`` (a row stays on one
rank: FSDP2 shards GPT-2's ``[in, out]`` weights along dim 1) and overrides ``reset_state``
(FSDP2's meta-device sharded loading). The solver is the built-in ``proximal`` with no
regularizer (plain AdamW on the scores); the export is the built-in ``hf`` format
(``W0 ⊙ mask`` baked into dense weights), reloaded here with plain transformers.

Tolerances are test_distributed.py's for ``proximal``: AdamW's first steps are ``lr * sign(g)``
for tiny gradients, so another summation order can flip a near-tie, and the 2-rank exports
must agree with the 1-rank one on >= 99.9% of the target entries (losses within 1e-3), while
training moves far more entries than that. Every fit and export runs once (module fixtures).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny_random
from test_distributed import CONFIGS, FIXTURES, launch, losses, run_dir
from test_registry import install

from lightning_prune.cli import main
from lightning_prune.registry import get_registry

KEEP = 0.5
RECIPE = {
    "seed_everything": 0,
    "model": {
        "mask_family": {"class_path": "topk", "init_args": {"keep": KEEP}},
        "solver": {
            "class_path": "proximal",  # no regularizer: AdamW on the scores
            "init_args": {"lr": 2.0e-3, "warmup_ratio": 0.0, "grad_clip": 1.0},
        },
        "init_mask": None,
    },
    "data": {"source": "wikipedia", "seq_len": 32, "num_samples": 6, "seed": 3, "eval_tokens": 64},
    "trainer": {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"save_last": True},
            }
        ],
    },
}
# every run sees the same global batch of 2 sequences
STRATEGIES = {
    "single": ["--trainer.devices=1", "--data.batch_size=2"],
    "ddp": [f"--config={CONFIGS / 'ddp.yaml'}", "--data.batch_size=1"],
    "fsdp2": [f"--config={CONFIGS / 'fsdp2.yaml'}", "--data.batch_size=1"],
}
LOSS_RTOL = 1e-3
MASK_AGREEMENT = 0.999  # share of equal exported target entries
#: printed by the family's ``reset_state``, which runs only after FSDP2's sharded loading
RESET_LINE = "lp-topk-plugin: scores reset from the loaded W0 shards"
#: the default targets' weight names and their storage orientation, per architecture
TARGETS = {
    "llama": (("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), False),
    "gpt2": (("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), True),
}


@pytest.fixture(scope="module")
def topk_site(tmp_path_factory) -> Path:
    """The fixture distribution installed into a scratch folder (not into the venv)."""
    target = tmp_path_factory.mktemp("site-topk")
    install(["lp-topk-plugin"], target)
    return target


@pytest.fixture(scope="module")
def registered(topk_site):
    """``topk`` registered in this process too (for the in-process exports)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(topk_site))
        get_registry.cache_clear()
        yield
    get_registry.cache_clear()  # the next registry is read without the scratch folder


def fit_and_export(model: str, strategies: list[str], site: Path, work: Path, *extra: str) -> dict:
    """Fit ``topk`` on ``model`` under each strategy (launched processes, as a user would),
    then export each last checkpoint with ``--format hf`` (the CLI in this process)."""
    recipe = work / "topk.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(FIXTURES)])}
    common = [f"--config={recipe}", f"--model.model={model}", *extra]
    roots, exports, stdout = {}, {}, {}
    for strategy in strategies:
        root = work / strategy
        root.mkdir()
        args = ["fit", *common, f"--trainer.default_root_dir={root}", *STRATEGIES[strategy]]
        stdout[strategy] = launch(args, cwd=root, env=env).stdout
        ckpt = run_dir(root) / "checkpoints" / "last.ckpt"
        exports[strategy] = work / f"export-{strategy}"
        main(["export", *common, f"--ckpt_path={ckpt}", f"--output_dir={exports[strategy]}"])
        roots[strategy] = root
    return {"model": model, "roots": roots, "exports": exports, "stdout": stdout}


@pytest.fixture(scope="module")
def runs(small_model, topk_site, registered, tmp_path_factory) -> dict:
    """The 2-layer truncated default model (llama): 1 rank, DDP and FSDP2."""
    work = tmp_path_factory.mktemp("topk")
    return fit_and_export(small_model, ["single", "ddp", "fsdp2"], topk_site, work)


@pytest.fixture(scope="module")
def gpt2_runs(topk_site, registered, tmp_path_factory) -> dict:
    """A tiny random GPT-2 (``Conv1D`` weights stored ``[in, out]``): 1 rank and FSDP2."""
    work = tmp_path_factory.mktemp("topk-gpt2")
    model = str(build_tiny_random("gpt2", work / "gpt2"))
    return fit_and_export(model, ["single", "fsdp2"], topk_site, work)


def load_plain(folder: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of ``folder`` loaded with plain transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def target_rows(state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Every target weight of ``state`` as ``[out, in]`` rows, by state-dict key."""
    names, transposed = TARGETS[arch]
    return {
        key: value.t() if transposed else value
        for key, value in state.items()
        if any(key.endswith(f".{name}.weight") for name in names)
    }


def kept(rows: torch.Tensor) -> int:
    """Weights every row of ``rows`` (``[out, in]``) keeps."""
    from lp_topk_plugin import kept_per_row

    return kept_per_row(rows.shape[1], KEEP)


def check_export(
    folder: Path, dense: dict[str, torch.Tensor], arch: str, layers: int, family: str = "TopKFamily"
) -> None:
    """``folder`` loads with plain transformers; every target row keeps exactly its share,
    the kept weights are W0's, everything else is W0's."""
    record = json.loads((folder / "pruning.json").read_text())
    assert record["mask_family"] == family and record["keep"] == KEEP
    assert record["method"] == "ProximalSolver"
    exported = load_plain(folder)
    assert exported.keys() == dense.keys()
    rows, w0 = target_rows(exported, arch), target_rows(dense, arch)
    assert len(rows) == layers * len(TARGETS[arch][0])
    for key, value in dense.items():
        if key not in rows:
            assert torch.equal(exported[key], value), key
    for key, got in rows.items():
        zeros = (got == 0).sum(dim=1)
        assert (zeros == got.shape[1] - kept(got)).all(), key  # exactly the kept share per row
        assert torch.equal(got[got != 0], w0[key][got != 0]), key  # baked W0 ⊙ mask


def moved_share(exported: dict[str, torch.Tensor], dense: dict[str, torch.Tensor], arch) -> float:
    """Share of target entries whose kept/pruned state differs from top-k |W0|."""
    from lp_topk_plugin import top_k_rows

    rows, w0 = target_rows(exported, arch), target_rows(dense, arch)
    moved = sum(int(((rows[k] != 0) != top_k_rows(w0[k].abs(), kept(w0[k]))).sum()) for k in w0)
    return moved / sum(w.numel() for w in w0.values())


def differing_share(runs: dict, strategy: str, arch: str) -> tuple[float, float]:
    """Share of target entries where the export of ``strategy`` differs from the 1-rank one
    (which must equal it elsewhere), and the share training moved on 1 rank."""
    one, two = load_plain(runs["exports"]["single"]), load_plain(runs["exports"][strategy])
    rows_one, rows_two = target_rows(one, arch), target_rows(two, arch)
    for key in one:
        if key not in rows_one:
            assert torch.equal(two[key], one[key]), key
    differ = sum(int((rows_two[k] != rows_one[k]).sum()) for k in rows_one)
    share = differ / sum(r.numel() for r in rows_one.values())
    return share, moved_share(one, load_plain(runs["model"]), arch)


def assert_matches_one_rank(runs: dict, strategy: str, arch: str) -> None:
    roots = runs["roots"]
    reference = losses(roots["single"])
    assert len(reference) == 3  # 6 sequences, global batch 2
    assert losses(roots[strategy]) == pytest.approx(reference, rel=LOSS_RTOL)
    val = losses(roots[strategy], "val/loss")  # hard masks
    assert val == pytest.approx(losses(roots["single"], "val/loss"), rel=LOSS_RTOL)
    if strategy == "fsdp2":
        ckpt = run_dir(roots["fsdp2"]) / "checkpoints" / "last.ckpt"
        assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2  # sharded
        assert RESET_LINE in runs["stdout"]["fsdp2"]  # meta-device loading ran reset_state
    share, moved = differing_share(runs, strategy, arch)
    print(f"{arch} {strategy}: {share:.2e} of target entries differ from 1 rank; moved {moved:.2e}")
    assert share <= 1 - MASK_AGREEMENT, (strategy, share)
    assert moved > 20 * max(share, 1e-5), (strategy, moved, share)


def test_plugin_is_found_by_its_entry_point(registered) -> None:
    info = get_registry().info("mask_families", "topk")
    assert info.distribution == "lp-topk-plugin"
    assert info.load().__name__ == "TopKFamily"


def test_one_rank_fit_exports_a_plain_hf_model(runs) -> None:
    """The 1-rank export loads with plain transformers, keeps exactly its share of every
    target row, and training moved the mask away from top-k |W0|."""
    dense = load_plain(runs["model"])
    check_export(runs["exports"]["single"], dense, "llama", layers=2)
    moved = moved_share(load_plain(runs["exports"]["single"]), dense, "llama")
    assert moved > 1e-3, moved
    assert RESET_LINE not in runs["stdout"]["single"]  # whole model loaded


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_export_what_one_rank_exports(runs, strategy) -> None:
    """DDP and FSDP2 (meta-device sharded loading, sharded checkpoint) give the 1-rank
    losses and export the 1-rank model, up to near-tie flips (test_distributed's tolerance)."""
    check_export(runs["exports"][strategy], load_plain(runs["model"]), "llama", layers=2)
    assert_matches_one_rank(runs, strategy, "llama")


def test_gpt2_rows_stay_whole_under_fsdp2(gpt2_runs) -> None:
    """GPT-2 stores ``[in, out]``: a row of top-k runs along dim 0, the dim FSDP2 shards by
    default. The family declares its scores and W0 grouped along dim 0 (``grouped_tensors``),
    so FSDP2 shards them along dim 1 and every rank ranks whole rows: same export."""
    dense = load_plain(gpt2_runs["model"])
    for strategy in ("single", "fsdp2"):
        check_export(gpt2_runs["exports"][strategy], dense, "gpt2", layers=2)
    assert_matches_one_rank(gpt2_runs, "fsdp2", "gpt2")


def test_base_class_mode_handling_suffices_under_fsdp2(
    small_model, topk_site, registered, tmp_path, monkeypatch
) -> None:
    """A family that implements only the documented abstract members of its parametrization
    (``compute_hard_mask`` read through the shard view, ``learned_weight``) fits and exports
    under FSDP2: the base ``set_mode`` caches no mask of a shard (``is_whole``) and the base
    ``forward`` computes it on the gathered scores."""
    monkeypatch.syspath_prepend(str(FIXTURES))  # the in-process export imports the family
    family = "--model.mask_family.class_path=topk_base_only.BaseOnlyTopKFamily"
    runs = fit_and_export(small_model, ["fsdp2"], topk_site, tmp_path, family)
    dense = load_plain(small_model)
    check_export(runs["exports"]["fsdp2"], dense, "llama", layers=2, family="BaseOnlyTopKFamily")
