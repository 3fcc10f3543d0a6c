"""Load a fit checkpoint's learnable state without unpickling arbitrary objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_prune.errors import ConfigError, MissingPathError
from lightning_prune.module import PruningModule, check_checkpoint


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a distributed (sharded) checkpoint folder (FSDP2, one file a rank)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def read_checkpoint_header(path: str | Path) -> dict[str, Any]:
    """Everything but the tensors' data of a fit checkpoint (file or sharded folder): the
    fingerprint and the layout it was saved with. Memory-maps a file, reads nothing large."""
    path = Path(path)
    target = path / "meta.pt" if is_sharded_checkpoint(path) else path
    try:
        return torch.load(target, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ConfigError(f"ckpt_path: '{path}' is not a readable checkpoint ({err})") from err


def check_resume_layout(path: str | Path, fsdp2: bool, world_size: int) -> None:
    """Refuse, before any loading, a checkpoint that this strategy cannot reshard.

    Sharded (distributed) checkpoints reshard to any world size under FSDP2, and full files
    saved under FSDP2 load at any world size under FSDP2. A full file of a replicated run
    (single device, DDP) keys its optimizer state for unsharded parameters, and a sharded or
    FSDP2 checkpoint does not fit an unsharded strategy.
    """
    header = read_checkpoint_header(path)
    if not is_sharded_checkpoint(path) and "optimizer_states" not in header:
        raise ConfigError(
            f"ckpt_path: '{path}' holds no optimizer state (a consolidated checkpoint); export "
            "and evaluate read it, resume from the sharded folder it came from"
        )
    layout = header.get("lightning_prune_layout", {"fsdp2": False, "world_size": 1})
    saved = "FSDP2" if layout.get("fsdp2") else "an unsharded strategy (single device or DDP)"
    where = f"saved by {saved} on {layout.get('world_size')} rank(s)"
    if fsdp2 and not layout.get("fsdp2"):
        raise ConfigError(
            f"ckpt_path: '{path}' was {where}; its optimizer state cannot be resharded onto "
            f"FSDP2 with {world_size} rank(s). Resume it with strategy: ddp or on one device "
            "(export and evaluate read it under any strategy)"
        )
    if not fsdp2 and (layout.get("fsdp2") or is_sharded_checkpoint(path)):
        raise ConfigError(
            f"ckpt_path: '{path}' was {where}; resume it with ModelParallelStrategy "
            "(configs/fsdp2.yaml, any world size, devices: 1 included). Export and evaluate "
            "read it anywhere"
        )


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


def consolidate_checkpoint(module: PruningModule, sharded: str | Path, output: str | Path) -> Path:
    """Write a sharded checkpoint folder as one full checkpoint file (learned state, metadata;
    the optimizer state stays in the folder, so the file serves export/evaluate)."""
    checkpoint = read_sharded_checkpoint(module, sharded)
    check_checkpoint(checkpoint, module)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    torch.save(checkpoint, partial)
    partial.replace(output)
    return output


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
        raise MissingPathError(f"ckpt_path: '{path}' does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"ckpt_path: '{path}' is not a readable checkpoint ({err})") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"ckpt_path: '{path}' holds no state_dict")
    module.configure_model()
    check_checkpoint(checkpoint, module)
    module.load_state_dict(checkpoint["state_dict"], strict=False)
