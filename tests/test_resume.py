"""Exact resume: a fit killed with SIGKILL and resumed ends bit-identical to an uninterrupted one.

Every run is a real ``lightning-prune fit`` subprocess on the 2-layer truncated default model;
the killed run gets SIGKILL from inside, after the step the test chooses and before that step's
checkpoint is written, so the resume starts from the checkpoint of the step before.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = {"proximal": "proxsparse_2of4.yaml", "minimax": "maskprune_uniform.yaml"}
STEPS_PER_EPOCH, EPOCHS, KILL_AT = 4, 2, 6  # killed in the middle of the second epoch
#: run name -> (solver, extra arguments); the block-wise fit learns 2 blocks × 4 steps, so the
#: kill lands in the middle of the second block
RUNS = {
    "proximal": ("proximal", ()),
    "minimax": ("minimax", ()),
    "proximal-blockwise": (
        "proximal",
        (
            "--model.objective=blockwise",
            "--model.steps_per_block=4",
            f"--trainer.max_steps={STEPS_PER_EPOCH * EPOCHS}",
            "--trainer.max_epochs=-1",
        ),
    ),
}

CALLBACKS = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{save_last: true, every_n_train_steps: 1}}
{kill}
"""
KILL = """    - class_path: kill_at_step.KillAtStep
      init_args: {{step: {step}}}"""


def fit(model: str, run: str, root: Path, *extra: str, kill_at: int | None = None):
    overrides = root.parent / f"{root.name}-callbacks.yaml"
    kill = KILL.format(step=kill_at) if kill_at is not None else ""
    overrides.write_text(CALLBACKS.format(kill=kill))
    args = [
        "fit",
        f"--config={ROOT / 'configs' / CONFIGS[RUNS[run][0]]}",
        f"--config={overrides}",
        f"--model.model={model}",
        "--model.init_mask=null",
        "--data.seq_len=32",
        f"--data.num_samples={STEPS_PER_EPOCH}",
        "--data.eval_tokens=64",
        f"--trainer.max_epochs={EPOCHS}",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=1",
        "--trainer.limit_val_batches=0",
        *RUNS[run][1],
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(FIXTURES)}
    code = "import sys; from lightning_prune.cli import main; main(sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
        timeout=600,
    )


def learned_state(root: Path) -> dict[str, torch.Tensor]:
    ckpts = sorted(root.glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    return torch.load(ckpts[-1], map_location="cpu", weights_only=True)["state_dict"]


def losses(root: Path) -> dict[int, str]:
    """``train/loss`` by step, as logged (exact decimal strings), over all versions."""
    values = {}
    for path in sorted(root.glob("lightning_logs/version_*/metrics.csv")):
        with path.open() as handle:
            for row in csv.DictReader(handle):
                if row.get("train/loss"):
                    values[int(row["step"])] = row["train/loss"]
    return values


@pytest.mark.parametrize("run", list(RUNS))
def test_killed_fit_resumes_bit_identical(small_model, tmp_path, run) -> None:
    straight = fit(small_model, run, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed_root = tmp_path / "killed"
    killed = fit(small_model, run, killed_root, kill_at=KILL_AT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = killed_root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    saved_step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert saved_step == KILL_AT - 1  # killed before the checkpoint of step KILL_AT was written

    resumed = fit(small_model, run, killed_root, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, got = learned_state(tmp_path / "straight"), learned_state(killed_root)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    straight_losses, resumed_losses = losses(tmp_path / "straight"), losses(killed_root)
    assert len(straight_losses) == STEPS_PER_EPOCH * EPOCHS
    after_resume = {s: v for s, v in straight_losses.items() if s >= KILL_AT - 1}
    assert {s: resumed_losses.get(s) for s in after_resume} == after_resume
