"""The interface of one-shot mask initializers (warm starts for the learned solvers)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from lightning_prune.errors import ConfigError
from lightning_prune.masks.base import MaskFamily


@dataclass
class OneShotUpdate:
    """What a one-shot method ships: hard masks plus the tensors it replaced.

    Attributes:
        masks: bool hard mask per target (storage orientation), ``True`` = kept.
        weights: replaced W0 per target (storage orientation; SparseGPT's updated weights),
            applied with :meth:`MaskFamily.apply_weights`.
        biases: replaced output bias per target (FLAP's bias compensation), applied with
            :meth:`MaskFamily.apply_biases`.
    """

    masks: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)

    def apply(self, family: MaskFamily) -> None:
        """Replace the family's stored weights and biases by this update's (masks untouched)."""
        family.apply_weights(self.weights)
        family.apply_biases(self.biases)


class MaskInitializer(ABC):
    """Computes a one-shot hard mask per target module (bool, weight storage orientation)."""

    #: whether :meth:`compute` needs calibration batches
    needs_data: bool = False
    #: what the mask family must provide (protocols of :mod:`lightning_prune.contracts`)
    requires: tuple[type, ...] = ()

    @abstractmethod
    def compute(
        self,
        model: nn.Module,
        family: MaskFamily,
        batches: Iterable[dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Return ``{module name: bool mask}`` for the family's targets."""

    def compute_update(
        self,
        model: nn.Module,
        family: MaskFamily,
        batches: Iterable[dict[str, torch.Tensor]] | None = None,
    ) -> OneShotUpdate:
        """Masks plus the weights and biases to ship with them.

        Methods that update kept weights (SparseGPT) or output biases (FLAP) override this.
        The default: :meth:`compute`, nothing replaced.
        """
        return OneShotUpdate(self.compute(model, family, batches))


@contextmanager
def one_shot_applied(family: MaskFamily, update: OneShotUpdate) -> Iterator[None]:
    """Forward with ``update`` (its masks as hard masks, its weights and biases) inside the
    block; the replaced weights and biases are restored afterwards (the masks stay in use)."""
    originals = family.originals()
    saved_weights = {n: originals[n].detach().clone() for n in update.weights}
    targets = family.targets()
    saved_biases = {n: cast(torch.Tensor, targets[n].bias).detach().clone() for n in update.biases}
    before = (set(family.updated_weights), set(family.updated_biases))
    update.apply(family)
    family.use_masks(update.masks)
    try:
        yield
    finally:
        family.apply_weights(saved_weights)
        family.apply_biases(saved_biases)
        family.updated_weights, family.updated_biases = before


def initializer_name(spec: str | dict[str, Any]) -> str:
    """The plugin name of an ``init_mask`` spec (a name or ``{class_path, init_args}``)."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict) and isinstance(spec.get("class_path"), str):
        return spec["class_path"]
    raise ConfigError(
        f"init_mask: expected a plugin name or {{class_path: NAME, init_args: {{...}}}}, "
        f"got {spec!r}"
    )


def build_initializer(spec: str | dict[str, Any]) -> MaskInitializer:
    """Instantiate the initializer plugin of an ``init_mask`` spec with its ``init_args``."""
    from lightning_prune.registry import get_registry

    name = initializer_name(spec)
    args = {} if isinstance(spec, str) else dict(spec.get("init_args") or {})
    cls: type[MaskInitializer] = get_registry().get("initializers", name)
    try:
        return cls(**args)
    except TypeError as err:
        raise ConfigError(f"init_mask '{name}': {err}") from err
