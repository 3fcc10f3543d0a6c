"""Magnitude one-shot masks: keep the largest |W0| in every N:M group."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lightning_prune.contracts import NMPattern
from lightning_prune.errors import ConfigError
from lightning_prune.masks.base import MaskFamily
from lightning_prune.masks.init import MaskInitializer
from lightning_prune.ops.nm_prox import nm_topn_mask


class MagnitudeInit(MaskInitializer):
    """Top-N |W0| per group of M (needs an N:M mask family)."""

    requires = (NMPattern,)

    def compute(
        self,
        model: nn.Module,
        family: MaskFamily,
        batches: Iterable[dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        if not isinstance(family, NMPattern):
            raise ConfigError(f"init_mask 'magnitude' needs an N:M mask family, got {family}")
        n, m = family.n, family.m
        masks = {}
        for name, parametrization in family.parametrizations().items():
            original = family.originals()[name]
            rows = parametrization.rows(original.detach())
            masks[name] = parametrization.rows(nm_topn_mask(rows, n, m))
        return masks
