"""N:M semi-structured masks with a learnable surrogate weight (ProxSparse)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from lightning_prune.contracts import Surrogate
from lightning_prune.errors import ConfigError
from lightning_prune.masks.base import STATE_DTYPE, GroupedTensor, MaskFamily, MaskParametrization
from lightning_prune.ops.nm_prox import is_nm, nm_topn_mask


class NMSurrogate(MaskParametrization):
    """Parametrization of ``weight``: a learnable surrogate W while learning, ``W0 ⊙ mask`` after.

    The pretrained weight stays in ``parametrizations.weight.original`` (frozen). Groups are M
    consecutive input weights of one output row; ``transposed`` marks ``[in, out]`` storage.
    The surrogate is a ``float32`` copy of W0 whatever W0's dtype; the forward casts it to W0's.
    """

    def __init__(self, weight: torch.Tensor, n: int, m: int, transposed: bool):
        super().__init__()
        self.n, self.m, self.transposed = n, m, transposed
        self.surrogate = nn.Parameter(weight.detach().to(STATE_DTYPE, copy=True))
        self.w0_rms = 0.0 if weight.is_meta else weight.detach().float().pow(2).mean().sqrt().item()

    @torch.no_grad()
    def reset_from(self, original: torch.Tensor) -> None:
        """Surrogate := W0 (this rank's part) and the RMS of the whole W0 (over all ranks)."""
        view = self.shard_view
        view.local(self.surrogate.data).copy_(view.local(original.data))
        squares = view.local(original.data).double().pow(2).sum()
        squares = view.sum_over_ranks(squares, original)
        self.w0_rms = float((squares / original.numel()).sqrt())

    def local_rows(self) -> torch.Tensor:
        """This rank's part of the surrogate as ``[out, in]`` (whole groups: the sharding
        backend keeps them whole, see :meth:`NMMaskFamily.grouped_tensors`; the full surrogate
        when not sharded). In-place changes update the parameter."""
        return self.rows(self.shard_view.local(self.surrogate.data))

    def compute_hard_mask(self) -> torch.Tensor:
        """Top-N magnitudes per group of the learned surrogate, in storage orientation.

        On a surrogate sharded by rows (outside the layer's forward) this is the mask of this
        rank's part; inside the forward the surrogate is gathered and the mask is whole (the
        base class caches it only when the surrogate is whole, ``is_whole``). A flat slice is
        not whole groups: the backend gathers it first (``whole_group_views``).
        """
        return self.rows(nm_topn_mask(self.local_rows(), self.n, self.m))

    def learned_weight(self, original: torch.Tensor) -> torch.Tensor:
        return self.surrogate.to(original.dtype)


class NMMaskFamily(MaskFamily):
    """N:M semi-structured sparsity: every group of ``m`` consecutive inputs keeps ``n``.

    Provides :class:`~lightning_prune.contracts.NMPattern` (``n``, ``m``) and
    :class:`~lightning_prune.contracts.SurrogateWeights` (:meth:`surrogates`).

    Args:
        n: kept weights per group.
        m: group size (``in_features`` of every target must be divisible by it).
        include: fnmatch patterns of module names to target (default: every decoder Linear).
        exclude: fnmatch patterns of module names to leave dense.
    """

    def __init__(
        self,
        n: int = 2,
        m: int = 4,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
    ):
        if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
            raise ConfigError(f"mask_family.n and mask_family.m: expected 0 < n < m, got {n}:{m}")
        super().__init__(include, exclude)
        self.n, self.m = n, m

    def make_parametrization(self, name: str, module: nn.Module, transposed: bool) -> NMSurrogate:
        weight = cast(torch.Tensor, module.weight)
        in_features = weight.shape[0] if transposed else weight.shape[1]
        if in_features % self.m:
            raise ConfigError(
                f"layer '{name}': in_features {in_features} is not divisible by m={self.m}; "
                "exclude it with mask_family.exclude"
            )
        return NMSurrogate(weight, self.n, self.m, transposed)

    def surrogates(self) -> dict[str, Surrogate]:
        """Every target's :class:`NMSurrogate`, by module name (typed as the
        :class:`~lightning_prune.contracts.Surrogate` protocol, so mypy checks that they
        provide it)."""
        return {name: cast(NMSurrogate, p) for name, p in self.parametrizations().items()}

    def grouped_tensors(self) -> list[GroupedTensor]:
        """The surrogate and W0 of every target: N:M groups of ``m`` along the input dim (dim 1
        of ``[out, in]`` storage, dim 0 of transposed ``[in, out]``), which a shard must keep
        whole (every rank then computes its own part of the masks and the prox)."""
        originals = self.originals()
        return [
            GroupedTensor(
                name, t, 0 if p.transposed else 1, self.m, "input features", "an N:M group"
            )
            for name, p in self.surrogates().items()
            for t in (p.surrogate, originals[name])
        ]

    def verify(self) -> None:
        for name, parametrization in self.parametrizations().items():
            mask = parametrization.rows(parametrization.hard_mask())
            if not is_nm(mask.float(), self.n, self.m):
                raise ConfigError(f"layer '{name}': mask breaks the {self.n}:{self.m} pattern")

    def exported_checker(self) -> Callable[[nn.Module], None]:
        layout = {n: p.transposed for n, p in self.parametrizations().items()}
        n, m = self.n, self.m

        def check(model: nn.Module) -> None:
            for name, transposed in layout.items():
                weight = cast(torch.Tensor, model.get_submodule(name).weight).detach()
                rows = weight.t() if transposed else weight
                if not is_nm(rows, n, m):
                    raise ConfigError(f"exported weight '{name}' breaks the {n}:{m} pattern")

        return check

    def describe(self) -> dict[str, Any]:
        return {"pattern": f"{self.n}:{self.m}", "n": self.n, "m": self.m, "group_dim": "input"}

    def reset_state(self) -> None:
        originals = self.originals()
        for name, parametrization in self.parametrizations().items():
            cast(NMSurrogate, parametrization).reset_from(originals[name])  # made here

    def apply_initial_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Warm start: zero the surrogate outside the given masks (storage orientation).

        Kept weights that are exactly zero in W0 get the smallest positive value, so the top-N
        rounding of an untouched warm start reproduces the given mask.
        """
        for name, parametrization in self.surrogates().items():
            if name in masks:
                surrogate = parametrization.surrogate
                keep = masks[name].to(surrogate.device, torch.bool)
                with torch.no_grad():
                    surrogate.mul_(keep.to(surrogate.dtype))
                    tiny = torch.finfo(surrogate.dtype).tiny
                    surrogate.masked_fill_(keep & (surrogate == 0), tiny)
