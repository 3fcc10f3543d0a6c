"""The block-wise objective: decoder blocks learn one after another, each against its dense output
on the inputs of the pruned blocks before it. Real fits of the 2-layer truncated default model
through the CLI in this process; the killed-and-resumed block-wise fit is in test_resume.py."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_prune.blockwise import BlockwiseObjective, reconstruction_loss
from lightning_prune.cli import main
from lightning_prune.errors import ConfigError
from lightning_prune.masks.nm import NMMaskFamily
from lightning_prune.models import load_causal_lm
from lightning_prune.module import PruningModule
from lightning_prune.solvers.proximal import ProximalSolver

CONFIGS = Path(__file__).parents[1] / "configs"
FIXTURES = Path(__file__).parent / "fixtures"
STEPS_PER_BLOCK = 3
EVERY_STEP = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_top_k: -1, every_n_train_steps: 1, filename: "{step}"}
"""


def blockwise_args(model: str, root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        f"--config={CONFIGS / 'proxsparse_2of4.yaml'}",
        f"--config={CONFIGS / 'proxsparse_2of4_blockwise.yaml'}",
        f"--model.model={model}",
        "--model.init_mask=null",
        f"--model.steps_per_block={STEPS_PER_BLOCK}",
        f"--trainer.max_steps={2 * STEPS_PER_BLOCK}",
        "--data.seq_len=32",
        "--data.num_samples=4",
        "--data.eval_tokens=64",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=0",
        *extra,
    ]


@pytest.fixture(scope="module")
def checkpoints(small_model, tmp_path_factory) -> dict[int, dict[str, torch.Tensor]]:
    """The learned state after every step of a 2-block fit, by step."""
    root = tmp_path_factory.mktemp("blockwise")
    overlay = root / "every-step.yaml"
    overlay.write_text(EVERY_STEP)
    main(blockwise_args(small_model, root, f"--config={overlay}"))
    states = {}
    for path in (root / "lightning_logs" / "version_0" / "checkpoints").glob("step=*.ckpt"):
        step = int(path.stem.split("=")[1])
        states[step] = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return states


def surrogates(state: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if f"layers.{layer}." in k and "surrogate" in k}


def test_blocks_learn_one_after_another(small_model, checkpoints) -> None:
    """Block 0 moves during steps 1-3 and never after; block 1 stays at W0 until step 4."""
    assert sorted(checkpoints) == list(range(1, 2 * STEPS_PER_BLOCK + 1))
    dense = load_causal_lm(small_model).state_dict()
    end_of_first = checkpoints[STEPS_PER_BLOCK]
    last = checkpoints[2 * STEPS_PER_BLOCK]
    first_block = surrogates(end_of_first, 0)
    assert len(first_block) == 7  # q, k, v, o, gate, up, down
    for name, value in first_block.items():
        original = dense[
            name.removeprefix("model.").replace(".parametrizations.weight.0.surrogate", ".weight")
        ]
        assert not torch.equal(value, original), name  # learned (AdamW step, then the prox)
        assert torch.equal(last[name], value), name  # frozen once its block is done
    for name, value in surrogates(end_of_first, 1).items():
        original = dense[
            name.removeprefix("model.").replace(".parametrizations.weight.0.surrogate", ".weight")
        ]
        assert torch.equal(value, original), name  # not yet learned
        assert not torch.equal(last[name], original), name


def test_end_to_end_phase_learns_every_block_after_the_blocks(small_model, tmp_path) -> None:
    """With ``e2e_steps``, the steps after the last block move the surrogates of every block
    at once, starting from the block-wise result."""
    overlay = tmp_path / "every-step.yaml"
    overlay.write_text(EVERY_STEP)
    blocks = 2 * STEPS_PER_BLOCK
    main(
        blockwise_args(
            small_model,
            tmp_path,
            f"--config={overlay}",
            "--model.e2e_steps=2",
            f"--trainer.max_steps={blocks + 2}",
        )
    )
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"

    def state(step: int) -> dict[str, torch.Tensor]:
        return torch.load(folder / f"step={step}.ckpt", map_location="cpu", weights_only=True)[
            "state_dict"
        ]

    after_blocks, last = state(blocks), state(blocks + 2)
    for layer in (0, 1):
        moved = [
            name
            for name, value in surrogates(after_blocks, layer).items()
            if not torch.equal(last[name], value)
        ]
        assert len(moved) == 7, (layer, moved)  # every target of every block learns


def test_schedule_restarts_per_block_and_for_the_end_to_end_phase() -> None:
    objective = BlockwiseObjective(steps_per_block=3, e2e_steps=4)
    assert objective.total_steps(2) == 10
    assert [objective.block_at(step, 2) for step in range(10)] == [0] * 3 + [1] * 3 + [None] * 4
    spans = [objective.schedule_span(step, 2) for step in range(10)]
    assert spans == [(0, 3), (1, 3), (2, 3)] * 2 + [(0, 4), (1, 4), (2, 4), (3, 4)]


def test_capture_gives_the_block_its_model_inputs(small_model) -> None:
    """The captured call of block 1 holds the hidden states the model's forward feeds it, and
    running the block on it gives block 1's output (that of the whole forward)."""
    model = load_causal_lm(small_model)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    objective = BlockwiseObjective(steps_per_block=1)
    call = objective.capture(model, model.model.layers[1], ids)
    assert torch.equal(call.args[0] if call.args else call.kwargs["hidden_states"], hidden[1])
    with torch.no_grad():
        output = objective.run(
            model.model.layers[0], objective.capture(model, model.model.layers[0], ids)
        )
    torch.testing.assert_close(output, hidden[1])


def test_reconstruction_loss_is_normalised() -> None:
    """Per sequence, then averaged: a batch of two gives the mean of the two single losses
    (what DDP's gradient averaging computes when each rank holds one)."""
    target = torch.randn(3, 5, 8)
    assert reconstruction_loss(target, target) == 0
    output = target + torch.randn_like(target)
    singles = [reconstruction_loss(output[i : i + 1], target[i : i + 1]) for i in range(3)]
    assert reconstruction_loss(output, target) == pytest.approx(float(sum(singles) / 3))
    assert reconstruction_loss(torch.zeros_like(target), target) == pytest.approx(1.0)
    assert reconstruction_loss(2 * target, target) == pytest.approx(1.0)
    assert reconstruction_loss(20 * target, 10 * target) == pytest.approx(1.0)  # scale-free


def refused(args: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_blockwise_fit_refusals(small_model, tmp_path, capsys) -> None:
    """Wrong step count, a solver without block-wise support, bad options: each named, before
    anything is trained."""
    args = blockwise_args(small_model, tmp_path / "a", "--trainer.max_steps=5")
    assert "trainer.max_steps: objective blockwise learns 2 blocks × 3 steps_per_block = 6" in (
        refused(args, capsys)
    )
    minimax = [
        "fit",
        f"--config={CONFIGS / 'maskprune_uniform.yaml'}",
        f"--model.model={small_model}",
        "--model.objective=blockwise",
        "--data.seq_len=32",
        "--data.num_samples=2",
        "--data.eval_tokens=64",
        f"--trainer.default_root_dir={tmp_path / 'b'}",
    ]
    assert "blockwise is not supported by solver MinimaxSolver" in refused(minimax, capsys)
    args = blockwise_args(small_model, tmp_path / "e", "--model.e2e_steps=2")
    assert "3 steps_per_block + 2 e2e_steps = 8 steps" in refused(args, capsys)
    end_to_end = [*blockwise_args(small_model, tmp_path / "f", "--model.e2e_steps=2")]
    end_to_end.append("--model.objective=end_to_end")
    assert "model.e2e_steps: an end-to-end phase follows a block-wise fit only" in (
        refused(end_to_end, capsys)
    )
    for option, expected in (
        ("--model.steps_per_block=0", "model.steps_per_block: expected an integer >= 1"),
        ("--model.e2e_steps=-1", "model.e2e_steps: expected an integer >= 0"),
        ("--model.objective=layerwise", "Got value: layerwise"),
    ):
        assert expected in refused(blockwise_args(small_model, tmp_path / "d", option), capsys)


def test_strategies_that_cannot_run_it_are_refused(small_model, monkeypatch) -> None:
    """Plain DDP would wait for gradients of the blocks not being learned, and sharding buys
    nothing when one block learns at a time: both refused, naming the strategy that works."""
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # a DDP Trainer picks a port into os.environ
        monkeypatch.delenv(name, raising=False)
    module = PruningModule(
        NMMaskFamily(), ProximalSolver(), model=small_model, objective="blockwise"
    )
    module._trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=40)
    with pytest.raises(ConfigError, match="use strategy: ddp_find_unused_parameters_true"):
        module.setup("fit")
    module._trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", max_steps=40
    )
    module.setup("fit")  # 2 layers x 20 steps
    module._trainer = Trainer(
        accelerator="cpu", devices=1, strategy=ModelParallelStrategy(), max_steps=40
    )
    with pytest.raises(ConfigError, match="blockwise runs on one device or DDP, not on Model"):
        module.setup("fit")


def logged_losses(root: Path) -> list[float]:
    metrics = next((root / "lightning_logs").glob("version_*")) / "metrics.csv"
    with open(metrics) as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("train/loss")]
    return [float(r["train/loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


def test_ddp_ranks_split_the_batches_and_match_one_device(small_model, tmp_path) -> None:
    """Two DDP ranks with one sequence each learn what one device learns from both: the same
    per-step block losses (the loss is per sequence, and DDP averages gradients)."""
    single = tmp_path / "single"
    main(
        blockwise_args(
            small_model,
            single,
            "--data.seed=3",
            "--data.batch_size=2",
            "--trainer.log_every_n_steps=1",
        )
    )
    ddp = tmp_path / "ddp"
    args = blockwise_args(
        small_model,
        ddp,
        "--data.seed=3",
        "--data.batch_size=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.devices=2",
        "--trainer.strategy=ddp_find_unused_parameters_true",
    )
    script = Path(sys.executable).with_name("lightning-prune")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(FIXTURES))
    result = subprocess.run(
        [str(script), *args], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]
    expected = logged_losses(single)
    assert len(expected) == 2 * STEPS_PER_BLOCK and max(expected) > 0
    # AdamW's first steps are lr * sign(g): another summation order may flip a near-zero one
    assert logged_losses(ddp) == pytest.approx(expected, rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("cache_mb", [1024.0, 0.0])  # in memory; every entry spilled to disk
def test_cached_block_inputs_equal_the_model_forward(small_model, cache_mb) -> None:
    """Block 1's inputs chained from block 0's cached inputs are bit-identical to those the
    model's own forward feeds it, whatever the batching; the spill folder goes on release."""
    model = load_causal_lm(small_model)
    blocks = list(model.model.layers)
    windows = torch.randint(0, model.config.vocab_size, (4, 16))
    calibration = [{"input_ids": windows[:2]}, {"input_ids": windows[2:]}]
    objective = BlockwiseObjective(steps_per_block=1, cache_mb=cache_mb)
    with torch.no_grad():
        objective.block_call(model, blocks, 0, windows[:2], lambda: calibration)
        assert len(objective._cache) == 4 and objective._cache.spilled == (4 if not cache_mb else 0)
        batch = windows[[3, 0]]  # another batching than the calibration batches
        call = objective.block_call(model, blocks, 1, batch, lambda: calibration)
        assert objective._cache.block == 1
        assert torch.equal(call.hidden, objective.capture(model, blocks[1], batch).hidden)
    folder = objective._cache._folder
    objective.release()
    assert folder is None or not folder.exists()


def test_block_input_cache_refuses_a_negative_budget() -> None:
    with pytest.raises(ConfigError, match="model.block_cache_mb: expected a number >= 0"):
        BlockwiseObjective(steps_per_block=1, cache_mb=-1)
