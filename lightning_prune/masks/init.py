"""The interface of one-shot mask initializers (warm starts for the learned solvers)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_prune.errors import ConfigError
from lightning_prune.masks.base import MaskFamily


class MaskInitializer(ABC):
    """Computes a one-shot hard mask per target module (bool, weight storage orientation)."""

    #: whether :meth:`compute` needs calibration batches
    needs_data: bool = False

    @abstractmethod
    def compute(
        self,
        model: nn.Module,
        family: MaskFamily,
        batches: Iterable[dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Return ``{module name: bool mask}`` for the family's targets."""

    def compute_with_weights(
        self,
        model: nn.Module,
        family: MaskFamily,
        batches: Iterable[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """Masks plus the weights to ship with them (storage orientation), or ``None``.

        Methods that update the kept weights (SparseGPT) override this; the family applies the
        weights with :meth:`MaskFamily.apply_weights`. The default: :meth:`compute`, no weights.
        """
        return self.compute(model, family, batches), None


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
    cls = get_registry().get("initializers", name)
    try:
        return cls(**args)
    except TypeError as err:
        raise ConfigError(f"init_mask '{name}': {err}") from err
