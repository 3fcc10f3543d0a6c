"""Callbacks: exact resume state and numeric fault detection (every fit gets them), and the
optional least-squares weight refit after a fit."""

from lightning_prune.callbacks.numeric_guard import NumericalFaultError, NumericGuard
from lightning_prune.callbacks.resume_state import ResumeState
from lightning_prune.callbacks.weight_refit import WeightRefit

__all__ = ["NumericGuard", "NumericalFaultError", "ResumeState", "WeightRefit"]
