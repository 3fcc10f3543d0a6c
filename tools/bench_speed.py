"""CPU speed of an exported smaller model against the dense one: prefill and decode tokens/s.

Both models load with plain ``AutoModelForCausalLM``. For every batch size and prompt length:
median over ``--repeats`` runs of prefill (one forward over the prompt) and of greedy decode
(``--new-tokens`` tokens with the KV cache), next to the FLOP ratio (the physical limit of the
speed-up: matmul FLOPs per token, attention scores included, embeddings excluded).

    python tools/bench_speed.py --dense smollm2-135m --pruned exports/maskprune \
        --batch-sizes 1 4 --lengths 128 512 --output bench_results/speed.json
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from inference_timing import flops_per_token, timings
from transformers import AutoModelForCausalLM

from lightning_prune.evaluation import format_table, write_json
from lightning_prune.models.loading import resolve_model_path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", default="smollm2-135m", help="embedded name or folder")
    parser.add_argument("--pruned", required=True, help="exported folder (export --format hf)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default="bench_results/speed.json")
    return parser.parse_args()


def load(name: str) -> torch.nn.Module:
    path = resolve_model_path(name)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    dense, pruned = load(args.dense), load(args.pruned)
    rows = []
    for batch in args.batch_sizes:
        for length in args.lengths:
            d = timings(dense, batch, length, args.new_tokens, args.repeats)
            p = timings(pruned, batch, length, args.new_tokens, args.repeats)
            context = length + args.new_tokens // 2
            bound = flops_per_token(dense, context) / flops_per_token(pruned, context)
            row = {"batch": batch, "length": length, "flop_speedup_bound": bound}
            for key in ("prefill_tok_s", "decode_tok_s"):
                row[f"dense_{key}"], row[f"pruned_{key}"] = d[key], p[key]
                row[f"{key.split('_')[0]}_speedup"] = p[key] / d[key]
                row[f"{key.split('_')[0]}_of_bound"] = row[f"{key.split('_')[0]}_speedup"] / bound
            rows.append(row)
            print(format_table([row], list(row)).splitlines()[-1], flush=True)
    columns = [
        "batch",
        "length",
        "dense_prefill_tok_s",
        "pruned_prefill_tok_s",
        "prefill_speedup",
        "dense_decode_tok_s",
        "pruned_decode_tok_s",
        "decode_speedup",
        "flop_speedup_bound",
        "prefill_of_bound",
        "decode_of_bound",
    ]
    print(f"\nCPU tokens/s, median of {args.repeats} runs ({torch.get_num_threads()} threads)")
    print(format_table(rows, columns))
    params = {
        name: sum(p.numel() for p in m.parameters())
        for name, m in (("dense", dense), ("pruned", pruned))
    }
    result = {
        "config": vars(args),
        "params": params,
        "rows": rows,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    write_json(Path(args.output), result)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
