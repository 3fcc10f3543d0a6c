"""Load a fit checkpoint's learnable state without unpickling arbitrary objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_prune.errors import ConfigError
from lightning_prune.module import PruningModule, check_checkpoint


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a distributed (sharded) checkpoint folder (FSDP2, one file a rank)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def read_sharded_checkpoint(module: PruningModule, path: str | Path) -> dict[str, Any]:
    """Consolidate a sharded checkpoint into one process: the learned state as whole tensors,
    plus the metadata (``meta.pt``). Works without a process group, at any world size."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    meta = path / "meta.pt"
    if not meta.is_file():
        raise ConfigError(f"ckpt_path: sharded checkpoint '{path}' has no meta.pt")
    try:
        checkpoint = torch.load(meta, map_location="cpu", weights_only=True)
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as err:
        raise ConfigError(f"ckpt_path: '{path}' is not a readable checkpoint ({err})") from err
    module.configure_model()
    saved = {k.removeprefix("state_dict.") for k in stored if k.startswith("state_dict.")}
    state = {k: v.detach().clone() for k, v in module.state_dict().items() if k in saved}
    dcp.load({"state_dict": state}, checkpoint_id=str(path))
    checkpoint["state_dict"] = state
    return checkpoint


def load_learned_state(module: PruningModule, ckpt_path: str | Path) -> None:
    """Build the module's model and load a fit checkpoint into it (``weights_only`` loading).

    ``ckpt_path`` is a single-file checkpoint or a sharded (distributed) checkpoint folder.
    """
    path = Path(ckpt_path)
    if is_sharded_checkpoint(path):
        checkpoint = read_sharded_checkpoint(module, path)
        check_checkpoint(checkpoint, module)
        module.load_state_dict(checkpoint["state_dict"], strict=False)
        return
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
