"""The sequential layer-by-layer loop shared by the data-driven one-shot methods."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_prune.calibration import LayerwiseCalibration, storage_weight, swapped_weights
from lightning_prune.masks.base import MaskFamily
from lightning_prune_baselines.ops import InputStats


class Pruned(NamedTuple):
    """One target once pruned: what the layer computes with afterwards.

    Attributes:
        mask: bool hard mask (storage orientation).
        weight: stored weight to multiply by the mask (storage orientation).
        bias: replaced output bias (FLAP's compensation), ``None`` to keep the stored one.
    """

    mask: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None


#: (layer index, {target name: input statistics}) -> {target name: pruned target}
PruneLayer = Callable[[int, dict[str, InputStats]], dict[str, Pruned]]


def layer_by_layer(
    model: nn.Module,
    family: MaskFamily,
    batches: Iterable[dict[str, torch.Tensor]] | None,
    prune_layer: PruneLayer,
    *,
    hessian: bool = False,
    max_batches: int | None = None,
    min_tokens: int = 1,
    what: str = "calibration",
) -> dict[str, Pruned]:
    """Calibrate and prune the family's targets one decoder layer at a time.

    Layer ``l`` sees the outputs of layers ``< l`` as already pruned (the reference flow of
    SparseGPT, Wanda and FLAP): its targets' input statistics are collected, ``prune_layer``
    turns them into masks, weights and (optionally) biases, and the layer is re-run with those
    to give the next layer its inputs. The stored weights and biases are restored afterwards.
    """
    targets = family.targets()
    results: dict[str, Pruned] = {}
    with family.mode_while("off"):
        calibration = LayerwiseCalibration(
            model, batches, max_batches=max_batches, min_tokens=min_tokens, what=what
        )
        for index in tqdm(range(len(calibration.layers)), desc=f"{what}: layers", leave=False):
            modules = calibration.layer_targets(index, targets)
            pruned: dict[nn.Module, torch.Tensor] = {}
            biases: dict[nn.Module, torch.Tensor] = {}
            if modules:
                stats = {name: InputStats(hessian) for name in modules}
                calibration.collect(index, modules, lambda name, x, s=stats: s[name].update(x))
                layer = prune_layer(index, stats)
                results.update(layer)
                for name, result in layer.items():
                    pruned[modules[name]] = result.weight * result.mask.to(result.weight.dtype)
                    if result.bias is not None:
                        biases[modules[name]] = result.bias
            with swapped_weights(pruned, biases):
                calibration.advance(index)
    return results


def as_rows(family: MaskFamily, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Target ``name``'s weight-shaped ``tensor`` between storage orientation and ``[out, in]``
    (a transpose for GPT-2 ``Conv1D``; its own inverse)."""
    return family.parametrizations()[name].rows(tensor)


def stored_rows(family: MaskFamily, name: str) -> torch.Tensor:
    """Target ``name``'s stored weight W0 as ``[out, in]`` (detached)."""
    return as_rows(family, name, storage_weight(family.targets()[name]).detach())
