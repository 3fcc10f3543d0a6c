"""Timing helpers shared by the speed benchmarks (tools/bench_speed.py, tools/bench_inference.py).

``timings``: medians of prefill (one forward over the prompt) and greedy decode (``new_tokens``
tokens with the KV cache) tokens/s; ``flops_per_token``: matmul FLOPs per token, the physical
limit of a speed-up when compared between two models.
"""

from __future__ import annotations

import statistics
import time

import torch


def flops_per_token(model: torch.nn.Module, context: int, sparse: frozenset[str] = frozenset()):
    """Matmul FLOPs of one token at ``context``: 2·(Linear params) + 4·layers·heads·head_dim·ctx.

    Linears named in ``sparse`` count half (2:4 kernels that skip the zeros).
    """
    config = model.config
    linear = 0.0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2 or isinstance(module, torch.nn.Embedding):
            continue
        linear += weight.numel() * (0.5 if name in sparse else 1.0)
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2.0 * linear + 4.0 * config.num_hidden_layers * heads * head_dim * context


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompt(model, batch: int, length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
    return prompt.to(next(model.parameters()).device)


@torch.no_grad()
def _run_once(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Seconds of one prefill and of ``new_tokens`` greedy decode steps (generate − prefill)."""
    device = prompt.device
    start = time.perf_counter()
    model(input_ids=prompt)
    _sync(device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(
        prompt,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    _sync(device)
    return prefill, time.perf_counter() - start - prefill


def _rates(batch: int, length: int, new_tokens: int, runs: list[tuple[float, float]]) -> dict:
    return {
        "prefill_tok_s": batch * length / statistics.median(r[0] for r in runs),
        "decode_tok_s": batch * new_tokens / max(statistics.median(r[1] for r in runs), 1e-9),
    }


@torch.no_grad()
def timings(model, batch: int, length: int, new_tokens: int, repeats: int) -> dict[str, float]:
    """Median prefill and decode tokens/s over ``repeats`` runs (after one warm-up run)."""
    prompt = _prompt(model, batch, length)
    _run_once(model, prompt, new_tokens)  # warm-up (and compilation, for compiled models)
    runs = [_run_once(model, prompt, new_tokens) for _ in range(repeats)]
    return _rates(batch, length, new_tokens, runs)


@torch.no_grad()
def interleaved_timings(
    models: dict[str, torch.nn.Module], batch: int, length: int, new_tokens: int, repeats: int
) -> dict[str, dict[str, float]]:
    """:func:`timings` of several models, taking turns run by run, so that load from other
    processes on a shared machine hits every model alike. ``{name: rates}``."""
    prompts = {name: _prompt(model, batch, length) for name, model in models.items()}
    for name, model in models.items():
        _run_once(model, prompts[name], new_tokens)  # warm-up (and compilation)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            runs[name].append(_run_once(model, prompts[name], new_tokens))
    return {name: _rates(batch, length, new_tokens, r) for name, r in runs.items()}
