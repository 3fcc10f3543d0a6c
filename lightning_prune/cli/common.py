"""What the ``fit``-like commands (mask learning in :mod:`.prune`, ``recover`` in
:mod:`.recover`) share: the trainer's default logger, the defaults every trainer gets, and
checks on the run folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from lightning_prune.callbacks import NumericGuard, ResumeState
from lightning_prune.checkpoint_io import SafeCheckpointIO
from lightning_prune.errors import ConfigError
from lightning_prune.launch_checks import check_trainer_config
from lightning_prune.loggers import ClaimedVersionCSVLogger


class BaseTrainer(Trainer):
    """Lightning's ``Trainer`` with a CSV logger by default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's ``Trainer``; the default logger is CSV (``trainer.logger`` picks others).

        Lightning's own default switches to TensorBoard whenever it is installed; the CSV
        files under ``default_root_dir/lightning_logs`` are what ``report`` reads. Its
        ``version_N`` folder is claimed atomically, so fits started at once in one
        ``default_root_dir`` never share (and overwrite) a log folder.
        """
        if kwargs.get("logger") in (None, True):
            root = kwargs.get("default_root_dir") or os.getcwd()
            kwargs["logger"] = ClaimedVersionCSVLogger(root)
        super().__init__(*args, **kwargs)


class BaseCLI(LightningCLI):
    """A ``LightningCLI`` whose trainer gets what every run needs unless configured otherwise."""

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured trainer plus what every run needs unless configured otherwise:
        RNG state in checkpoints, numeric fault checks and atomic checkpoint files."""
        config = self._get(self.config_init, "trainer", default={})
        check_trainer_config(config)  # strategy / devices / nodes, before any process starts
        callbacks = _as_list(config.get("callbacks"))
        callbacks += [
            default()
            for default in (ResumeState, NumericGuard)
            if not any(isinstance(callback, default) for callback in callbacks)
        ]
        plugins = _as_list(config.get("plugins"))
        if isinstance(config.get("strategy", "auto"), str) and not any(
            isinstance(plugin, CheckpointIO) for plugin in plugins
        ):
            plugins.append(SafeCheckpointIO())
        return super().instantiate_trainer(callbacks=callbacks, plugins=plugins, **kwargs)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def newest_last_checkpoint(root: str | Path) -> str | None:
    """The most recently written ``last.ckpt`` below ``root`` (earlier runs' log versions)."""
    found = sorted(Path(root).glob("**/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return str(found[-1]) if found else None


def check_writable(folder: str | Path, field: str) -> None:
    """Raise ``ConfigError`` naming ``field`` unless files can be created in ``folder``."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise ConfigError(f"{field}: cannot write to '{path}' ({reason})") from err
