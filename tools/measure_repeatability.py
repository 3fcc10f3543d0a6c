"""How far a one-ulp change moves a single-device minimax fit: the yardstick of the parity tests.

Runs the minimax recipe on one device (the settings of ``tests/test_distributed.py``: a truncated
copy of the default model, 6 windows of 32 tokens, global batch 2, 3 steps) once per gate and per
``init_logit`` in {x, the next float32 above x, the next float32 below x}, and prints the largest
relative change of the training and validation losses against the unperturbed run. A gate whose
losses move by ~1e-7 can be compared across strategies at tight tolerances; one whose losses move
by percents cannot (another summation order is a perturbation of the same size).

    python tools/measure_repeatability.py [--layers 2] [--json repeatability.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import tempfile
from pathlib import Path

import torch

from lightning_prune.cli import main

RECIPE = Path(__file__).parents[1] / "configs" / "maskprune_uniform.yaml"
GATES = ("hard_concrete", "sigmoid_topk")


def truncated_model(layers: int, out: Path) -> str:
    """The first ``layers`` decoder layers of the embedded default model, saved to ``out``."""
    from transformers import AutoModelForCausalLM

    from lightning_prune.models import load_causal_lm, load_tokenizer

    dense = load_causal_lm("smollm2-135m")
    dense.config.num_hidden_layers = layers
    small = AutoModelForCausalLM.from_config(dense.config)
    small.load_state_dict(dense.state_dict(), strict=False)
    small.save_pretrained(out)
    load_tokenizer("smollm2-135m").save_pretrained(out)
    return str(out)


def fit_losses(model: str, gate: str, init_logit: float, root: Path) -> dict[str, list[float]]:
    """Train and validation losses of one single-device fit, by step."""
    main(
        [
            "fit",
            f"--config={RECIPE}",
            f"--model.model={model}",
            f"--model.mask_family.init_args.gate={gate}",
            f"--model.mask_family.init_args.init_logit={init_logit!r}",
            "--model.solver.init_args.warmup_ratio=0.0",
            "--data.seq_len=32",
            "--data.num_samples=6",
            "--data.seed=3",
            "--data.eval_tokens=64",
            "--data.batch_size=2",
            "--trainer.devices=1",
            f"--trainer.default_root_dir={root}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.log_every_n_steps=1",
        ]
    )
    metrics = next((root / "lightning_logs").glob("version_*")) / "metrics.csv"
    with open(metrics) as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: int(r["step"]))
    return {key: [float(r[key]) for r in rows if r.get(key)] for key in ("train/loss", "val/loss")}


def float32_step(value: float, toward: float) -> float:
    """The next float32 after ``value`` toward ``toward`` (the logits are float32)."""
    start = torch.tensor(value, dtype=torch.float32)
    return float(torch.nextafter(start, torch.tensor(toward, dtype=torch.float32)))


def largest_relative_change(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers kept (default 2)")
    parser.add_argument("--init-logit", type=float, default=2.0)
    parser.add_argument("--json", type=Path, default=Path("repeatability.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = args.init_logit
    logits = {"x": x, "x+ulp": float32_step(x, math.inf), "x-ulp": float32_step(x, -math.inf)}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model = truncated_model(args.layers, Path(tmp) / "model")
        for gate in GATES:
            runs = {
                label: fit_losses(model, gate, value, Path(tmp) / f"{gate}-{label}")
                for label, value in logits.items()
            }
            for label in ("x+ulp", "x-ulp"):
                results.append(
                    {
                        "gate": gate,
                        "init_logit": logits[label],
                        "train_loss_change": largest_relative_change(
                            runs["x"]["train/loss"], runs[label]["train/loss"]
                        ),
                        "val_loss_change": largest_relative_change(
                            runs["x"]["val/loss"], runs[label]["val/loss"]
                        ),
                        "train_losses": runs[label]["train/loss"],
                        "reference_train_losses": runs["x"]["train/loss"],
                    }
                )
    print(f"\n{'gate':<14} {'init_logit':>22} {'train loss change':>18} {'val loss change':>16}")
    for row in results:
        print(
            f"{row['gate']:<14} {row['init_logit']:>22.17g} "
            f"{row['train_loss_change']:>18.2e} {row['val_loss_change']:>16.2e}"
        )
    args.json.write_text(json.dumps({"layers": args.layers, "runs": results}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main_cli()
