"""Callbacks every fit gets: exact resume state and numeric fault detection."""

from lightning_prune.callbacks.numeric_guard import NumericalFaultError, NumericGuard
from lightning_prune.callbacks.resume_state import ResumeState

__all__ = ["NumericGuard", "NumericalFaultError", "ResumeState"]
