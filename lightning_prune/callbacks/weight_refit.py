"""``WeightRefit``: after a fit, refit the kept weights of the final mask and save them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, cast

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import (
    DDPStrategy,
    SingleDeviceStrategy,
)

from lightning_prune.backends import backend_class
from lightning_prune.errors import ConfigError
from lightning_prune.masks.init import OneShotUpdate
from lightning_prune.refit import compute_refit

if TYPE_CHECKING:
    from torch import nn

    from lightning_prune.masks.base import MaskFamily


class WeightRefit(Callback):
    """When ``fit`` ends, replace W0 by the least-squares refit of the kept weights under the
    final hard mask (any mask source: a learned solver, or ``oneshot`` with any ``init_mask``),
    then write ``refit.ckpt``. ``export`` and ``evaluate`` read it like any fit checkpoint, so
    the export ships the refit weights (N:M pattern exact, reloaded logits checked as usual).

    Layer by layer, on every calibration window (the data module's ``calibration_dataloader``,
    the same on every rank), each target's input Gram matrix is collected on the outputs of
    the already pruned and refit layers, and every output row's kept weights are solved to
    reproduce the pretrained row's output (:mod:`lightning_prune.ops.refit`). Targets with an
    output bias (GPT-2) refit it as an intercept. ``last.ckpt`` keeps the mask on the
    pretrained weights when the solver saved it during training (``proximal``, ``minimax``);
    ``oneshot`` writes its ``last.ckpt`` after this callback, so there both hold the refit.

    One device or DDP (every rank computes the refit from the same data, then takes rank 0's,
    so all ranks hold bit-equal weights); FSDP and DeepSpeed are refused before the fit starts,
    as the refit needs every layer's whole weights on each rank.

    Args:
        damping: ``λ = damping * mean(diag H)`` on the Gram matrix's diagonal (> 0 pulls the
            kept weights towards their pretrained values).
        fit_bias: refit the output bias of targets that have one.
        max_batches: calibration batches used (default: all).
        min_tokens: fewest calibration tokens accepted.
        filename: checkpoint file name.
        dirpath: folder of the checkpoint (default: the ``ModelCheckpoint`` folder, else
            ``<default_root_dir>/refit``).
    """

    def __init__(
        self,
        damping: float = 0.01,
        fit_bias: bool = True,
        max_batches: int | None = None,
        min_tokens: int = 64,
        filename: str = "refit.ckpt",
        dirpath: str | None = None,
    ):
        if not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
            raise ConfigError(
                f"WeightRefit.damping: expected a finite number >= 0, got {damping!r}"
            )
        if not isinstance(fit_bias, bool):
            raise ConfigError(f"WeightRefit.fit_bias: expected true or false, got {fit_bias!r}")
        if max_batches is not None and not (isinstance(max_batches, int) and max_batches >= 1):
            raise ConfigError(
                f"WeightRefit.max_batches: expected an integer >= 1, got {max_batches!r}"
            )
        if not (isinstance(min_tokens, int) and min_tokens >= 1):
            raise ConfigError(
                f"WeightRefit.min_tokens: expected an integer >= 1, got {min_tokens!r}"
            )
        if not isinstance(filename, str) or not filename or Path(filename).name != filename:
            raise ConfigError(f"WeightRefit.filename: expected a file name, got {filename!r}")
        self.damping, self.fit_bias = float(damping), fit_bias
        self.max_batches, self.min_tokens = max_batches, min_tokens
        self.filename, self.dirpath = filename, dirpath
        self.path: Path | None = None  # where the last refit checkpoint was written

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(trainer.strategy).__name__
        if backend_class(trainer.strategy).shards_model or "DeepSpeed" in name:
            raise ConfigError(
                f"WeightRefit: not supported under {name}: it shards every layer's weights "
                "and the refit needs them whole on each rank; run the fit under DDP "
                "(configs/ddp.yaml) or on one device, or remove the WeightRefit callback"
            )
        if isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            return
        raise ConfigError(
            f"WeightRefit: strategy {name} is not supported; run the fit on one device or "
            "under DDP (configs/ddp.yaml)"
        )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)  # set by Lightning, not declared
        if datamodule is None:
            raise ConfigError("WeightRefit: needs calibration data (a datamodule)")
        loader = getattr(datamodule, "calibration_dataloader", datamodule.train_dataloader)
        # a PruningModule's (torch types a module's attributes as ``Tensor | Module``)
        family = cast("MaskFamily", pl_module.mask_family)
        model = cast("nn.Module", pl_module.model)
        modes = [p.mode for p in family.parametrizations().values()]
        update = compute_refit(
            model,
            family,
            loader(),
            self.damping,
            fit_bias=self.fit_bias,
            max_batches=self.max_batches,
            min_tokens=self.min_tokens,
            progress=trainer.progress_bar_callback is not None,
        )
        if trainer.world_size > 1:  # the same data gives the same refit; make it bit-equal
            update = _from_rank_zero(update)
        update.apply(family)
        family.set_mode(modes[0] if modes else "learn")
        self.path = self._folder(trainer) / self.filename
        trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:
            print(f"refit: wrote {self.path} (damping {self.damping:g})")

    def _folder(self, trainer: Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)  # ModelCheckpoint's
        if dirpath:
            return Path(dirpath)
        return Path(trainer.default_root_dir) / "refit"


def _from_rank_zero(update: OneShotUpdate) -> OneShotUpdate:
    """``update`` with every tensor replaced by rank 0's (a collective: every rank calls it)."""
    import torch.distributed as dist

    weights = {name: tensor.contiguous() for name, tensor in update.weights.items()}
    biases = {name: tensor.contiguous() for name, tensor in update.biases.items()}
    for name in sorted(weights):
        dist.broadcast(weights[name], src=0)
    for name in sorted(biases):
        dist.broadcast(biases[name], src=0)
    return OneShotUpdate(update.masks, weights, biases)
