"""Memory plan: bytes per GPU of a pruning fit, per solver and strategy, before any GPU is rented.

The model is built on the meta device (no weights) from a config written below (Llama-3-8B and
-70B shapes, a ~1B Llama shape, the embedded default smollm2-135m) and the solver's mask family
is attached to it exactly as a fit attaches it; every count below comes from that model's
parameters (the decoder blocks' q/k/v/o/gate/up/down projections are pruned, never the
embeddings or the head: ``LlamaAdapter.linear_names``). Per GPU, in bytes:

- ``weights``: the frozen LM (W0 of every target included) in ``--dtype``;
- ``learnable``: the mask state in the dtype the family creates it in (proximal: a surrogate per
  pruned weight; minimax: gate logits and multipliers, replicated under FSDP2);
- ``optimizer``: AdamW's two moments per learnable tensor (its dtype);
- ``gradients``: one per learnable tensor (DDP: twice, its reducer's buckets are a second copy);
- ``activations``: tensors autograd saves, with gradient checkpointing off. Per decoder layer
  ``hidden * tokens * bytes * factor``, where the factor comes from the saved tensors of a
  Llama block (SDPA attention, no dropout; see :func:`layer_bytes_per_token`), plus the logits
  and their loss, plus one layer and the logits' gradient as the backward's working set.
  Block-wise: one block, its captured input and dense target, and the loss's float32 copies
  (every block's surrogate and AdamW moments stay allocated: the optimizer keeps a block's
  moments once it has learned it; gradients, activations and copies are one block's);
- ``copies``: weight-sized tensors autograd saves: the compute-dtype copy of every weight the
  forward casts (the float32 surrogate, or a float32 LM under bf16-mixed autocast) and the gated
  weights ``W0 * gates`` of minimax. They are whole weights on every rank, FSDP2 included.
  Under FSDP2 also the two gathered decoder layers (current and prefetched), one layer's
  unsharded gradients and the root group (embeddings, norm, head) that stays gathered;
- ``step``: AdamW's foreach step allocates one learnable-sized temporary (``sqrt(v)``), when the
  activations are already freed.

``total = weights + learnable + optimizer + gradients + max(activations + copies, step)``; a
setup fits a card when the total stays under ``(1 - headroom)`` of its memory (CUDA context,
allocator fragmentation, NCCL buffers and the prox's per-layer temporaries are not counted).

    python tools/plan_memory.py --seq-len 2048 --micro-batch 1
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

GIB = 1 << 30
MIB = 1 << 20
#: total memory per card as nvidia-smi lists it (H100 SXM 80GB, H200 141GB)
DEVICES = {"80GB": 81559 * MIB, "141GB": 143771 * MIB}
#: Llama-family shapes (LlamaConfig fields); smollm2-135m is the embedded default model
MODELS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
    "llama-1b": dict(  # the shape tools/device_check.py trains
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
        max_position_embeddings=4096,
    ),
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
        max_position_embeddings=8192, rope_theta=500000.0,
    ),
    "llama3-70b": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
        max_position_embeddings=8192, rope_theta=500000.0,
    ),
}
SOLVERS = ("proximal", "minimax")
STRATEGIES = ("single", "ddp", "fsdp2", "blockwise")
#: (solver, strategy, world size) rows of the printed plan
SETUPS = (
    ("proximal", "single", 1),
    ("proximal", "ddp", 8),
    ("proximal", "fsdp2", 8),
    ("proximal", "fsdp2", 64),
    ("proximal", "blockwise", 1),
    ("minimax", "single", 1),
    ("minimax", "ddp", 8),
    ("minimax", "fsdp2", 8),
    ("minimax", "fsdp2", 64),
)
PRECISIONS = ("bf16-mixed", "true")
#: Linears of a Llama block that read the same input (a RMSNorm's output)
INPUT_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("mlp.gate_proj", "mlp.up_proj"),
)
COLUMNS = ("weights", "learnable", "optimizer", "gradients", "activations", "copies", "step")


def llama_config(name: str):
    """The ``LlamaConfig`` of one of :data:`MODELS`."""
    from transformers import LlamaConfig

    return LlamaConfig(**MODELS[name])


def build_family(solver: str):
    """The mask family of the solver's default recipe (as in tools/bench_memory.py)."""
    if solver == "proximal":
        from lightning_prune.masks.nm import NMMaskFamily

        return NMMaskFamily()
    from lightning_prune.masks.structured import UniformStructuredFamily

    return UniformStructuredFamily(budget=0.25, channel_multiple=32)


def meta_model(config, solver: str, dtype: str) -> tuple[nn.Module, Any, Any]:
    """The LM on the meta device with the solver's mask family attached: (model, adapter,
    family)."""
    from transformers import AutoModelForCausalLM

    from lightning_prune.adapters import adapter_for

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, dtype), attn_implementation="sdpa"
        )
    model.requires_grad_(False)
    adapter = adapter_for(model)
    family = build_family(solver)
    family.attach(model, adapter)
    return model, adapter, family


@dataclass
class ParamInfo:
    """One parameter: elements, rows (FSDP2 shards dim 0), bytes per element, role."""

    numel: int
    rows: int
    itemsize: int
    learnable: bool
    replicated: bool  # kept whole on every rank under FSDP2

    def bytes(self, world: int = 1) -> int:
        """This rank's bytes when sharded over ``world`` ranks (FSDP2 pads dim 0)."""
        if self.replicated or world == 1:
            return self.numel * self.itemsize
        return math.ceil(self.rows / world) * (self.numel // max(self.rows, 1)) * self.itemsize


@dataclass
class Census:
    """What the plan needs from one meta-device model."""

    tensors: list[ParamInfo]
    layer_tensors: list[ParamInfo]  # one decoder block's
    layers: int
    pruned: int  # elements of the pruned (or gated) Linear weights
    layer_copies: int  # bytes of weight copies autograd saves in one block
    trainable: set[str]  # the block's Linears whose weight gets a gradient
    head_copies: int  # same, outside the blocks (the output head)
    config: Any = field(repr=False)

    def total(self, learnable: bool, world: int = 1) -> int:
        return sum(t.bytes(world) for t in self.tensors if t.learnable == learnable)

    def count(self, learnable: bool) -> int:
        return sum(t.numel for t in self.tensors if t.learnable == learnable)


def describe(param: nn.Parameter, replicated: set[int]) -> ParamInfo:
    """The :class:`ParamInfo` of one parameter (``replicated``: ids kept whole under FSDP2)."""
    rows = param.shape[0] if param.dim() else 1
    learnable = param.requires_grad
    return ParamInfo(param.numel(), rows, param.element_size(), learnable, id(param) in replicated)


def census(config, solver: str, dtype: str = "bfloat16", precision: str = "bf16-mixed") -> Census:
    """Count the parameters, the pruned weights and the saved weight copies of one model."""
    model, adapter, family = meta_model(config, solver, dtype)
    replicated = {id(p) for p in family.replicated_parameters()}
    own = list(family.parameters()) if isinstance(family, nn.Module) else []
    replicated |= {id(p) for p in own}  # outside the LM: never sharded
    seen = {id(p): p for p in [*model.parameters(), *own]}
    tensors = [describe(p, replicated) for p in seen.values()]
    block = adapter.decoder_layers(model)[0]
    layer_tensors = [describe(p, replicated) for p in block.parameters()]
    targets = family.targets()
    head = model.get_output_embeddings()
    return Census(
        tensors=tensors,
        layer_tensors=layer_tensors,
        layers=len(adapter.decoder_layers(model)),
        pruned=sum(m.parametrizations.weight.original.numel() for m in targets.values()),
        layer_copies=sum(copy_bytes(m, dtype, precision) for m in linears(block)),
        head_copies=copy_bytes(head, dtype, precision),
        trainable={n for n, m in block.named_modules() if trains(m)},
        config=config,
    )


def trains(module: nn.Module) -> bool:
    """Whether ``module`` is a Linear whose weight gets a gradient (through its mask state)."""
    return isinstance(module, nn.Linear) and any(p.requires_grad for p in module.parameters())


def linears(module: nn.Module) -> list[nn.Module]:
    """Every ``nn.Linear`` inside ``module``."""
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def compute_dtype(dtype: str, precision: str) -> torch.dtype:
    """The dtype the matmuls run in: bfloat16 under ``bf16-mixed``, else the LM's."""
    return torch.bfloat16 if precision == "bf16-mixed" else getattr(torch, dtype)


def copy_bytes(linear: nn.Module, dtype: str, precision: str) -> int:
    """Bytes of the weight tensor autograd saves for ``linear`` that is not a stored parameter.

    The forward's weight is W0, the surrogate cast to W0's dtype (a parameter of W0's size), or
    ``W0 * gates`` (a new tensor); autocast then casts it to the compute dtype.
    """
    compute = compute_dtype(dtype, precision)
    size = compute.itemsize
    if not hasattr(linear, "parametrizations"):
        return linear.weight.numel() * size if getattr(torch, dtype) != compute else 0
    weight = linear.parametrizations.weight
    numel = weight.original.numel()
    surrogates = [p for p in weight[0].parameters() if p.numel() == numel]
    if not surrogates:  # a product W0 * gates: always a new tensor
        return numel * size
    return numel * size if surrogates[0].dtype != compute else 0


def layer_bytes_per_token(config, dtype: str, precision: str, trainable: set[str]) -> int:
    """Bytes autograd saves per token in one Llama decoder block (SDPA attention).

    ``trainable``: the block's Linears whose weight gets a gradient (pruned by proximal, gated
    by minimax). Each RMSNorm saves its float32 input and rsqrt (``4h + 4``); a trainable
    Linear saves its input (q/k/v share one tensor and gate/up another, unless autocast casts
    it once per Linear); SDPA saves q, k, v (KV heads, not repeated), its output (which is
    o_proj's input) and a float32 logsumexp per head; the SwiGLU MLP saves gate, up,
    silu(gate) and their product (``4i``). Checked against the saved tensors of a real block in
    tests/test_plan_memory.py.
    """
    c = compute_dtype(dtype, precision).itemsize
    h, i = config.hidden_size, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // heads
    casts = getattr(torch, dtype) != compute_dtype(dtype, precision)
    inputs = 0
    for group in INPUT_GROUPS:
        saving = len(set(group) & trainable)
        inputs += c * h * (saving if casts else min(saving, 1))
    norms = 2 * (4 * h + 4)
    attention = c * (2 * heads * d + 2 * kv * d) + 4 * heads
    return norms + inputs + attention + 4 * c * i


def head_bytes_per_token(config, dtype: str, precision: str) -> int:
    """Final norm, logits kept in the output, their float32 copy and the saved log-softmax,
    and the int64 labels (the frozen head saves no input)."""
    c = compute_dtype(dtype, precision).itemsize
    h, v = config.hidden_size, config.vocab_size
    upcast = 4 * v if c != 4 else 0
    return (4 * h + 4) + c * v + upcast + 4 * v + 8


def activation_bytes(info: Census, blockwise: bool, tokens: int, dtype: str, precision: str):
    """Activations of one micro-batch of ``tokens`` tokens (see the module docstring)."""
    config = info.config
    layer = layer_bytes_per_token(config, dtype, precision, info.trainable)
    if blockwise:
        residual = getattr(torch, dtype).itemsize
        h = config.hidden_size
        return tokens * (2 * layer + 2 * residual * h + 3 * 4 * h)
    head = head_bytes_per_token(config, dtype, precision)
    return tokens * ((info.layers + 1) * layer + head + 4 * config.vocab_size)


def fsdp_buffers(info: Census) -> int:
    """Unsharded tensors FSDP2 holds: two gathered blocks, one block's unsharded gradients and
    the root group (everything outside the blocks), which stays gathered through the step."""
    layer = sum(t.bytes() for t in info.layer_tensors if not t.replicated)
    layer_grads = sum(t.bytes() for t in info.layer_tensors if t.learnable and not t.replicated)
    everything = sum(t.bytes() for t in info.tensors if not t.replicated)
    root = everything - info.layers * layer
    return 2 * layer + layer_grads + root


def plan(
    config,
    solver: str,
    strategy: str,
    world_size: int,
    seq_len: int,
    micro_batch: int,
    dtype: str = "bfloat16",
    precision: str = "bf16-mixed",
    info: Census | None = None,
) -> dict[str, Any]:
    """Bytes per GPU of one fit: every column of the table and their ``total``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    if strategy == "blockwise" and solver != "proximal":
        raise ValueError("blockwise: only the proximal solver learns block-wise")
    info = info or census(config, solver, dtype, precision)
    shards = world_size if strategy == "fsdp2" else 1
    blockwise = strategy == "blockwise"
    learnable = info.total(True, shards)
    block = sum(t.bytes() for t in info.layer_tensors if t.learnable)
    trained = block if blockwise else learnable  # what gets gradients (block-wise: one block)
    row = {
        "weights": info.total(False, shards),
        "learnable": learnable,
        "optimizer": 2 * learnable,
        "gradients": trained * (2 if strategy == "ddp" else 1),
        "activations": activation_bytes(
            info, blockwise, seq_len * micro_batch, dtype, precision
        ),
        "copies": info.layer_copies * (1 if blockwise else info.layers)
        + (0 if blockwise else info.head_copies)
        + (fsdp_buffers(info) if strategy == "fsdp2" else 0),
        "step": trained,
    }
    persistent = sum(row[k] for k in ("weights", "learnable", "optimizer", "gradients"))
    row["total"] = persistent + max(row["activations"] + row["copies"], row["step"])
    layer = layer_bytes_per_token(config, dtype, precision, info.trainable)
    size = compute_dtype(dtype, precision).itemsize
    row["activation_factor"] = layer / (config.hidden_size * size)  # per-layer factor
    return row


def model_summary(info: Census) -> dict[str, int]:
    """Parameter counts of one model (elements)."""
    return {
        "frozen_params": info.count(False),
        "learnable_params": info.count(True),
        "pruned_weights": info.pruned,
        "layers": info.layers,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--precision", default="bf16-mixed", choices=PRECISIONS)
    parser.add_argument("--headroom", type=float, default=0.10)
    parser.add_argument("--output", default="bench_results/plan_memory.json")
    return parser.parse_args(argv)


def plan_rows(args: argparse.Namespace, configs: dict[str, Any]) -> tuple[list[dict], dict]:
    """Every (model, setup) row, and the parameter counts of every model."""
    rows, models = [], {}
    for name, config in configs.items():
        for solver in SOLVERS:
            info = census(config, solver, args.dtype, args.precision)
            models.setdefault(name, {})[solver] = model_summary(info)
            for row_solver, strategy, world in SETUPS:
                if row_solver != solver:
                    continue
                row = plan(
                    config, solver, strategy, world, args.seq_len, args.micro_batch,
                    args.dtype, args.precision, info,
                )
                fits = {d: row["total"] <= (1 - args.headroom) * b for d, b in DEVICES.items()}
                rows.append({"model": name, "solver": solver, "strategy": strategy,
                             "world_size": world, **row, "fits": fits})
    return rows, models


def largest_fitting(rows: list[dict], names: list[str]) -> dict[str, dict[str, str | None]]:
    """Per card and setup, the largest model (in ``names`` order) whose plan fits."""
    result: dict[str, dict[str, str | None]] = {}
    for device in DEVICES:
        for solver, strategy, world in SETUPS:
            fitting = [
                r["model"] for r in rows
                if (r["solver"], r["strategy"], r["world_size"]) == (solver, strategy, world)
                and r["fits"][device]
            ]
            best = max(fitting, key=names.index) if fitting else None
            result.setdefault(device, {})[f"{solver} {strategy} x{world}"] = best
    return result


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"memory plan per GPU (GiB): seq_len {args.seq_len}, micro-batch {args.micro_batch}, "
        f"LM {args.dtype}, precision {args.precision}, no gradient checkpointing; factor: "
        "activation bytes per token and layer / (hidden * compute bytes)"
    )
    header = f"{'model':<13} {'solver':<8} {'strategy':<12}" + "".join(
        f"{c:>12}" for c in (*COLUMNS, "total")
    ) + f"{'factor':>8}  fits " + "/".join(DEVICES)
    print(header)
    for row in rows:
        setup = f"{row['strategy']} x{row['world_size']}"
        cells = "".join(f"{row[c] / GIB:>12.2f}" for c in (*COLUMNS, "total"))
        fits = "/".join("yes" if row["fits"][d] else "no" for d in DEVICES)
        factor = f"{row['activation_factor']:>8.1f}"
        print(f"{row['model']:<13} {row['solver']:<8} {setup:<12}{cells}{factor}  {fits}")


def print_largest(largest: dict[str, dict[str, str | None]], headroom: float) -> None:
    for device, setups in largest.items():
        parts = ", ".join(f"{setup}: {model or 'none'}" for setup, model in setups.items())
        print(f"largest model that fits a {device} GPU ({1 - headroom:.0%} used): {parts}")


def main(argv: list[str] | None = None, configs: dict[str, Any] | None = None) -> dict:
    """Print the plan and write it as JSON; ``configs`` replaces the built-in shapes."""
    args = parse_args(argv)
    configs = configs or {name: llama_config(name) for name in args.models}
    rows, models = plan_rows(args, configs)
    largest = largest_fitting(rows, list(configs))
    print_table(rows, args)
    print_largest(largest, args.headroom)
    result = {
        "settings": {k: getattr(args, k) for k in ("seq_len", "micro_batch", "dtype",
                                                   "precision", "headroom")},
        "devices": DEVICES,
        "models": models,
        "rows": rows,
        "largest_fitting": largest,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
