"""Solvers: own the optimizers and the update rule of mask learning."""

from lightning_prune.solvers.base import Solver

__all__ = ["Solver"]
