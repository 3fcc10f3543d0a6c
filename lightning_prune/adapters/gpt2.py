"""GPT-2: fused ``c_attn`` and ``Conv1D`` layers whose weights are stored ``[in, out]``."""

from torch import nn

from lightning_prune.adapters.base import ModelAdapter, StructuredSpec


class GPT2Adapter(ModelAdapter):
    """Decoder layers at ``transformer.h``; Conv1D weights are transposed."""

    model_types = ("gpt2",)
    layers_path = "transformer.h"
    linear_names = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

    def weight_is_transposed(self, module: nn.Module) -> bool:
        from transformers.pytorch_utils import Conv1D

        return isinstance(module, Conv1D)  # also once parametrized (a dynamic subclass)

    def structured_spec(self) -> StructuredSpec:
        return StructuredSpec(
            mlp_in=("mlp.c_fc",),
            mlp_out="mlp.c_proj",
            heads_note="GPT-2's config derives head_dim from n_embd / n_head, so a stock config "
            "cannot hold fewer heads of the same size",
        )

    def intermediate_size(self, config) -> int:
        return config.n_inner or 4 * config.n_embd

    def structured_config(self, config, num_heads: int, num_kv_heads: int, intermediate: int):
        if num_heads != config.n_head:
            raise ValueError("GPT-2 configs cannot hold fewer attention heads")
        values = config.to_dict()
        values["n_inner"] = intermediate
        return type(config).from_dict(values)
