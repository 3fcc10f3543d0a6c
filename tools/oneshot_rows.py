"""Shared by the benchmarks: evaluate a one-shot initializer's mask on a module, then undo it."""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

import torch

from lightning_prune.masks.init import build_initializer
from lightning_prune.module import PruningModule


@contextmanager
def one_shot_mask(module: PruningModule, name: str, batches: Iterable[Any] | None):
    """Apply initializer ``name``'s masks (and updated weights, e.g. SparseGPT's) inside the
    block; yield the seconds it took; afterwards W0 is restored for the next method."""
    family = module.mask_family
    initializer = build_initializer(name)
    started = time.perf_counter()
    masks, weights = initializer.compute_with_weights(
        module.model, family, batches if initializer.needs_data else None
    )
    seconds = time.perf_counter() - started
    saved = {n: w.detach().clone() for n, w in family.originals().items()} if weights else {}
    if weights:
        family.apply_weights(weights)
    family.use_masks(masks)
    try:
        yield seconds
    finally:
        with torch.no_grad():
            for n, w in family.originals().items():
                if n in saved:
                    w.copy_(saved[n])
        family.updated_weights.clear()
