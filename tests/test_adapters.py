"""Architecture adapters on tiny random models of every supported family."""

from __future__ import annotations

import pytest
import torch

from lightning_prune.adapters import adapter_for
from lightning_prune.masks.nm import NMMaskFamily
from lightning_prune.models import load_causal_lm
from lightning_prune.ops.nm_prox import is_nm
from lightning_prune.registry import PluginError

EXPECTED_TARGETS = {
    "llama": 14,
    "mistral": 14,
    "qwen2": 14,
    "qwen3": 14,
    "gemma3_text": 14,
    "gpt2": 8,
}


@pytest.mark.parametrize("arch", sorted(EXPECTED_TARGETS))
def test_nm_mask_attaches_and_hardens(arch, tiny_models) -> None:
    model = load_causal_lm(tiny_models[arch])
    adapter = adapter_for(model)
    tokens = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        dense = model(input_ids=tokens).logits
    family = NMMaskFamily(2, 4)
    family.attach(model, adapter)
    assert len(family.targets()) == EXPECTED_TARGETS[arch]
    with torch.no_grad():  # learning mode starts from W0: same function
        assert torch.allclose(model(input_ids=tokens).logits, dense, atol=1e-5)
    family.harden()
    for name, module in family.targets().items():
        weight = module.weight
        rows = weight.t() if adapter.weight_is_transposed(module) else weight
        assert is_nm(rows, 2, 4), name
        assert (weight == 0).float().mean().item() == pytest.approx(0.5)
    family.set_mode("off")
    with torch.no_grad():
        assert torch.allclose(model(input_ids=tokens).logits, dense, atol=1e-5)


def test_gpt2_groups_run_along_the_input_dimension(tiny_models) -> None:
    model = load_causal_lm(tiny_models["gpt2"])
    family = NMMaskFamily(2, 4, include=["*.attn.c_attn"])
    family.attach(model, adapter_for(model))
    family.harden()
    weight = model.transformer.h[0].attn.c_attn.weight  # Conv1D: [in, out]
    assert is_nm(weight.t(), 2, 4)
    assert not is_nm(weight, 2, 4)


def test_include_exclude_patterns(tiny_models) -> None:
    model = load_causal_lm(tiny_models["llama"])
    adapter = adapter_for(model)
    mlp = adapter.target_linears(model, include=["*.mlp.*"], exclude=["*.down_proj"])
    assert sorted(n.rsplit(".", 1)[-1] for n in mlp) == [
        "gate_proj",
        "gate_proj",
        "up_proj",
        "up_proj",
    ]


def test_head_layout_reads_gqa(tiny_models) -> None:
    model = load_causal_lm(tiny_models["qwen3"])
    layout = adapter_for(model).head_layout(model.config)
    assert (layout.num_heads, layout.num_kv_heads, layout.head_dim) == (4, 2, 16)
    assert layout.group_size == 2


def test_architecture_without_adapter_names_it(tmp_path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "opt",
        hidden_size=32,
        num_hidden_layers=1,
        ffn_dim=64,
        num_attention_heads=2,
        vocab_size=100,
        word_embed_proj_dim=32,
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(PluginError, match="no architecture adapter for model_type 'opt'"):
        adapter_for(model)
