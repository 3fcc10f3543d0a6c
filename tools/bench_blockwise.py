"""Block-wise against end-to-end learning of 2:4 masks, with the one-shot rows beside them.

Held-out perplexity on Wikipedia (the split hyperparameters are chosen on) and Shakespeare (a
domain nothing is tuned on) of: Wanda 2:4, SparseGPT 2:4, proximal end-to-end (from Wanda, one
epoch) and proximal block-wise (from Wanda, ``--steps-per-block`` steps per decoder block) at
each learning rate of ``--lrs``. Every row sees the same calibration tokens. Prints a table and
writes JSON.

    OMP_NUM_THREADS=2 python tools/bench_blockwise.py --samples 40 --seq-len 256 \
        --eval-tokens 4096 --lrs 1e-2 3e-2 --output bench_results/blockwise.json
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from bench_common import calibration_data, calibration_parser, cpu_trainer
from lightning.pytorch import seed_everything
from oneshot_rows import one_shot_mask

from lightning_prune.evaluation import format_table, perplexity, write_json
from lightning_prune.masks.nm import NMMaskFamily
from lightning_prune.module import PruningModule
from lightning_prune.regularizers.nm_sparsity import NMSparsityRegularizer
from lightning_prune.solvers.proximal import ProximalSolver


def parse_args() -> argparse.Namespace:
    parser = calibration_parser(__doc__)
    parser.add_argument("--lam", type=float, default=0.1, help="scale-free λ of nm_sparsity")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-2], help="block-wise lrs")
    parser.add_argument("--steps-per-block", type=int, default=20)
    parser.add_argument("--e2e-lr", type=float, default=5e-3, help="end-to-end lr (absolute)")
    parser.add_argument("--skip-e2e", action="store_true", help="no end-to-end row")
    parser.add_argument("--output", default="bench_results/blockwise.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    seed_everything(0)
    data, sources = calibration_data(args.model, args.samples, args.seq_len, args.eval_tokens)
    rows: list[dict] = []

    def measure(label: str, model: torch.nn.Module, seconds: float | None = None) -> None:
        row: dict = {"model": label}
        for name, windows in sources.items():
            row[name] = perplexity(model, windows, desc=f"{label}/{name}")
        row["seconds"] = seconds
        rows.append(row)
        print(format_table([row], ["model", *sources, "seconds"]).splitlines()[-1], flush=True)

    def learned(label: str, lr: float, lr_scale: str, **objective) -> None:
        seed_everything(0)
        module = PruningModule(
            NMMaskFamily(2, 4),
            ProximalSolver(lr=lr, lr_scale=lr_scale),
            [NMSparsityRegularizer(lam=args.lam, lam_mode="scale_free")],
            model=args.model,
            init_mask="wanda",
            **objective,
        )
        steps = -1
        if objective:
            layers = module._hf_config().num_hidden_layers
            steps = layers * args.steps_per_block
        trainer = cpu_trainer(epochs=-1 if objective else 1, max_steps=steps)
        started = time.perf_counter()
        trainer.fit(module, datamodule=data)
        seconds = time.perf_counter() - started
        module.mask_family.harden()
        measure(label, module.model, seconds)

    module = PruningModule(NMMaskFamily(2, 4), ProximalSolver(), model=args.model)
    module.configure_model()
    module.mask_family.set_mode("off")
    measure("dense", module.model)
    for name in ("wanda", "sparsegpt"):
        with one_shot_mask(module, name, data.train_dataloader()) as took:
            measure(f"{name} 2:4", module.model, took)
    if not args.skip_e2e:
        learned(f"proximal end-to-end lr {args.e2e_lr:g}", args.e2e_lr, "absolute")
    for lr in args.lrs:
        label = f"proximal blockwise lr {lr:g}·rms(W0), {args.steps_per_block} steps/block"
        learned(
            label,
            lr,
            "weight_rms",
            objective="blockwise",
            steps_per_block=args.steps_per_block,
        )
    print(f"\n{args.model}: held-out perplexity (lower is better)")
    print(format_table(rows, ["model", *sources, "seconds"]))
    write_json(
        args.output,
        {
            "settings": vars(args),
            "rows": rows,
            "eval_tokens": {k: int(v.numel()) for k, v in sources.items()},
        },
    )


if __name__ == "__main__":
    main()
