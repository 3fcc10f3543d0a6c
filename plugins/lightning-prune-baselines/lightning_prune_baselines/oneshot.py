"""``oneshot``: a solver that takes zero training steps, so the ``init_mask`` is the result.

``lightning-prune fit`` with ``model.solver: oneshot`` and ``model.init_mask: wanda`` (or any
initializer) computes the one-shot mask in ``configure_model`` exactly as a warm start does,
skips training, and writes ``last.ckpt`` into the checkpoint folder, so ``export`` and
``evaluate`` take it like any fit checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch import Callback, Trainer

from lightning_prune.errors import ConfigError
from lightning_prune.solvers.base import Solver

if TYPE_CHECKING:
    from lightning_prune.module import PruningModule


class _SaveOneShot(Callback):
    """Writes the one-shot state as ``last.ckpt`` once ``fit`` returns (no step was taken)."""

    def __init__(self, path: Path):
        self.path = path

    def on_fit_end(self, trainer: Trainer, pl_module: Any) -> None:
        trainer.save_checkpoint(self.path)
        print(f"oneshot: wrote {self.path}")


class OneShotSolver(Solver):
    """Zero training steps: the mask is ``model.init_mask``'s (e.g. wanda, sparsegpt, flap).

    Needs ``model.init_mask``. Declares ``trains = False`` (the fit takes no step) and saves
    ``last.ckpt`` (in the ``ModelCheckpoint`` folder, else ``<default_root_dir>/oneshot``) when
    fit ends. Args are none: the initializer's options go in ``init_mask.init_args``.
    """

    trains = False
    ships_init_mask = True

    def configure_optimizers(self, module: PruningModule) -> Any:
        if module.init_mask is None:
            raise ConfigError(
                "solver oneshot: set model.init_mask to the one-shot method (e.g. wanda, "
                "sparsegpt, magnitude_structured, wanda_sp, flap)"
            )
        trainer = module.trainer
        callback = trainer.checkpoint_callback
        folder = callback.dirpath if callback and callback.dirpath else None
        if folder is None:
            folder = Path(trainer.default_root_dir) / "oneshot"
        trainer.callbacks.append(_SaveOneShot(Path(folder) / "last.ckpt"))
        return None
