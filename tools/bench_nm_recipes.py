"""2:4 recipes: one-shot methods against learned masks from each warm start, with the refit.

Held-out perplexity on Wikipedia (the split every choice is made on) and Shakespeare (a domain
nothing is tuned on), all rows on the same calibration windows (``bench_common``). One process
measures one part, so parts run side by side on a shared machine and each JSON is rewritten
after every row:

- ``--part oneshot``: dense, Wanda 2:4, SparseGPT 2:4 (its own weight update);
- ``--part sparsegpt-mask``: SparseGPT's mask on the pretrained weights, then + refit;
- ``--part learned``: the proximal solver from ``--init`` (``wanda``, or ``sparsegpt-mask``:
  SparseGPT's mask without its weight update) with ``--objective``, then + refit at every
  ``--dampings`` value.

    cd tools && OMP_NUM_THREADS=1 python bench_nm_recipes.py --part learned --init sparsegpt-mask \
        --lr 0.026 --lr-scale weight_rms --output ../bench_results/nm_recipes/learned.json
    python bench_nm_recipes.py --model /tmp/small --samples 2 --seq-len 32 --eval-tokens 64 \
        --part learned --output /tmp/nm.json   # smoke test

Needs the lightning-prune-baselines plugin (Wanda, SparseGPT).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import calibration_data, calibration_parser, cpu_trainer
from lightning.pytorch import seed_everything

from lightning_prune.evaluation import format_table, perplexity, write_json
from lightning_prune.masks.init import build_initializer, one_shot_applied
from lightning_prune.masks.nm import NMMaskFamily
from lightning_prune.module import PruningModule
from lightning_prune.refit import compute_refit
from lightning_prune.regularizers.nm_sparsity import NMSparsityRegularizer
from lightning_prune.solvers.proximal import ProximalSolver

#: ``init_mask`` specs by benchmark name: SparseGPT's mask alone keeps the pretrained weights,
#: so the learned mask and the refit start from W0 like every other row
INITS: dict[str, Any] = {
    "wanda": "wanda",
    "sparsegpt-mask": {"class_path": "sparsegpt", "init_args": {"update_weights": False}},
}


def parse_args() -> argparse.Namespace:
    parser = calibration_parser(__doc__)
    parser.add_argument("--part", choices=["oneshot", "sparsegpt-mask", "learned"], required=True)
    parser.add_argument("--init", choices=sorted(INITS), default="sparsegpt-mask")
    parser.add_argument("--objective", choices=["end_to_end", "blockwise"], default="end_to_end")
    parser.add_argument("--steps-per-block", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.026)
    parser.add_argument("--lr-scale", choices=["absolute", "weight_rms"], default="weight_rms")
    parser.add_argument("--lam", type=float, default=0.1, help="scale-free λ of nm_sparsity")
    parser.add_argument("--distill-weight", type=float, default=0.0, help="KL(dense ‖ masked)")
    parser.add_argument("--epochs", type=int, default=1, help="end-to-end epochs")
    parser.add_argument(
        "--dampings", type=float, nargs="*", default=[0.1], help="refit dampings (none: no refit)"
    )
    parser.add_argument("--output", default="bench_results/nm_recipes.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    seed_everything(0)
    data, sources = calibration_data(args.model, args.samples, args.seq_len, args.eval_tokens)
    rows: list[dict] = []

    def measure(label: str, model: torch.nn.Module, seconds: float | None = None) -> None:
        row = {"model": label, "seconds": seconds}
        for name, windows in sources.items():
            row[name] = perplexity(model, windows, desc=f"{label}/{name}")
        rows.append(row)
        print(format_table([row], ["model", *sources, "seconds"]).splitlines()[-1], flush=True)
        write_json(
            Path(args.output),
            {
                "settings": vars(args),
                "calibration_tokens": args.samples * args.seq_len,
                "eval_tokens": {k: int(v.numel()) for k, v in sources.items()},
                "torch_threads": torch.get_num_threads(),
                "rows": rows,
            },
        )

    def with_refits(module: PruningModule, label: str) -> None:
        for damping in args.dampings:
            started = time.perf_counter()
            update = compute_refit(
                module.model, module.mask_family, data.calibration_dataloader(), damping
            )
            with one_shot_applied(module.mask_family, update):
                measure(f"{label} + refit {damping:g}", module.model, time.perf_counter() - started)

    if args.part == "learned":
        learned(args, data, measure, with_refits)
        return
    module = PruningModule(NMMaskFamily(2, 4), ProximalSolver(), model=args.model)
    module.configure_model()
    family = module.mask_family
    family.set_mode("off")
    names = ["wanda", "sparsegpt"] if args.part == "oneshot" else ["sparsegpt-mask"]
    if args.part == "oneshot":
        measure("dense", module.model)
    for name in names:
        started = time.perf_counter()
        update = build_initializer(INITS.get(name, name)).compute_update(
            module.model, family, data.calibration_dataloader()
        )
        with one_shot_applied(family, update):
            measure(name, module.model, time.perf_counter() - started)
    if args.part == "sparsegpt-mask":
        family.apply_initial_masks(update.masks)
        with_refits(module, "sparsegpt-mask")


def learned(args: argparse.Namespace, data: Any, measure: Any, with_refits: Any) -> None:
    """The proximal row from ``args.init``, then its refits."""
    blockwise = args.objective == "blockwise"
    objective = {"objective": "blockwise", "steps_per_block": args.steps_per_block}
    module = PruningModule(
        NMMaskFamily(2, 4),
        ProximalSolver(lr=args.lr, lr_scale=args.lr_scale, distill_weight=args.distill_weight),
        [NMSparsityRegularizer(lam=args.lam, lam_mode="scale_free")],
        model=args.model,
        init_mask=INITS[args.init],
        **(objective if blockwise else {}),
    )
    steps = module._hf_config().num_hidden_layers * args.steps_per_block if blockwise else -1
    trainer = cpu_trainer(epochs=-1 if blockwise else args.epochs, max_steps=steps)
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - started
    module.mask_family.harden()
    label = f"proximal {args.objective} from {args.init}, lr {args.lr:g} ({args.lr_scale})"
    if args.distill_weight:
        label += f", distill {args.distill_weight:g}"
    if args.epochs != 1:
        label += f", {args.epochs} epochs"
    measure(label, module.model, seconds)
    with_refits(module, label)


if __name__ == "__main__":
    main()
