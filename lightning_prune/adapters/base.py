"""The adapter interface and its lookup through the ``lightning_prune.adapters`` plugin group."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, cast

from torch import nn

from lightning_prune.registry import PluginError, get_registry


@dataclass(frozen=True)
class HeadLayout:
    """Attention head layout of one model (GQA: query heads share ``num_kv_heads`` KV heads)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class StructuredSpec:
    """Where the structured units of one decoder layer live (module names inside the layer).

    ``query`` modules output one ``head_dim`` block per query head, ``kv`` modules one per KV
    head, and ``attn_out`` takes one input block per query head. ``mlp_in`` modules output one
    value per MLP channel and ``mlp_out`` takes one input per channel. ``query``/``kv``/
    ``attn_out`` are ``None`` when the stock config cannot express fewer heads
    (``heads_note`` says why).
    """

    mlp_in: tuple[str, ...]
    mlp_out: str
    query: tuple[str, ...] | None = None
    kv: tuple[str, ...] | None = None
    attn_out: str | None = None
    heads_note: str = ""

    @property
    def prunes_heads(self) -> bool:
        """Whether attention heads can be removed in a stock config."""
        return self.attn_out is not None


class ModelAdapter:
    """Knows one architecture family: decoder layers, prunable Linears and head layout.

    Subclasses set ``model_types`` (values of ``config.model_type``), ``layers_path`` (dotted
    path of the decoder ``ModuleList``) and ``linear_names`` (module names inside one decoder
    layer, in the default target order).
    """

    model_types: tuple[str, ...] = ()
    layers_path: str = ""
    linear_names: tuple[str, ...] = ()

    @classmethod
    def supports(cls, config) -> bool:
        """Whether this adapter handles a model with this HF config."""
        return getattr(config, "model_type", None) in cls.model_types

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks, in order."""
        return cast(nn.ModuleList, model.get_submodule(self.layers_path))

    def weight_is_transposed(self, module: nn.Module) -> bool:
        """True when ``module.weight`` is stored as ``[in, out]`` (GPT-2 ``Conv1D``)."""
        return False

    def target_linears(
        self,
        model: nn.Module,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
    ) -> dict[str, nn.Module]:
        """Prunable Linears by qualified name, narrowed by fnmatch ``include``/``exclude``."""
        found: dict[str, nn.Module] = {}
        for index, layer in enumerate(self.decoder_layers(model)):
            for local in self.linear_names:
                name = f"{self.layers_path}.{index}.{local}"
                if include and not any(fnmatch.fnmatch(name, p) for p in include):
                    continue
                if exclude and any(fnmatch.fnmatch(name, p) for p in exclude):
                    continue
                found[name] = layer.get_submodule(local)
        return found

    def head_layout(self, config) -> HeadLayout:
        """Number of query heads, KV heads and head dimension."""
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return HeadLayout(heads, kv, head_dim)

    # -- uniform structured pruning (optional: ``None`` means unsupported) ---------------------
    def structured_spec(self) -> StructuredSpec | None:
        """Where heads and MLP channels live; ``None``: no structured pruning for this family."""
        return None

    def intermediate_size(self, config) -> int:
        """MLP channels per layer."""
        return config.intermediate_size

    def structured_config(self, config, num_heads: int, num_kv_heads: int, intermediate: int):
        """A copy of ``config`` with fewer heads / channels in every layer.

        Raises ``ValueError`` when the model family's config rejects the layout.
        """
        raise NotImplementedError(f"{type(self).__name__} has no structured config writer")


def adapter_for(model: nn.Module) -> ModelAdapter:
    """Find the registered adapter for ``model``; the error says how to add one."""
    registry = get_registry()
    config: Any = model.config  # an HF PretrainedConfig
    for name in registry.names("adapters"):
        try:
            adapter_cls: type[ModelAdapter] = registry.get("adapters", name)
        except PluginError:
            continue
        if adapter_cls.supports(config):
            return adapter_cls()
    raise PluginError(
        f"no architecture adapter for model_type '{config.model_type}' "
        f"({type(model).__name__}); known adapters: {registry.names('adapters')}. Add one by "
        "subclassing lightning_prune.adapters.ModelAdapter and registering it under the "
        "'lightning_prune.adapters' entry-point group of your package"
    )
