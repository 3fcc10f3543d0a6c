"""Refit the kept weights of a fixed hard mask, layer by layer on calibration data.

:func:`compute_refit` runs the decoder layers one at a time (:class:`LayerwiseCalibration`):
for every target of layer ``l`` it accumulates the input Gram matrix on inputs produced by the
already pruned *and refit* layers ``< l``, solves the least-squares refit of
:mod:`lightning_prune.ops.refit` under the target's final hard mask, and re-runs layer ``l``
with the refit weights to feed layer ``l + 1``. Targets whose every row keeps the same inputs
(removed heads / MLP channels) take one shared solve; others (N:M) one solve per row. Targets
with an output bias (GPT-2) fit it as an intercept.

The result is a :class:`~lightning_prune.masks.init.OneShotUpdate` (the masks, the refit weights
and biases) that :meth:`OneShotUpdate.apply` puts in place of W0 and the biases, so checkpoints
save and exports ship them like SparseGPT's weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_prune.calibration import LayerwiseCalibration, storage_weight, swapped_weights
from lightning_prune.errors import ConfigError
from lightning_prune.masks.base import MaskFamily
from lightning_prune.masks.init import OneShotUpdate
from lightning_prune.ops.refit import centred_gram, mean_shift_bias, refit_columns, refit_rows


class GramStats:
    """``sum x x^T`` (float64), ``sum x`` and the token count of one Linear's inputs."""

    def __init__(self) -> None:
        self.gram: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor, gram: torch.Tensor) -> None:
        """Add a chunk ``x`` (``[tokens, in]``) whose ``x^T x`` is ``gram``."""
        if self.gram is None or self.total is None:  # both set on the first chunk
            self.gram = torch.zeros_like(gram, dtype=torch.float64)
            self.total = x.new_zeros(x.shape[1], dtype=torch.float64)
        self.gram += gram
        self.total += x.double().sum(0)
        self.count += x.shape[0]


class _SharedInputs:
    """Observer that accumulates one :class:`GramStats` per target, computing ``x^T x`` once
    for targets that read the same input tensor (q/k/v, gate/up)."""

    def __init__(self, names: Iterable[str]):
        self.stats = {name: GramStats() for name in names}
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, name: str, x: torch.Tensor) -> None:
        last = self._last
        if last is not None and last[0].data_ptr() == x.data_ptr() and last[0].shape == x.shape:
            gram = last[1]
        else:
            chunk = x.float()
            gram = (chunk.t() @ chunk).double()  # float32 product per chunk, float64 sums
        self._last = (x, gram)  # held, so its memory cannot be reused by another tensor
        self.stats[name].add(x, gram)


def _rows(family: MaskFamily, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Weight-shaped ``tensor`` of target ``name`` between storage orientation and
    ``[out, in]`` (GPT-2 ``Conv1D`` stores ``[in, out]``)."""
    return family.parametrizations()[name].rows(tensor)


def refit_target(
    rows: torch.Tensor,
    mask: torch.Tensor,
    stats: GramStats,
    damping: float,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Refit one target (``rows``, ``mask``: ``[out, in]``); with ``bias``, as an intercept.

    Returns ``(refit rows, refit bias or None)``.
    """
    gram, total = stats.gram, stats.total
    assert gram is not None and total is not None, "refit_target: no inputs were observed"
    if bias is not None:
        gram = centred_gram(gram, total, stats.count)
    if bool((mask == mask[:1]).all()):
        refit = refit_columns(rows, gram, mask[0], damping)
    else:
        refit = refit_rows(rows, gram, mask, damping)
    if bias is None:
        return refit, None
    return refit, mean_shift_bias(bias, total / stats.count, rows, refit)


def check_refittable(family: MaskFamily) -> None:
    """Refuse a family whose stored weights or biases are no longer the pretrained ones (the
    refit reproduces the pretrained layer's outputs, so it needs them)."""
    replaced = sorted(family.updated_weights | family.updated_biases)
    if replaced:
        raise ConfigError(
            f"refit: {len(replaced)} targets (e.g. '{replaced[0]}') already hold replaced "
            "weights or biases (init_mask sparsegpt's update, flap's compensation, or an earlier "
            "refit), and the refit needs the pretrained ones; use init_mask "
            "{class_path: sparsegpt, init_args: {update_weights: false}} or "
            "{class_path: flap, init_args: {compensate_bias: false}}, or start from a "
            "checkpoint without a refit"
        )


@torch.no_grad()
def compute_refit(
    model: nn.Module,
    family: MaskFamily,
    batches: Iterable[dict[str, torch.Tensor]] | None,
    damping: float = 0.01,
    fit_bias: bool = True,
    max_batches: int | None = None,
    min_tokens: int = 1,
    progress: bool = True,
) -> OneShotUpdate:
    """The least-squares refit of every target under the family's final hard masks.

    Args:
        model: the causal LM the family is attached to (stored weights = pretrained W0).
        family: a mask family with final hard masks (``harden`` is called here).
        batches: calibration batches (dicts with ``input_ids``).
        damping: ``λ = damping * mean(diag H)`` added to the Gram matrix's diagonal.
        fit_bias: refit the output bias of targets that have one, as an intercept.
        max_batches: use at most this many batches.
        min_tokens: fewest calibration tokens accepted.
        progress: show a progress bar over the layers.

    Returns:
        the masks, the refit weights (storage orientation, zero outside the masks) and, for
        targets with a bias when ``fit_bias``, the refit biases. The model is left as found.
    """
    if not damping >= 0:
        raise ConfigError(f"refit.damping: expected a number >= 0, got {damping}")
    check_refittable(family)
    family.harden()  # final masks, pattern verified
    masks = {name: p.hard_mask().clone() for name, p in family.parametrizations().items()}
    targets = family.targets()
    weights: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    with family.mode_while("off"):
        calibration = LayerwiseCalibration(
            model, batches, max_batches=max_batches, min_tokens=min_tokens, what="refit"
        )
        layers = range(len(calibration.layers))
        for index in tqdm(layers, desc="refit: layers", leave=False, disable=not progress):
            modules = calibration.layer_targets(index, targets)
            observer = _SharedInputs(modules)
            if modules:
                calibration.collect(index, modules, observer)
            swapped: dict[nn.Module, torch.Tensor] = {}
            swapped_biases: dict[nn.Module, torch.Tensor] = {}
            for name, module in modules.items():
                bias = cast("torch.Tensor | None", module.bias) if fit_bias else None
                rows = _rows(family, name, storage_weight(module).detach())
                mask = _rows(family, name, masks[name].to(rows.device))
                refit, new_bias = refit_target(rows, mask, observer.stats[name], damping, bias)
                weights[name] = swapped[module] = _rows(family, name, refit)
                if new_bias is not None:
                    biases[name] = swapped_biases[module] = new_bias
            with swapped_weights(swapped, swapped_biases):
                calibration.advance(index)
    return OneShotUpdate(masks, weights, biases)
