"""Uniform structured one-shot initializers: magnitude-structured, Wanda-sp and FLAP.

All three score the units of the ``uniform_structured`` family (attention heads / KV groups and
MLP channels) and keep, in every layer, the family's count (``kept_counts``): the result has
the same shape as a minimax mask and exports to the same smaller stock model. FLAP also
compensates the output biases where the model has them (GPT-2), and the export carries them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from lightning_prune.contracts import ScoredUnits
from lightning_prune.errors import ConfigError
from lightning_prune.masks.base import MaskFamily
from lightning_prune.masks.init import MaskInitializer, OneShotUpdate
from lightning_prune_baselines.layerwise import Pruned, as_rows, layer_by_layer, stored_rows
from lightning_prune_baselines.ops import InputStats, compensated_bias, unit_sums, wanda_scores

logger = logging.getLogger(__name__)


def structured_family(family: MaskFamily, method: str) -> MaskFamily:
    """``family`` when it is uniform structured; a clear error otherwise."""
    if not isinstance(family, ScoredUnits):
        raise ConfigError(
            f"init_mask '{method}' is a uniform structured method and needs the "
            f"uniform_structured mask family, got {type(family).__name__}; for N:M use "
            "magnitude, wanda or sparsegpt"
        )
    return family


class MagnitudeStructuredInit(MaskInitializer):
    """Keep the units with the largest weight norm (every weight removed with the unit)."""

    requires = (ScoredUnits,)

    def compute(self, model, family, batches=None) -> dict[str, torch.Tensor]:
        return structured_family(family, "magnitude_structured").magnitude_masks()


class _ActivationStructured(MaskInitializer):
    """Scores a unit from its output projection's weight columns and their input statistics."""

    needs_data = True
    requires = (ScoredUnits,)
    method = ""

    def __init__(self, max_batches: int | None = None, min_tokens: int = 64):
        if max_batches is not None and max_batches < 1:
            raise ConfigError(f"init_mask '{self.method}'.max_batches: expected >= 1")
        self.max_batches, self.min_tokens = max_batches, min_tokens

    def column_scores(self, rows: torch.Tensor, stats: InputStats) -> torch.Tensor:
        """One score per input column of an output projection (``rows``: ``[out, in]``)."""
        raise NotImplementedError

    def compensated_targets(self, model: nn.Module, family: MaskFamily) -> set[str]:
        """Targets whose output bias absorbs the pruned columns' mean contribution (none)."""
        return set()

    def compute_update(
        self,
        model: nn.Module,
        family: MaskFamily,
        batches: Iterable[dict[str, torch.Tensor]] | None = None,
    ) -> OneShotUpdate:
        family = structured_family(family, self.method)
        kind_of = {name: kind for kind in family.kinds() for name in family.gate_names(kind)}
        compensated = self.compensated_targets(model, family)
        targets = family.targets()

        def prune_layer(index: int, stats: dict[str, InputStats]) -> dict[str, Pruned]:
            scores: dict[str, dict[int, torch.Tensor]] = {}
            for name, stat in stats.items():
                kind = kind_of[name]
                units = family.gates(kind)[index].units
                columns = self.column_scores(stored_rows(family, name), stat)
                scores[kind] = {index: unit_sums(columns, units)}
            masks = family.masks_from_scores(scores)
            originals = family.originals()
            layer = {}
            for name, mask in masks.items():
                bias = None
                if name in compensated:
                    kept = as_rows(family, name, mask).any(0)  # per input column
                    rows, mean = stored_rows(family, name), stats[name].mean()
                    bias = compensated_bias(rows, targets[name].bias, mean, kept)
                layer[name] = Pruned(mask, originals[name].detach(), bias)
            return layer

        results = layer_by_layer(
            model,
            family,
            batches,
            prune_layer,
            max_batches=self.max_batches,
            min_tokens=self.min_tokens,
            what=f"init_mask '{self.method}'",
        )
        masks = {name: result.mask for name, result in results.items()}
        biases = {name: r.bias for name, r in results.items() if r.bias is not None}
        return OneShotUpdate(masks, biases=biases)

    def compute(self, model, family, batches=None) -> dict[str, torch.Tensor]:
        return self.compute_update(model, family, batches).masks


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
    """FLAP (An et al., 2024) with uniform counts: the fluctuation metric plus bias compensation.

    A unit's score is the sum over its input columns ``j`` of ``Var(X_j) * ||W_:,j||^2`` (how
    much the output moves when the column is replaced by its mean). Bias compensation: every
    pruned column ``j`` of an output projection (``o_proj``/``down_proj``; GPT-2: the attention
    and MLP ``c_proj``) adds ``W_:,j * mean(X_j)`` over the calibration tokens to that
    projection's output bias, so the pruned layer's expected output equals the dense one's.
    Layer ``l`` is calibrated on the outputs of the already pruned and compensated layers
    ``< l``; the kept units keep their W0 values.

    Compensation goes only where the exported stock config can hold it: projections that
    have a bias (GPT-2). Llama-family output projections have none. Their configs'
    ``attention_bias``/``mlp_bias`` would add a bias to every one of q/k/v/o (gate/up/down),
    most of them all-zero, and Mistral and Gemma 3 have no such fields at all; that is not
    supported, so FLAP on those models is the metric alone (a log line says so).

    The compensation is for FLAP's own mask: it is applied when the mask ships as computed
    (``solver: oneshot``, ``evaluate --baselines flap``); a learned solver warm-started from
    FLAP (``init_mask: flap``) learns its own mask and leaves the biases alone.

    Args:
        compensate_bias: ``null`` (auto): compensate every output projection that has a
            bias, skip (with a log line) those without; ``true``: require it (an error on
            models without such biases); ``false``: the metric only.
        max_batches: calibration batches used (default: all the data module gives).
        min_tokens: fewest calibration tokens accepted.
    """

    method = "flap"

    def __init__(
        self,
        compensate_bias: bool | None = None,
        max_batches: int | None = None,
        min_tokens: int = 64,
    ):
        super().__init__(max_batches, min_tokens)
        if compensate_bias is not None and not isinstance(compensate_bias, bool):
            raise ConfigError(
                "init_mask 'flap'.compensate_bias: expected true, false or null (auto), got "
                f"{compensate_bias!r}"
            )
        self.compensate_bias = compensate_bias

    def column_scores(self, rows, stats):
        return stats.variance().to(rows.device).float() * rows.float().pow(2).sum(0)

    def compensated_targets(self, model: nn.Module, family: MaskFamily) -> set[str]:
        if self.compensate_bias is False:
            return set()
        targets = family.targets()
        names = {name for name, module in targets.items() if module.bias is not None}
        missing = sorted(
            {family.out_projection(kind) for kind in family.kinds()
             if any(targets[n].bias is None for n in family.gate_names(kind))}
        )
        if missing:
            where = f"model_type '{model.config.model_type}' has no bias on {', '.join(missing)}"
            if self.compensate_bias:
                raise ConfigError(
                    f"init_mask 'flap'.compensate_bias: {where}, so the exported stock config "
                    "cannot hold FLAP's bias compensation; set compensate_bias: false, or null "
                    "to compensate only where a bias exists"
                )
            logger.warning(
                "init_mask 'flap': bias compensation skipped: %s, and the exported stock config "
                "cannot hold one (compensate_bias: false silences this)",
                where,
            )
        return names
