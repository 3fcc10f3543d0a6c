"""Mask families: what may be removed, as parametrizations on target weights."""

from lightning_prune.masks.base import MaskFamily

__all__ = ["MaskFamily"]
