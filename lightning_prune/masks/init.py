"""The interface of one-shot mask initializers (warm starts for the learned solvers)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch
from torch import nn

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
