"""Refit benchmark: what the least-squares weight refit adds to a fixed 2:4 mask.

Held-out perplexity on Wikipedia and Shakespeare, same calibration tokens for every row, of:
dense, Wanda 2:4, Wanda 2:4 + refit (one row per damping tried), SparseGPT 2:4 (its own weight
update), proximal 2:4 from Wanda (the recipe's settings) without and with the refit. The
damping of the proximal row's refit is the one with the lowest Wikipedia perplexity on the
Wanda rows (the choice never looks at Shakespeare); with ``--rows learned`` (the learned rows
alone, e.g. in a second process) every damping is refit and the choice is read off the
``--rows oneshot`` part. The JSON is rewritten after every row. Needs the
lightning-prune-baselines plugin. Prints a table and writes JSON.

    OMP_NUM_THREADS=1 python tools/bench_refit.py --samples 40 --seq-len 256 \
        --eval-tokens 2048 --dampings 0.01 0.1 --rows oneshot \
        --output bench_results/refit_oneshot.json
    OMP_NUM_THREADS=1 python tools/bench_refit.py --samples 40 --seq-len 256 \
        --eval-tokens 2048 --dampings 0.01 0.1 --rows learned \
        --output bench_results/refit_learned.json
    python tools/bench_refit.py --model /tmp/small --samples 2 --seq-len 32 --eval-tokens 64 \
        --dampings 0.01 --output /tmp/refit.json   # smoke test
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from bench_common import calibration_data, calibration_parser, fit_one_epoch
from lightning.pytorch import seed_everything

from lightning_prune.evaluation import format_table, perplexity, write_json
from lightning_prune.masks.init import OneShotUpdate, build_initializer, one_shot_applied
from lightning_prune.masks.nm import NMMaskFamily
from lightning_prune.module import PruningModule
from lightning_prune.refit import compute_refit
from lightning_prune.regularizers.nm_sparsity import NMSparsityRegularizer
from lightning_prune.solvers.proximal import ProximalSolver


def parse_args() -> argparse.Namespace:
    parser = calibration_parser(__doc__)
    parser.add_argument("--dampings", type=float, nargs="+", default=[0.001, 0.01, 0.1])
    parser.add_argument("--lr", type=float, default=5e-3, help="proximal lr (the recipe's)")
    parser.add_argument("--lam", type=float, default=0.01, help="scale-free λ (the recipe's)")
    parser.add_argument(
        "--rows",
        choices=["all", "oneshot", "learned"],
        default="all",
        help="oneshot: dense, Wanda (+ refit), SparseGPT; learned: proximal with and without "
        "the refit at every damping (run both parts as two processes on a shared machine)",
    )
    parser.add_argument("--output", default="bench_results/refit.json")
    return parser.parse_args()


def nm_module(model: str, args: argparse.Namespace, init: str | None = None) -> PruningModule:
    """2:4 with the proximal solver at configs/proxsparse_2of4.yaml's settings."""
    return PruningModule(
        NMMaskFamily(2, 4),
        ProximalSolver(lr=args.lr, warmup_ratio=0.1, grad_clip=1.0),
        [NMSparsityRegularizer(lam=args.lam, lam_mode="scale_free", prox_step="lambda")],
        model=model,
        init_mask=init,
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    seed_everything(0)
    data, sources = calibration_data(args.model, args.samples, args.seq_len, args.eval_tokens)
    rows: list[dict] = []
    seconds: dict[str, float] = {}

    def measure(label: str, model: torch.nn.Module, **extra) -> dict:
        row = {"model": label, **extra}
        for name, windows in sources.items():
            row[name] = perplexity(model, windows, desc=f"{label}/{name}")
        print(format_table([row], ["model", *sources]).splitlines()[-1], flush=True)
        rows.append(row)
        save()
        return row

    def save(extra: dict | None = None) -> None:
        """Write the JSON so far (a stopped run keeps the rows it measured)."""
        write_json(
            Path(args.output),
            {
                "config": vars(args),
                "model": args.model,
                "calibration_tokens": args.samples * args.seq_len,
                "eval_tokens": {k: int(v.numel()) for k, v in sources.items()},
                "torch_threads": torch.get_num_threads(),
                "dampings_tried": args.dampings,
                "perplexity": rows,
                "seconds": seconds,
                **(extra or {}),
            },
        )

    def refit(module: PruningModule, label: str, damping: float) -> OneShotUpdate:
        started = time.perf_counter()
        update = compute_refit(
            module.model, module.mask_family, data.calibration_dataloader(), damping
        )
        seconds[label] = time.perf_counter() - started
        print(f"{label}: refit took {seconds[label]:.1f} s", flush=True)
        return update

    chosen = None
    if args.rows in ("all", "oneshot"):
        module = nm_module(args.model, args)
        module.configure_model()
        family = module.mask_family
        family.set_mode("off")
        measure("dense", module.model)
        started = time.perf_counter()
        wanda = build_initializer("wanda").compute_update(
            module.model, family, data.calibration_dataloader()
        )
        seconds["Wanda 2:4"] = time.perf_counter() - started
        with one_shot_applied(family, wanda):
            measure("Wanda 2:4", module.model)
        family.apply_initial_masks(wanda.masks)  # the refit reads the family's hard masks
        by_damping = {}
        for damping in args.dampings:
            label = f"Wanda 2:4 + refit (damping {damping:g})"
            with one_shot_applied(family, refit(module, label, damping)):
                by_damping[damping] = measure(label, module.model, damping=damping)
        chosen = min(by_damping, key=lambda d: by_damping[d]["wikipedia"])
        print(f"chosen damping (Wikipedia held-out): {chosen:g}", flush=True)
        save({"chosen_damping": chosen})
        started = time.perf_counter()
        sparsegpt = build_initializer("sparsegpt").compute_update(
            module.model, family, data.calibration_dataloader()
        )
        seconds["SparseGPT 2:4"] = time.perf_counter() - started
        with one_shot_applied(family, sparsegpt):
            measure("SparseGPT 2:4", module.model)
        del module, family, wanda, sparsegpt

    if args.rows in ("all", "learned"):
        learned = nm_module(args.model, args, init="wanda")
        seconds["proximal 2:4 (from Wanda)"] = fit_one_epoch(learned, data)
        learned.mask_family.harden()
        measure("proximal 2:4 (from Wanda)", learned.model)
        for damping in [chosen] if chosen is not None else args.dampings:
            label = f"proximal 2:4 (from Wanda) + refit (damping {damping:g})"
            with one_shot_applied(learned.mask_family, refit(learned, label, damping)):
                measure(label, learned.model, damping=damping)

    print("\nheld-out perplexity (lower is better)")
    print(format_table(rows, ["model", *sources]))
    save({"chosen_damping": chosen})
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
