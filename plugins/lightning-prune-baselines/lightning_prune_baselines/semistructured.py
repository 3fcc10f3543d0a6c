"""N:M (and unstructured) one-shot initializers: Wanda and SparseGPT."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lightning_prune.contracts import NMPattern
from lightning_prune.errors import ConfigError
from lightning_prune.masks.base import MaskFamily
from lightning_prune.masks.init import MaskInitializer, OneShotUpdate
from lightning_prune_baselines.layerwise import Pruned, as_rows, layer_by_layer, stored_rows
from lightning_prune_baselines.ops import InputStats, keep_mask, sparsegpt, wanda_scores


def nm_pattern(family: MaskFamily, method: str, sparsity: float | None) -> tuple[int, int]:
    """The family's ``(n, m)``; a clear error for families without an N:M layout."""
    if not isinstance(family, NMPattern):
        raise ConfigError(
            f"init_mask '{method}' is an N:M/unstructured method and needs the nm mask family, "
            f"got {type(family).__name__}; for uniform structured pruning use "
            "magnitude_structured, wanda_sp or flap"
        )
    if sparsity is not None and not 0 <= sparsity < 1:
        raise ConfigError(f"init_mask '{method}'.sparsity: expected [0, 1), got {sparsity}")
    return family.n, family.m


class _LayerwiseNM(MaskInitializer):
    """Shared options of the calibration-driven N:M methods."""

    needs_data = True
    requires = (NMPattern,)
    method = ""
    hessian = False

    def __init__(self, sparsity: float | None, max_batches: int | None, min_tokens: int):
        if max_batches is not None and max_batches < 1:
            raise ConfigError(f"init_mask '{self.method}'.max_batches: expected >= 1")
        self.sparsity, self.max_batches, self.min_tokens = sparsity, max_batches, min_tokens

    def prune(
        self, name: str, rows: torch.Tensor, stats: InputStats, n: int, m: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kept mask, weight to ship)`` of one target, both ``[out, in]``."""
        raise NotImplementedError

    def compute_update(
        self,
        model: nn.Module,
        family: MaskFamily,
        batches: Iterable[dict[str, torch.Tensor]] | None = None,
    ) -> OneShotUpdate:
        n, m = nm_pattern(family, self.method, self.sparsity)

        def prune_layer(index: int, stats: dict[str, InputStats]) -> dict[str, Pruned]:
            layer = {}
            for name, stat in stats.items():
                mask, weight = self.prune(name, stored_rows(family, name), stat, n, m)
                layer[name] = Pruned(as_rows(family, name, mask), as_rows(family, name, weight))
            return layer

        results = layer_by_layer(
            model,
            family,
            batches,
            prune_layer,
            hessian=self.hessian,
            max_batches=self.max_batches,
            min_tokens=self.min_tokens,
            what=f"init_mask '{self.method}'",
        )
        masks = {name: result.mask for name, result in results.items()}
        return OneShotUpdate(masks, self.shipped_weights(results))

    def shipped_weights(self, results: dict[str, Pruned]) -> dict[str, torch.Tensor]:
        """Replaced W0 per target (none: the kept weights keep their W0 values)."""
        return {}

    def compute(self, model, family, batches=None) -> dict[str, torch.Tensor]:
        return self.compute_update(model, family, batches).masks


class WandaInit(_LayerwiseNM):
    """Wanda (Sun et al., 2024): keep the largest ``|W_ij| * ||X_j||_2`` per N:M group.

    ``X_j`` is input column ``j`` of the layer over every calibration token; inputs of layer
    ``l`` come from the already-pruned layers ``< l``. Kept weights keep their W0 values.

    Args:
        sparsity: unstructured instead of N:M: remove this share of every output row.
        max_batches: calibration batches used (default: all the data module gives).
        min_tokens: fewest calibration tokens accepted.
    """

    method = "wanda"

    def __init__(
        self, sparsity: float | None = None, max_batches: int | None = None, min_tokens: int = 64
    ):
        super().__init__(sparsity, max_batches, min_tokens)

    def prune(self, name, rows, stats, n, m):
        mask = keep_mask(wanda_scores(rows, stats.norms()), n, m, self.sparsity)
        return mask, rows


class SparseGPTInit(_LayerwiseNM):
    """SparseGPT (Frantar & Alistarh, 2023): OBS mask selection with the weight update.

    Per target: ``H = X^T X`` of its calibration inputs, damped by ``percdamp`` times the
    mean diagonal (raised tenfold, with a warning, while the Hessian is not positive definite),
    then column blocks of ``blocksize``: in every N:M group prune the ``m - n`` weights with the
    smallest ``w^2 / [H^-1]_jj^2`` and spread each pruned column's error over the later columns.

    Args:
        update_weights: ship SparseGPT's updated weights (``False``: the mask only, W0 values;
            recommended for warm starts of the learned solvers, which ship ``W0 * mask``).
        sparsity: unstructured instead of N:M: remove this share (chosen per column block).
        blocksize: columns per block (a multiple of ``m``).
        percdamp: damping as a share of the mean Hessian diagonal.
        max_percdamp: the most damping tried before giving up on a singular Hessian.
        max_batches: calibration batches used (default: all the data module gives).
        min_tokens: fewest calibration tokens accepted.
    """

    method = "sparsegpt"
    hessian = True

    def __init__(
        self,
        update_weights: bool = True,
        sparsity: float | None = None,
        blocksize: int = 128,
        percdamp: float = 0.01,
        max_percdamp: float = 10.0,
        max_batches: int | None = None,
        min_tokens: int = 64,
    ):
        super().__init__(sparsity, max_batches, min_tokens)
        if not percdamp >= 0 or not max_percdamp >= percdamp:
            raise ConfigError(
                f"init_mask 'sparsegpt': expected 0 <= percdamp <= max_percdamp, got "
                f"{percdamp} and {max_percdamp}"
            )
        if blocksize < 1:
            raise ConfigError(f"init_mask 'sparsegpt'.blocksize: expected >= 1, got {blocksize}")
        self.update_weights, self.blocksize = update_weights, blocksize
        self.percdamp, self.max_percdamp = percdamp, max_percdamp
        self.damping: dict[str, float] = {}  # percdamp each target needed

    def prune(self, name, rows, stats, n, m):
        mask, updated, used = sparsegpt(
            rows,
            stats.xtx,
            n,
            m,
            self.sparsity,
            self.blocksize,
            self.percdamp,
            self.max_percdamp,
            name,
        )
        self.damping[name] = used
        return mask, updated if self.update_weights else rows

    def shipped_weights(self, results: dict[str, Pruned]) -> dict[str, torch.Tensor]:
        if not self.update_weights:
            return {}
        return {name: r.weight * r.mask.to(r.weight.dtype) for name, r in results.items()}
