"""Llama family: Llama, Mistral, Qwen2, Qwen3 (same module layout)."""

from lightning_prune.adapters.base import ModelAdapter, StructuredSpec


class LlamaAdapter(ModelAdapter):
    """Decoder layers at ``model.layers``; q/k/v/o and gate/up/down projections."""

    model_types: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")
    layers_path = "model.layers"
    linear_names: tuple[str, ...] = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )

    def structured_spec(self) -> StructuredSpec:
        return StructuredSpec(
            mlp_in=("mlp.gate_proj", "mlp.up_proj"),
            mlp_out="mlp.down_proj",
            query=("self_attn.q_proj",),
            kv=("self_attn.k_proj", "self_attn.v_proj"),
            attn_out="self_attn.o_proj",
        )

    def structured_config(self, config, num_heads: int, num_kv_heads: int, intermediate: int):
        values = config.to_dict()
        values.update(
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=self.head_layout(config).head_dim,  # explicit: no longer hidden // heads
            intermediate_size=intermediate,
        )
        try:
            return type(config).from_dict(values)
        except Exception as err:  # strict configs validate in __post_init__
            raise ValueError(str(err).strip().splitlines()[-1].strip()) from err
