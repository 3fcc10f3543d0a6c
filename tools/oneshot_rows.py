"""Shared by the benchmarks: evaluate a one-shot initializer's mask on a module, then undo it."""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

from lightning_prune.masks.init import build_initializer, one_shot_applied
from lightning_prune.module import PruningModule


@contextmanager
def one_shot_mask(module: PruningModule, name: str, batches: Iterable[Any] | None):
    """Apply initializer ``name``'s masks (and updated weights and biases, e.g. SparseGPT's
    and FLAP's) inside the block; yield the seconds it took; afterwards the run's own weights
    and biases are restored for the next method."""
    initializer = build_initializer(name)
    started = time.perf_counter()
    update = initializer.compute_update(
        module.model, module.mask_family, batches if initializer.needs_data else None
    )
    seconds = time.perf_counter() - started
    with one_shot_applied(module.mask_family, update):
        yield seconds
