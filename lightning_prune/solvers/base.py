"""The solver interface."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning_prune.errors import ConfigError

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule


class Solver:
    """Owns the optimizers, schedulers and the update rule of mask learning.

    ``PruningModule`` calls :meth:`configure_optimizers` from Lightning's hook of the same name
    and :meth:`after_optimizer_step` right after every optimizer step (e.g. to apply a prox).
    Every hook receives that ``PruningModule``; this interface sits below it, so it names only
    its Lightning base (the built-in solvers annotate ``PruningModule``).
    """

    #: the solver takes optimizer steps; ``False`` (``oneshot``): the fit ends before its first
    #: step (the host sets it up so; callbacks' ``on_fit_end`` still runs)
    #: what the mask family and the regularizers must provide (protocols of
    #: :mod:`lightning_prune.contracts`), checked when the run is assembled
    requires: tuple[type, ...] = ()
    trains: bool = True
    #: gradient-norm clipping applied before every step (``None``: off)
    grad_clip: float | None = None
    #: the shipped mask is ``init_mask``'s as computed (no training changes it), so a one-shot
    #: method's bias compensation for that mask stays valid
    ships_init_mask: bool = False
    #: the solver can learn decoder blocks one after another (``model.objective: blockwise``):
    #: its update touches only parameters that have gradients, through the module's views
    supports_blockwise: bool = False

    def configure_optimizers(self, module: LightningModule) -> Any:
        """Return what ``LightningModule.configure_optimizers`` returns."""
        raise NotImplementedError

    def loss_terms(self, module: LightningModule, batch: dict, outputs: Any) -> dict[str, Any]:
        """Extra loss terms of one training step (e.g. distillation), by log name."""
        return {}

    def after_optimizer_step(self, module: LightningModule) -> None:
        """Hook run after every optimizer step."""

    def metrics(self, module: LightningModule) -> dict[str, float]:
        """Extra values to log every step."""
        return {}


def check_grad_clip(solver: str, grad_clip: float | None) -> float | None:
    """``grad_clip`` if it is ``None`` or positive, else a ``ConfigError`` naming the field."""
    if grad_clip is not None and not grad_clip > 0:
        raise ConfigError(
            f"solver {solver}.grad_clip: expected a value > 0 or null (off), got {grad_clip}"
        )
    return grad_clip


def warmup_linear_decay(total: int, warmup: int) -> Callable[[int], float]:
    """Learning-rate factor for ``LambdaLR``: linear warm-up over ``warmup`` steps, then a
    linear decay to zero at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(total - warmup, 1))

    return factor
