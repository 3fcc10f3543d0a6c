"""Checkpoint files written atomically and read without unpickling arbitrary objects."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_prune.errors import LightningPruneError


class CheckpointWriteError(LightningPruneError, OSError):
    """A checkpoint could not be written (disk full, no permission, read-only filesystem)."""


class SafeCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a hidden sibling, ``fsync``, then rename over the target.

    A kill or a full disk never leaves a truncated checkpoint under the real name, and the
    previous checkpoint stays untouched. Loading always uses ``weights_only=True``.
    Remote paths (``s3://`` and the like) go through Lightning's own writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        except OSError as err:
            partial.unlink(missing_ok=True)
            reason = os.strerror(err.errno) if err.errno else str(err)
            raise CheckpointWriteError(
                f"checkpoint '{path}' could not be written ({reason}); earlier checkpoints "
                "are unchanged"
            ) from err
        return None

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        location = {} if map_location is None else {"map_location": map_location}
        return super().load_checkpoint(path, weights_only=True, **location)
