"""Uniform structured one-shot initializers: magnitude-structured, Wanda-sp and FLAP.

All three score the units of the ``uniform_structured`` family (attention heads / KV groups and
MLP channels) and keep, in every layer, the family's count (``kept_counts``): the result has
the same shape as a minimax mask and exports to the same smaller stock model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lightning_prune.errors import ConfigError
from lightning_prune.masks.base import MaskFamily
from lightning_prune.masks.init import MaskInitializer
from lightning_prune_baselines.layerwise import layer_by_layer, stored_rows
from lightning_prune_baselines.ops import InputStats, unit_sums, wanda_scores


def structured_family(family: MaskFamily, method: str) -> MaskFamily:
    """``family`` when it is uniform structured; a clear error otherwise."""
    if not hasattr(family, "masks_from_scores"):
        raise ConfigError(
            f"init_mask '{method}' is a uniform structured method and needs the "
            f"uniform_structured mask family, got {type(family).__name__}; for N:M use "
            "magnitude, wanda or sparsegpt"
        )
    return family


class MagnitudeStructuredInit(MaskInitializer):
    """Keep the units with the largest weight norm (every weight removed with the unit)."""

    def compute(self, model, family, batches=None) -> dict[str, torch.Tensor]:
        return structured_family(family, "magnitude_structured").magnitude_masks()


class _ActivationStructured(MaskInitializer):
    """Scores a unit from its output projection's weight columns and their input statistics."""

    needs_data = True
    method = ""

    def __init__(self, max_batches: int | None = None, min_tokens: int = 64):
        if max_batches is not None and max_batches < 1:
            raise ConfigError(f"init_mask '{self.method}'.max_batches: expected >= 1")
        self.max_batches, self.min_tokens = max_batches, min_tokens

    def column_scores(self, rows: torch.Tensor, stats: InputStats) -> torch.Tensor:
        """One score per input column of an output projection (``rows``: ``[out, in]``)."""
        raise NotImplementedError

    def compute(
        self,
        model: nn.Module,
        family: MaskFamily,
        batches: Iterable[dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        family = structured_family(family, self.method)
        kind_of = {name: kind for kind in family.kinds() for name in family.gate_names(kind)}

        def prune_layer(index: int, stats: dict[str, InputStats]):
            scores: dict[str, dict[int, torch.Tensor]] = {}
            for name, stat in stats.items():
                kind = kind_of[name]
                units = family.gates(kind)[index].units
                columns = self.column_scores(stored_rows(family, name), stat)
                scores[kind] = {index: unit_sums(columns, units)}
            masks = family.masks_from_scores(scores)
            originals = family.originals()
            return {name: (mask, originals[name].detach()) for name, mask in masks.items()}

        results = layer_by_layer(
            model,
            family,
            batches,
            prune_layer,
            max_batches=self.max_batches,
            min_tokens=self.min_tokens,
            what=f"init_mask '{self.method}'",
        )
        return {name: mask for name, (mask, _) in results.items()}


class WandaSPInit(_ActivationStructured):
    """Wanda-sp (structured Wanda, as in the FLAP paper's baseline): a unit's score is the sum
    of ``|W_ij| * ||X_j||_2`` over its output projection's columns (o_proj / down_proj).

    Args:
        max_batches: calibration batches used (default: all the data module gives).
        min_tokens: fewest calibration tokens accepted.
    """

    method = "wanda_sp"

    def column_scores(self, rows, stats):
        return wanda_scores(rows, stats.norms()).sum(0)


class FLAPInit(_ActivationStructured):
    """FLAP-style fluctuation metric (An et al., 2024), uniform counts: a unit's score is the
    sum over its input columns ``j`` of ``Var(X_j) * ||W_:,j||^2`` (how much the output moves
    when the column is replaced by its mean).

    FLAP's bias compensation (adding ``W_:,pruned @ mean(X_pruned)`` to the output bias) is not
    applied: Llama-family ``o_proj``/``down_proj`` have no bias, so the exported stock config
    cannot hold it. The kept units keep their W0 values.

    Args:
        max_batches: calibration batches used (default: all the data module gives).
        min_tokens: fewest calibration tokens accepted.
    """

    method = "flap"

    def column_scores(self, rows, stats):
        return stats.variance().to(rows.device).float() * rows.float().pow(2).sum(0)
