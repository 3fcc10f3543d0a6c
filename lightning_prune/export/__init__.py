"""Exports of pruned models that ordinary tools load."""

from lightning_prune.export.common import ExportError
from lightning_prune.export.hf import export_hf
from lightning_prune.export.structured import export_structured_hf

__all__ = ["ExportError", "export_hf", "export_structured_hf"]
