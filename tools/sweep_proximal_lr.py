"""Learning-rate sweep of the proximal (ProxSparse) solver on the default model and corpus.

One fit per learning rate, each from the same warm start (``--init``: a one-shot initializer, or
``none`` for W0) and the same calibration tokens; held-out perplexity on Wikipedia and
Shakespeare of the hardened 2:4 model. Prints a table and writes JSON. Needs the
lightning-prune-baselines plugin for ``--init wanda``.

    python tools/sweep_proximal_lr.py --lrs 1e-3 3e-3 5e-3 7e-3 1e-2 --samples 40 --seq-len 256 \
        --eval-tokens 4096 --output bench_results/sweep_proximal_lr.json
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from bench_common import calibration_data, fit_one_epoch
from lightning.pytorch import seed_everything

from lightning_prune.data import CalibrationDataModule
from lightning_prune.evaluation import format_table, perplexity, write_json
from lightning_prune.masks.nm import NMMaskFamily
from lightning_prune.module import PruningModule
from lightning_prune.regularizers.nm_sparsity import NMSparsityRegularizer
from lightning_prune.solvers.proximal import ProximalSolver


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 5e-3, 7e-3, 1e-2])
    parser.add_argument("--init", default="wanda", help="one-shot warm start, or 'none' (W0)")
    parser.add_argument("--lam", type=float, default=0.1, help="scale-free λ of nm_sparsity")
    parser.add_argument(
        "--lr-scale",
        default="absolute",
        choices=["absolute", "weight_rms"],
        help="proximal.lr_scale: weight_rms gives each layer lr · rms(W0)",
    )
    parser.add_argument("--samples", type=int, default=40, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--output", default="bench_results/sweep_proximal_lr.json")
    return parser.parse_args()


def fit_and_measure(
    args: argparse.Namespace,
    lr: float,
    data: CalibrationDataModule,
    sources: dict[str, torch.Tensor],
) -> dict:
    """One proximal fit at ``lr`` from the warm start; the hardened model's perplexities."""
    seed_everything(0)
    module = PruningModule(
        NMMaskFamily(2, 4),
        ProximalSolver(lr=lr, lr_scale=args.lr_scale),
        [NMSparsityRegularizer(lam=args.lam, lam_mode="scale_free")],
        model=args.model,
        init_mask=None if args.init == "none" else args.init,
    )
    seconds = fit_one_epoch(module, data)
    row = {"lr": lr, "lr_scale": args.lr_scale, "init": args.init, "fit_seconds": seconds}
    module.mask_family.harden()
    for name, windows in sources.items():
        row[name] = perplexity(module.model, windows, desc=f"lr={lr:g}/{name}")
    return row


def _table(rows: list[dict], sources: dict) -> str:
    shown = [{**row, "lr": f"{row['lr']:g}"} for row in rows]
    return format_table(shown, ["lr", "init", *sources])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    data, sources = calibration_data(args.model, args.samples, args.seq_len, args.eval_tokens)
    rows = []
    for lr in args.lrs:
        rows.append(fit_and_measure(args, lr, data, sources))
        print(_table(rows[-1:], sources).splitlines()[-1], flush=True)
    print(f"\n{args.model}: proximal 2:4 from {args.init}, held-out perplexity by learning rate")
    print(_table(rows, sources))
    write_json(
        Path(args.output),
        {
            "config": vars(args),
            "calibration_tokens": args.samples * args.seq_len,
            "torch_threads": torch.get_num_threads(),
            "rows": rows,
        },
    )
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
