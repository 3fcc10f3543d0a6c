"""ProxSparse's N:M regularizer ``λ·Σ_groups e_{N+1}(|w_g|)`` and its exact prox."""

from __future__ import annotations

import re
from typing import Literal, cast

import torch

from lightning_prune.contracts import NMPattern, Surrogate, SurrogateWeights, surrogates
from lightning_prune.errors import ConfigError
from lightning_prune.masks.base import MaskFamily
from lightning_prune.ops.nm_prox import nm_group_counts, nm_prox, nm_regularizer
from lightning_prune.regularizers.base import Regularizer


def sum_over_shards(value: torch.Tensor, family: MaskFamily) -> torch.Tensor:
    """Sum a per-rank partial value over ranks when the surrogates are sharded (the family's
    ``shard_view``, set by the sharding backend, knows; the value itself otherwise)."""
    weights = [p.surrogate for p in surrogates(family).values()]
    if not weights:
        return value
    return family.shard_view.sum_over_ranks(value, weights[0])


class NMSparsityRegularizer(Regularizer):
    """The N:M sparsity regularizer, zero exactly when every group holds at most N nonzeros.

    Args:
        lam: strength λ1.
        lam_mode: ``absolute`` uses λ as given (the reference behaviour, weight-scale
            dependent). ``scale_free`` divides λ by ``rms(W0)^(N-1)`` per layer, which makes
            the prox invariant to each layer's weight scale, so one λ serves many models.
        prox_step: ``lambda`` applies ``prox_{λR}`` after every step (the reference);
            ``lr_lambda`` applies ``prox_{lr·λR}`` (textbook proximal gradient).
    """

    has_prox = True
    requires = (NMPattern, SurrogateWeights)

    def __init__(
        self,
        lam: float = 0.01,
        lam_mode: Literal["absolute", "scale_free"] = "scale_free",
        prox_step: Literal["lambda", "lr_lambda"] = "lambda",
    ):
        if not lam >= 0:
            raise ConfigError(f"regularizer nm_sparsity.lam: expected a value >= 0, got {lam}")
        self.lam, self.lam_mode, self.prox_step = float(lam), lam_mode, prox_step

    def layer_lambda(self, parametrization: Surrogate, n: int, lr: float = 1.0) -> float:
        """Effective λ of one layer (keeping ``n`` per group) for one prox call."""
        lam = self.lam * (lr if self.prox_step == "lr_lambda" else 1.0)
        if self.lam_mode == "scale_free":
            lam /= max(parametrization.w0_rms, 1e-12) ** (n - 1)
        return lam

    @torch.no_grad()
    def prox_(self, family: MaskFamily, lr: float) -> None:
        n, m = _pattern(family)
        for name, parametrization in surrogates(family).items():
            rows = parametrization.local_rows()  # whole groups on every rank's shard
            lam = self.layer_lambda(parametrization, n, lr)
            rows.copy_(nm_prox(rows, lam, n, m, name=name))  # a refused shape names the layer

    @torch.no_grad()
    def penalty(self, family: MaskFamily) -> torch.Tensor:
        n, m = _pattern(family)
        total = torch.zeros((), dtype=torch.float32)
        for parametrization in surrogates(family).values():
            value = nm_regularizer(parametrization.local_rows(), n, m)
            total = total + self.layer_lambda(parametrization, n) * value.float().cpu()
        return sum_over_shards(total, family)

    @torch.no_grad()
    def metrics(self, family: MaskFamily) -> dict[str, float]:
        """Share of groups already N:M, overall and per decoder layer (``_l{index}``), and the
        share of all groups holding ``k`` nonzeros (``nm_groups_nnz{k}``)."""
        n, m = _pattern(family)
        done: dict[str, int] = {}
        sizes: dict[str, int] = {}
        levels = None
        for name, parametrization in surrogates(family).items():
            rows = parametrization.local_rows()  # this rank's shard when sharded
            counts = sum_over_shards(nm_group_counts(rows, m), family)
            levels = counts if levels is None else levels + counts
            for key in ("nm_groups_done", _layer_key(name)):
                done[key] = done.get(key, 0) + int(counts[: n + 1].sum())
                sizes[key] = sizes.get(key, 0) + int(counts.sum())
        values = {key: value / max(sizes[key], 1) for key, value in done.items()}
        if levels is not None:
            shares = levels.double() / max(int(levels.sum()), 1)
            values.update({f"nm_groups_nnz{k}": float(v) for k, v in enumerate(shares)})
        return values


def _pattern(family: MaskFamily) -> tuple[int, int]:
    """``(n, m)`` of the family (an :class:`NMPattern`, checked when the run was assembled)."""
    pattern = cast(NMPattern, family)
    return pattern.n, pattern.m


def _layer_key(module_name: str) -> str:
    """``nm_groups_done_l{i}`` for a module of decoder layer ``i`` (first number in the name)."""
    match = re.search(r"\.(\d+)\.", module_name)
    return f"nm_groups_done_l{match.group(1)}" if match else "nm_groups_done_other"
