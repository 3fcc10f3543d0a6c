"""Benchmark ProxSparse 2:4 on the embedded default model and corpus.

Prints (and writes as JSON) held-out perplexity on Wikipedia and Shakespeare for the dense model,
magnitude 2:4 and learned 2:4 (same calibration tokens for every method), plus the step-time
split (forward, backward, optimizer, prox) and the proximal step against a plain AdamW step.

    python tools/bench_proxsparse.py --samples 64 --seq-len 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything

from lightning_prune.data import CalibrationDataModule
from lightning_prune.evaluation import format_table, perplexity, write_json
from lightning_prune.masks.init import build_initializer
from lightning_prune.masks.magnitude import MagnitudeInit
from lightning_prune.masks.nm import NMMaskFamily
from lightning_prune.module import PruningModule
from lightning_prune.regularizers.nm_sparsity import NMSparsityRegularizer
from lightning_prune.solvers.proximal import ProximalSolver


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=64, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lam", type=float, default=0.01, help="scale-free λ of nm_sparsity")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--init", default=None, help="warm start initializer (e.g. magnitude)")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--timing-steps", type=int, default=4)
    parser.add_argument("--output", default="bench_results/proxsparse.json")
    return parser.parse_args()


def build(args: argparse.Namespace) -> tuple[PruningModule, CalibrationDataModule]:
    module = PruningModule(
        NMMaskFamily(2, 4),
        ProximalSolver(lr=args.lr),
        [NMSparsityRegularizer(lam=args.lam, lam_mode="scale_free")],
        model=args.model,
    )
    data = CalibrationDataModule(source="wikipedia", tokenizer=args.model, seq_len=args.seq_len,
                                 num_samples=args.samples, eval_tokens=args.eval_tokens)
    return module, data


def step_split(module: PruningModule, data: CalibrationDataModule, steps: int) -> dict:
    """Median seconds of forward, backward, optimizer and prox over ``steps`` steps."""
    module.mask_family.set_mode("learn")
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-12)  # timing only: weights barely move
    regularizer = module.regularizers[0]
    times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "prox": []}
    batches = iter(data.train_dataloader())
    for _ in range(steps):
        batch = next(batches)
        start = time.perf_counter()
        loss = module(batch["input_ids"], batch["labels"]).loss
        t_forward = time.perf_counter()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        t_backward = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t_optimizer = time.perf_counter()
        regularizer.prox_(module.mask_family, lr=1e-12)
        t_prox = time.perf_counter()
        times["forward"].append(t_forward - start)
        times["backward"].append(t_backward - t_forward)
        times["optimizer"].append(t_optimizer - t_backward)
        times["prox"].append(t_prox - t_optimizer)
    split = {k: statistics.median(v) for k, v in times.items()}
    plain = split["forward"] + split["backward"] + split["optimizer"]
    split["adamw_step"] = plain
    split["proximal_step"] = plain + split["prox"]
    split["proximal_over_adamw"] = split["proximal_step"] / plain
    split["prox_share_of_step"] = split["prox"] / split["proximal_step"]
    return split


def main() -> None:
    args = parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    seed_everything(0)
    module, data = build(args)
    data.setup()
    module.configure_model()
    family = module.mask_family
    sources = {"wikipedia": data.heldout_windows()}
    sources["shakespeare"] = data.heldout_windows(data.load_splits("shakespeare"))

    def measure(label: str) -> dict:
        row = {"model": label}
        for name, windows in sources.items():
            row[name] = perplexity(module.model, windows, desc=f"{label}/{name}")
        print(format_table([row], ["model", *sources]).splitlines()[-1], flush=True)
        return row

    rows = []
    family.set_mode("off")
    rows.append(measure("dense"))
    family.use_masks(MagnitudeInit().compute(module.model, family))
    rows.append(measure("magnitude 2:4"))
    if args.init:  # warm start: the one-shot mask is measured too, then learning starts from it
        initializer = build_initializer(args.init)
        batches = data.train_dataloader() if initializer.needs_data else None
        masks = initializer.compute(module.model, family, batches)
        if args.init != "magnitude":
            family.use_masks(masks)
            rows.append(measure(f"{args.init} 2:4"))
        family.apply_initial_masks(masks)
    family.set_mode("learn")
    started = time.perf_counter()
    trainer = Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                      enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    fit_seconds = time.perf_counter() - started
    family.harden()
    label = "learned 2:4" + (f" (from {args.init})" if args.init else "")
    rows.append(measure(label))
    split = step_split(module, data, args.timing_steps)
    print("\nheld-out perplexity (lower is better)")
    print(format_table(rows, ["model", *sources]))
    print("\nstep time split (seconds, median)")
    print(format_table([{k: v for k, v in split.items()}], list(split)))
    result = {
        "config": vars(args),
        "tokens_seen": args.samples * args.seq_len,
        "fit_seconds": fit_seconds,
        "perplexity": rows,
        "eval_tokens": {k: int(v.numel()) for k, v in sources.items()},
        "step_time": split,
        "torch_threads": torch.get_num_threads(),
    }
    write_json(Path(args.output), result)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
