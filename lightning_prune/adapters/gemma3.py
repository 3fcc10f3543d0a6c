"""Gemma 3 text models (``Gemma3ForCausalLM``)."""

from lightning_prune.adapters.llama import LlamaAdapter


class Gemma3Adapter(LlamaAdapter):
    """Same projection names as Llama; explicit ``head_dim`` in the config."""

    model_types = ("gemma3_text",)
