"""tools/plan_memory.py: parameter counts of real models, FSDP2 sharding, the activation factor
against the tensors autograd really saves, and the JSON the tool writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tool_modules import load_tool
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


plan_memory = load_tool("plan_memory")
bench_memory = load_tool("bench_memory")

SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)


def tiny_config(layers: int = 2, vocab: int = 1000):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=512,
    )


def real_model(config, solver: str, dtype: torch.dtype = torch.float32):
    """A real CPU model of ``config`` with the solver's mask family attached, as a fit does."""
    from transformers import AutoModelForCausalLM

    from lightning_prune.adapters import adapter_for

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    family = plan_memory.build_family(solver)
    family.attach(model, adapter_for(model))
    return model, family


def test_smollm2_shape_and_count_are_the_embedded_models() -> None:
    """The built-in smollm2-135m shape is the embedded model's config, and the meta-device
    census counts exactly the weights its safetensors file holds."""
    from safetensors import safe_open

    from lightning_prune.models.loading import load_config, resolve_model_path

    try:
        embedded = load_config("smollm2-135m")
    except Exception as err:  # the embedded model is not prepared here
        pytest.skip(f"embedded model unavailable: {err}")
    ours = plan_memory.llama_config("smollm2-135m")
    assert {f: getattr(ours, f) for f in SHAPE_FIELDS} == {
        f: getattr(embedded, f) for f in SHAPE_FIELDS
    }
    weights = Path(resolve_model_path("smollm2-135m")) / "model.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        stored = sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    info = plan_memory.census(ours, "proximal", "float32", "true")
    pruned_per_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    assert info.count(False) == stored == 134_515_008
    assert info.pruned == info.count(True) == 30 * pruned_per_layer


@pytest.mark.parametrize("solver", ["proximal", "minimax"])
def test_counts_and_bytes_match_a_real_model(solver) -> None:
    """Frozen, learnable and optimizer bytes of the plan are what tools/bench_memory.py's
    ``measure`` reads off a real model after an AdamW step (float32 on CPU, one rank)."""
    config = tiny_config(layers=3)
    model, family = real_model(config, solver)
    learnable = [p for p in model.parameters() if p.requires_grad]
    learnable += list(family.parameters()) if isinstance(family, nn.Module) else []
    optimizer = torch.optim.AdamW(learnable)
    loss = model(input_ids=torch.randint(0, 1000, (1, 16))).logits.float().pow(2).mean()
    (loss + 0 * sum(p.sum() for p in learnable)).backward()  # every tensor gets a gradient
    optimizer.step()
    holder = nn.Module()
    holder.model = model
    holder.family = family if isinstance(family, nn.Module) else nn.Module()
    measured = bench_memory.measure(holder, optimizer)

    info = plan_memory.census(config, solver, "float32", "true")
    row = plan_memory.plan(config, solver, "single", 1, 16, 1, "float32", "true", info)
    assert info.count(False) == measured["model_params"]
    assert row["learnable"] == measured["learnable"]
    assert row["weights"] + row["learnable"] == measured["params"]
    scalars = sum(p.element_size() for p in learnable if p.dim() == 0)  # minimax's multipliers
    assert row["optimizer"] == measured["optimizer"] + 2 * scalars  # measure skips 0-dim state
    targets = family.targets().values()
    assert info.pruned == sum(m.parametrizations.weight.original.numel() for m in targets)


@pytest.mark.parametrize("world", [2, 8, 64])
def test_fsdp2_shards_are_the_whole_over_the_world(world) -> None:
    config = plan_memory.llama_config("llama-1b")
    for solver in ("proximal", "minimax"):
        info = plan_memory.census(config, solver)
        whole = plan_memory.plan(config, solver, "single", 1, 128, 1, info=info)
        shard = plan_memory.plan(config, solver, "fsdp2", world, 128, 1, info=info)
        assert shard["weights"] == pytest.approx(whole["weights"] / world, rel=1e-3)
        sharded_state = solver == "proximal"  # minimax gates stay whole on every rank
        for key in ("learnable", "optimizer", "gradients"):
            want = whole[key] / world if sharded_state else whole[key]
            assert shard[key] == pytest.approx(want, rel=1e-3)
        assert shard["activations"] == whole["activations"]  # every rank runs its micro-batch


def saved_bytes(config, solver: str, dtype: torch.dtype, autocast: bool, tokens: int) -> int:
    """Bytes of the distinct tensors autograd saves in one training forward (parameters not
    counted: they exist anyway)."""
    model, _ = real_model(config, solver, dtype)
    stored = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in stored:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, config.vocab_size, (2, tokens // 2))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(input_ids=ids, labels=ids)
    return sum(saved.values())


@pytest.mark.parametrize(
    "solver, dtype, precision",
    [
        ("proximal", "float32", "true"),
        ("proximal", "bfloat16", "bf16-mixed"),
        ("proximal", "float32", "bf16-mixed"),
        ("minimax", "bfloat16", "bf16-mixed"),
        ("minimax", "float32", "bf16-mixed"),
    ],
)
def test_layer_factor_is_what_autograd_saves(solver, dtype, precision) -> None:
    """One more decoder block saves ``tokens * layer_bytes_per_token`` plus its weight copies
    (the first block saves less: its input needs no gradient, so layers 2 -> 3 are compared)."""
    tokens = 200
    autocast = precision == "bf16-mixed"
    torch_dtype = getattr(torch, dtype)
    two = saved_bytes(tiny_config(2), solver, torch_dtype, autocast, tokens)
    three = saved_bytes(tiny_config(3), solver, torch_dtype, autocast, tokens)
    config = tiny_config(3)
    info = plan_memory.census(config, solver, dtype, precision)
    per_token = plan_memory.layer_bytes_per_token(config, dtype, precision, info.trainable)
    assert three - two == pytest.approx(tokens * per_token + info.layer_copies, rel=0.02)


def test_blockwise_is_proximal_only() -> None:
    with pytest.raises(ValueError, match="proximal"):
        plan_memory.plan(tiny_config(), "minimax", "blockwise", 1, 16, 1)


def test_main_writes_the_plan(tmp_path, capsys) -> None:
    out = tmp_path / "plan.json"
    args = ["--output", str(out), "--seq-len", "64"]
    plan_memory.main(args, configs={"tiny": tiny_config()})
    result = json.loads(out.read_text())
    setups = {(r["solver"], r["strategy"], r["world_size"]) for r in result["rows"]}
    assert setups == set(plan_memory.SETUPS)
    for row in result["rows"]:
        assert row["total"] > 0 and all(row["fits"].values())
    assert result["models"]["tiny"]["proximal"]["pruned_weights"] == 2 * (
        2 * 256 * 256 + 2 * 256 * 64 + 3 * 256 * 768
    )
    for device in plan_memory.DEVICES:
        assert set(result["largest_fitting"][device].values()) == {"tiny"}
    printed = capsys.readouterr().out
    assert "largest model that fits a 80GB GPU" in printed and "141GB" in printed
