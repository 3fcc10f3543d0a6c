"""The solver interface."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from lightning_prune.errors import ConfigError

if TYPE_CHECKING:
    from lightning.pytorch import Trainer
    from torch import nn

    from lightning_prune.masks.base import MaskFamily
    from lightning_prune.regularizers.base import Regularizer


class SolverHost(Protocol):
    """What a solver reads of the ``LightningModule`` it serves (``PruningModule``, which
    imports this module, so the hooks name this protocol instead of the class)."""

    @property
    def mask_family(self) -> MaskFamily: ...

    @property
    def regularizers(self) -> list[Regularizer]: ...

    @property
    def model(self) -> nn.Module | None:
        """The LM (``None`` until ``configure_model`` has run)."""

    @property
    def trainer(self) -> Trainer: ...

    @property
    def global_step(self) -> int: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def schedule_spans(self) -> Callable[[int], tuple[int, int]]: ...

    def whole_group_views(self, writeback: bool = True) -> Iterator[MaskFamily]: ...


class Solver:
    """Owns the optimizers, schedulers and the update rule of mask learning.

    ``PruningModule`` calls :meth:`configure_optimizers` from Lightning's hook of the same name
    and :meth:`after_optimizer_step` right after every optimizer step (e.g. to apply a prox).
    Every hook receives that ``PruningModule``; this interface sits below it, so the hooks are
    typed with :class:`SolverHost`, the members of it that solvers read.
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

    def configure_optimizers(self, module: SolverHost) -> Any:
        """Return what ``LightningModule.configure_optimizers`` returns."""
        raise NotImplementedError

    def loss_terms(self, module: SolverHost, batch: dict, outputs: Any) -> dict[str, Any]:
        """Extra loss terms of one training step (e.g. distillation), by log name."""
        return {}

    def after_optimizer_step(self, module: SolverHost) -> None:
        """Hook run after every optimizer step."""

    def metrics(self, module: SolverHost) -> dict[str, float]:
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
