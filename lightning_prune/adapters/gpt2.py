"""GPT-2: fused ``c_attn`` and ``Conv1D`` layers whose weights are stored ``[in, out]``."""

from torch import nn

from lightning_prune.adapters.base import ModelAdapter


class GPT2Adapter(ModelAdapter):
    """Decoder layers at ``transformer.h``; Conv1D weights are transposed."""

    model_types = ("gpt2",)
    layers_path = "transformer.h"
    linear_names = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

    def weight_is_transposed(self, module: nn.Module) -> bool:
        from transformers.pytorch_utils import Conv1D

        return isinstance(module, Conv1D)  # also once parametrized (a dynamic subclass)
