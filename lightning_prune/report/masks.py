"""What the mask keeps, per layer and module, read from a fit checkpoint or an exported folder.

A run's checkpoint holds only the learnable state, so the run's ``config.yaml`` rebuilds the
``PruningModule`` and the checkpoint is loaded into it the way ``export`` loads it; the mask
family then says what it keeps. Exports are read from ``pruning.json`` (structured) or from
the exported weights (N:M).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import yaml

from lightning_prune.contracts import NMPattern, SurrogateWeights, UnitLayouts
from lightning_prune.ops.nm_prox import nm_group_counts
from lightning_prune.report.runs import ReportError, RunData


@dataclass
class NMSummary:
    """N:M groups by number of nonzeros, per layer and module.

    ``levels[layer, module, k]`` is the share of that module's groups holding ``k`` nonzero
    weights (``k = 0..m``); groups with at most ``n`` are already N:M.
    """

    n: int
    m: int
    layers: list[int]
    modules: list[str]
    levels: np.ndarray
    what: str

    def done(self) -> np.ndarray:
        """Share of groups already N:M, ``[layer, module]`` (NaN where a module is absent)."""
        return self.levels[..., : self.n + 1].sum(-1)


@dataclass
class StructuredSummary:
    """Kept units per layer: ``kept[kind]`` is a bool array ``[layers, units]``."""

    kept: dict[str, np.ndarray]
    what: str


MaskSummary = NMSummary | StructuredSummary


def split_name(name: str) -> tuple[int, str]:
    """``model.layers.3.self_attn.q_proj`` → ``(3, "q_proj")`` (layer ``-1`` if none)."""
    match = re.match(r"^.*?\.(\d+)\.(.+)$", name)
    if not match:
        return -1, name
    return int(match.group(1)), match.group(2).split(".")[-1]


def group_levels(rows: torch.Tensor, m: int) -> np.ndarray:
    """Share of groups of ``m`` consecutive inputs holding ``k`` nonzeros, ``k = 0..m``."""
    counts = nm_group_counts(rows.detach(), m).double()
    return (counts / counts.sum().clamp_min(1)).numpy()


def nm_summary(named_rows: dict[str, torch.Tensor], n: int, m: int, what: str) -> NMSummary:
    """Collect :func:`group_levels` of ``[out, in]`` weights by module name into a grid."""
    parsed = {name: split_name(name) for name in named_rows}
    layers = sorted({layer for layer, _ in parsed.values()})
    modules = list(dict.fromkeys(short for _, short in parsed.values()))
    levels = np.full((len(layers), len(modules), m + 1), np.nan)
    for name, rows in named_rows.items():
        layer, short = parsed[name]
        levels[layers.index(layer), modules.index(short)] = group_levels(rows, m)
    return NMSummary(n, m, layers, modules, levels, what)


def structured_summary(
    kept_units: dict[str, list[list[int]]], dense_shape: dict[str, int], what: str
) -> StructuredSummary:
    """Bool kept maps from kept unit indices per layer (``pruning.json``'s ``kept_units``)."""
    sizes = {"heads": dense_shape["num_heads"], "channels": dense_shape["intermediate_size"]}
    kept = {}
    for kind, size in sizes.items():
        per_layer = kept_units.get(kind) or []
        grid = np.zeros((len(per_layer), size), dtype=bool)
        for layer, units in enumerate(per_layer):
            grid[layer, units] = True
        kept[kind] = grid
    return StructuredSummary(kept, what)


def summarize(run: RunData) -> MaskSummary | None:
    """The mask summary of a run (from its checkpoint) or an export; ``None`` without one."""
    if run.kind == "export":
        return export_summary(run.path, next(iter(run.exports.values())))
    if run.checkpoint is None or not run.config_text:
        return None
    return family_summary(module_from_run(run.config_text, run.checkpoint), run.checkpoint.name)


def module_from_run(config_text: str, checkpoint: Path) -> Any:
    """Rebuild the run's ``PruningModule`` from its ``config.yaml`` and load ``checkpoint``."""
    from jsonargparse import ArgumentParser

    from lightning_prune.checkpoints import load_learned_state
    from lightning_prune.cli_names import install_short_names
    from lightning_prune.module import PruningModule

    install_short_names()
    config = yaml.safe_load(config_text) or {}
    if "model" not in config:
        raise ReportError(f"config.yaml beside '{checkpoint}': no 'model' section")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(PruningModule, "model", fail_untyped=False)
    module = parser.instantiate(parser.parse_object({"model": config["model"]})).model
    load_learned_state(module, checkpoint)
    return module


def family_summary(module: Any, label: str) -> MaskSummary | None:
    """Summarize the loaded module's mask family (N:M surrogate or structured final mask)."""
    family = module.mask_family
    if isinstance(family, UnitLayouts):
        layouts = family.layer_layouts()
        kept = {k: [layout[k].tolist() for layout in layouts] for k in ("heads", "channels")}
        dense = module.mask_family.describe()["dense_shape"]
        return structured_summary(kept, dense, f"final mask, {label}")
    if isinstance(family, NMPattern) and isinstance(family, SurrogateWeights):
        rows = {name: p.rows(p.surrogate.detach()) for name, p in family.surrogates().items()}
        return nm_summary(rows, family.n, family.m, f"learned weights before rounding, {label}")
    return None


def export_summary(folder: Path, record: dict[str, Any]) -> MaskSummary | None:
    """Summarize an exported folder from its ``pruning.json`` (and weights for N:M)."""
    if "kept_units" in record and "dense_shape" in record:
        return structured_summary(record["kept_units"], record["dense_shape"], "exported model")
    if "n" in record and "m" in record and record.get("sparsity"):
        from lightning_prune.adapters import adapter_for
        from lightning_prune.loader import load_pretrained

        model = load_pretrained(folder)  # hf (dense zeros) or compressed-nm
        adapter = adapter_for(model)
        rows = {}
        for name in record["sparsity"]:
            module = model.get_submodule(name)
            weight = cast(torch.Tensor, module.weight).detach()
            rows[name] = weight.t() if adapter.weight_is_transposed(module) else weight
        return nm_summary(rows, record["n"], record["m"], "exported weights")
    return None
