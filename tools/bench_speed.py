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
import statistics
import time
from pathlib import Path

import torch
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


def flops_per_token(model: torch.nn.Module, context: int) -> float:
    """Matmul FLOPs of one token at ``context``: 2·(Linear params) + 4·layers·heads·head_dim·ctx."""
    config = model.config
    linear = sum(
        m.weight.numel()
        for m in model.modules()
        if hasattr(m, "weight")
        and m.weight is not None
        and m.weight.dim() == 2
        and not isinstance(m, torch.nn.Embedding)
    )
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2.0 * linear + 4.0 * config.num_hidden_layers * heads * head_dim * context


@torch.no_grad()
def timings(model, batch: int, length: int, new_tokens: int, repeats: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch, length), generator=generator)
    prefill, decode = [], []
    model(input_ids=prompt[:, :8])  # warm-up
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=prompt)
        prefill.append(time.perf_counter() - start)
        start = time.perf_counter()
        model.generate(
            prompt,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        decode.append(time.perf_counter() - start - prefill[-1])
    return {
        "prefill_tok_s": batch * length / statistics.median(prefill),
        "decode_tok_s": batch * new_tokens / max(statistics.median(decode), 1e-9),
    }


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
