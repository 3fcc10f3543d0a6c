"""The regularizer interface."""

from __future__ import annotations

import torch

from lightning_prune.masks.base import MaskFamily


class Regularizer:
    """A term of the pruning objective.

    A smooth term returns a differentiable value from :meth:`penalty` that is added to the loss.
    A non-smooth term (``has_prox = True``) is handled by a proximal solver through
    :meth:`prox_`, and :meth:`penalty` only reports its value (no gradient).
    """

    has_prox: bool = False

    def bind(self, family: MaskFamily) -> None:
        """Check that this regularizer works with ``family``; raise ``ValueError`` if not."""

    def penalty(self, family: MaskFamily) -> torch.Tensor:
        """The term's weighted value (differentiable for smooth terms)."""
        raise NotImplementedError

    def prox_(self, family: MaskFamily, lr: float) -> None:
        """Apply the proximal operator in place (non-smooth terms only)."""
        raise NotImplementedError(f"{type(self).__name__} has no prox operator")

    def metrics(self, family: MaskFamily) -> dict[str, float]:
        """Extra values to log (e.g. the share of groups already sparse)."""
        return {}
