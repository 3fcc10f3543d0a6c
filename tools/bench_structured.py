"""Benchmark uniform structured pruning (minimax) against dense and magnitude-structured.

Prints (and writes as JSON) held-out perplexity on Wikipedia and Shakespeare for the dense model,
the magnitude-structured baseline (per layer, keep the heads / channels with the largest weight
norm, uniform counts), Wanda-sp and FLAP-style rows (lightning-prune-baselines; FLAP with its
bias compensation where the model has output-projection biases, e.g. GPT-2, the metric alone on
Llama-family models; see docs/baselines.md), the learned minimax mask, and the minimax export
after LoRA recovery (`lightning-prune recover`), at the same kept counts and with the same
calibration tokens for every method; plus each one's perplexity rise over dense.

    python tools/bench_structured.py --budget 0.25 --samples 64 --seq-len 512 \
        --output bench_results/structured.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from bench_common import calibration_data, cpu_trainer, fit_one_epoch
from lightning.pytorch import seed_everything
from oneshot_rows import one_shot_mask

from lightning_prune.evaluation import format_table, perplexity, write_json
from lightning_prune.masks.init import build_initializer
from lightning_prune.masks.structured import UniformStructuredFamily
from lightning_prune.module import PruningModule
from lightning_prune.regularizers.uniform_lagrangian import UniformLagrangian
from lightning_prune.solvers.minimax import MinimaxSolver


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budget", type=float, default=0.25, help="share of decoder params")
    parser.add_argument("--gqa", default="kv_group", choices=["kv_group", "query"])
    parser.add_argument(
        "--gate", default="hard_concrete", choices=["hard_concrete", "sigmoid_topk"]
    )
    parser.add_argument("--channel-multiple", type=int, default=32)
    parser.add_argument("--samples", type=int, default=64, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--lr-multipliers", type=float, default=0.05)
    parser.add_argument("--distill", type=float, default=0.0, help="distillation weight")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument(
        "--baselines",
        nargs="*",
        default=["wanda_sp", "flap"],
        help="one-shot structured initializers (lightning-prune-baselines) for extra rows",
    )
    parser.add_argument(
        "--recovery-epochs",
        type=int,
        default=1,
        help="epochs of LoRA recovery on the exported minimax model (0: no recovery row)",
    )
    parser.add_argument("--recovery-lr", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument(
        "--init-mask", default=None, help="warm start minimax from a one-shot method (wanda_sp)"
    )
    parser.add_argument("--output", default="bench_results/structured.json")
    return parser.parse_args()


def recovered_row(module, data, sources, args) -> dict:
    """Export the minimax model, recover it with LoRA (same calibration tokens), measure it."""
    from transformers import AutoModelForCausalLM

    from lightning_prune.export.structured import export_structured_hf
    from lightning_prune.recovery import RecoveryModule

    with tempfile.TemporaryDirectory() as scratch:
        exported, recovered = Path(scratch) / "minimax", Path(scratch) / "recovered"
        export_structured_hf(module, exported)
        recovery = RecoveryModule(
            str(exported),
            str(recovered),
            method="lora",
            lr=args.recovery_lr,
            lora_rank=args.lora_rank,
            lora_alpha=2.0 * args.lora_rank,
        )
        trainer = cpu_trainer(args.recovery_epochs, progress_bar=True)
        trainer.fit(recovery, datamodule=data)
        recovery.write_export(trainer.global_step)
        model = AutoModelForCausalLM.from_pretrained(recovered).eval()
        label = f"minimax + LoRA recovery (r={args.lora_rank})"
        row = {"model": label, **module.mask_family.exported_shape()}
        with torch.no_grad():
            for name, windows in sources.items():
                row[name] = perplexity(model, windows, desc=f"{label}/{name}")
    print(format_table([row], ["model", *sources]).splitlines()[-1], flush=True)
    return row


def main() -> None:
    args = parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    seed_everything(0)
    family = UniformStructuredFamily(
        budget=args.budget, gqa=args.gqa, gate=args.gate, channel_multiple=args.channel_multiple
    )
    solver = MinimaxSolver(
        lr=args.lr, lr_multipliers=args.lr_multipliers, distill_weight=args.distill
    )
    module = PruningModule(family, solver, [UniformLagrangian()], model=args.model)
    data, sources = calibration_data(args.model, args.samples, args.seq_len, args.eval_tokens)
    module.configure_model()

    def measure(label: str) -> dict:
        row = {"model": label, **family.exported_shape()}
        for name, windows in sources.items():
            row[name] = perplexity(module.model, windows, desc=f"{label}/{name}")
        print(format_table([row], ["model", *sources]).splitlines()[-1], flush=True)
        return row

    rows = []
    family.set_mode("off")
    rows.append({**measure("dense"), **family.describe()["dense_shape"]})
    family.set_mode("learn")
    if args.init_mask:  # warm start the gates from a one-shot method, as `init_mask:` does
        initializer = build_initializer(args.init_mask)
        masks = initializer.compute(module.model, family, data.train_dataloader())
        with torch.no_grad():
            family.apply_initial_masks(masks)
    fit_seconds = fit_one_epoch(module, data, progress_bar=True)
    shape = family.exported_shape()  # learned split: the baseline gets the same counts
    family.use_masks(family.magnitude_masks())
    rows.append(measure("magnitude-structured"))
    for name in args.baselines:  # same learned head/channel counts as minimax
        with one_shot_mask(module, name, data.train_dataloader()):
            rows.append(measure(name))
    family.harden()
    start = f", from {args.init_mask}" if args.init_mask else ""
    rows.append(measure(f"minimax ({args.gate}{start})"))
    if args.recovery_epochs > 0:
        rows.append(recovered_row(module, data, sources, args))
    for row in rows[1:]:
        for name in sources:
            row[f"{name}_rise"] = row[name] / rows[0][name] - 1
    columns = [
        "model",
        "num_heads",
        "num_kv_heads",
        "intermediate_size",
        *sources,
        *(f"{s}_rise" for s in sources),
    ]
    print(f"\nheld-out perplexity (lower is better), budget {args.budget:.0%} of decoder params")
    print(format_table(rows, columns))
    result = {
        "config": vars(args),
        "pruned_shape": shape,
        "tokens_seen": args.samples * args.seq_len,
        "fit_seconds": fit_seconds,
        "perplexity": rows,
        "eval_tokens": {k: int(v.numel()) for k, v in sources.items()},
        "torch_threads": torch.get_num_threads(),
    }
    write_json(Path(args.output), result)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
