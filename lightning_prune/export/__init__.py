"""Exports of pruned models that ordinary tools load."""

from lightning_prune.export.hf import ExportError, export_hf

__all__ = ["ExportError", "export_hf"]
