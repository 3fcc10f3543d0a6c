"""Regularizers: smooth penalties added to the loss, non-smooth ones applied by a prox."""

from lightning_prune.regularizers.base import Regularizer

__all__ = ["Regularizer"]
