"""Architecture adapters: where decoder layers, heads and prunable Linears live."""

from lightning_prune.adapters.base import HeadLayout, ModelAdapter, StructuredSpec, adapter_for

__all__ = ["HeadLayout", "ModelAdapter", "StructuredSpec", "adapter_for"]
