"""Load a fit checkpoint's learnable state without unpickling arbitrary objects."""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_prune.errors import ConfigError
from lightning_prune.module import PruningModule, check_checkpoint


def load_learned_state(module: PruningModule, ckpt_path: str | Path) -> None:
    """Build the module's model and load a fit checkpoint into it (``weights_only`` loading)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path: '{path}' does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"ckpt_path: '{path}' is not a readable checkpoint ({err})") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"ckpt_path: '{path}' holds no state_dict")
    module.configure_model()
    check_checkpoint(checkpoint, module)
    module.load_state_dict(checkpoint["state_dict"], strict=False)
