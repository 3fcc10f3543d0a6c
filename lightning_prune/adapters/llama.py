"""Llama family: Llama, Mistral, Qwen2, Qwen3 (same module layout)."""

from lightning_prune.adapters.base import ModelAdapter


class LlamaAdapter(ModelAdapter):
    """Decoder layers at ``model.layers``; q/k/v/o and gate/up/down projections."""

    model_types = ("llama", "mistral", "qwen2", "qwen3")
    layers_path = "model.layers"
    linear_names = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
