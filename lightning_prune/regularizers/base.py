"""The regularizer interface."""

from __future__ import annotations

import torch

from lightning_prune.contracts import require
from lightning_prune.masks.base import MaskFamily


class Regularizer:
    """A term of the pruning objective.

    A smooth term returns a differentiable value from :meth:`penalty` that is added to the loss.
    A non-smooth term (``has_prox = True``) is handled by a proximal solver through
    :meth:`prox_`, and :meth:`penalty` only reports its value (no gradient).

    What the term reads from the mask family is declared in :attr:`requires` (protocols of
    :mod:`lightning_prune.contracts`), checked when the run is assembled and by :meth:`bind`.
    """

    has_prox: bool = False
    #: what the mask family must provide (protocols of :mod:`lightning_prune.contracts`)
    requires: tuple[type, ...] = ()

    def bind(self, family: MaskFamily) -> None:
        """Check that ``family`` provides what this regularizer :attr:`requires`; raise
        ``ConfigError`` (a ``ValueError``) naming both if not. Override to check more."""
        require("regularizer", self, family)

    def penalty(self, family: MaskFamily) -> torch.Tensor:
        """The term's weighted value (differentiable for smooth terms)."""
        raise NotImplementedError

    def prox_(self, family: MaskFamily, lr: float) -> None:
        """Apply the proximal operator in place (non-smooth terms only)."""
        raise NotImplementedError(f"{type(self).__name__} has no prox operator")

    def metrics(self, family: MaskFamily) -> dict[str, float]:
        """Extra values to log (e.g. the share of groups already sparse)."""
        return {}
