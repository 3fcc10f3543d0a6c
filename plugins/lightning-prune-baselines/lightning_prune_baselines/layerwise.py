"""The sequential layer-by-layer loop shared by the data-driven one-shot methods."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_prune.calibration import LayerwiseCalibration, storage_weight, swapped_weights
from lightning_prune.masks.base import MaskFamily
from lightning_prune_baselines.ops import InputStats

#: (layer index, {target name: input statistics}) -> {target name: (mask, weight)} where the
#: weight (storage orientation) is what the layer computes with once pruned
PruneLayer = Callable[[int, dict[str, InputStats]], dict[str, tuple[torch.Tensor, torch.Tensor]]]


@contextmanager
def dense_forward(family: MaskFamily) -> Iterator[None]:
    """Run the model on its stored weights (mask mode ``off``), restoring the mode after."""
    modes = [p.mode for p in family.parametrizations().values()]
    family.set_mode("off")
    try:
        yield
    finally:
        family.set_mode(modes[0] if modes else "learn")


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
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Calibrate and prune the family's targets one decoder layer at a time.

    Layer ``l`` sees the outputs of layers ``< l`` as already pruned (the reference flow of
    SparseGPT, Wanda and FLAP): its targets' input statistics are collected, ``prune_layer``
    turns them into masks and weights, and the layer is re-run with those weights to give the
    next layer its inputs. The stored weights are restored afterwards.
    """
    targets = family.targets()
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with dense_forward(family):
        calibration = LayerwiseCalibration(
            model, batches, max_batches=max_batches, min_tokens=min_tokens, what=what
        )
        for index in tqdm(range(len(calibration.layers)), desc=f"{what}: layers", leave=False):
            modules = calibration.layer_targets(index, targets)
            if modules:
                stats = {name: InputStats(hessian) for name in modules}
                calibration.collect(index, modules, lambda name, x, s=stats: s[name].update(x))
                layer = prune_layer(index, stats)
                results.update(layer)
                pruned = {
                    modules[name]: weight * mask.to(weight.dtype)
                    for name, (mask, weight) in layer.items()
                }
            else:
                pruned = {}
            with swapped_weights(pruned):
                calibration.advance(index)
    return results


def stored_rows(family: MaskFamily, name: str) -> torch.Tensor:
    """Target ``name``'s stored weight W0 as ``[out, in]`` (detached)."""
    parametrization = family.parametrizations()[name]
    weight = storage_weight(family.targets()[name]).detach()
    return weight.t() if getattr(parametrization, "transposed", False) else weight
