"""Load a fit checkpoint's learnable state without unpickling arbitrary objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_prune.errors import ConfigError, MissingPathError
from lightning_prune.module import PruningModule, check_checkpoint

#: how each kind of run is named in errors, and what resumes its checkpoints
SAVED_BY = {
    "fsdp1": "FSDPStrategy (FSDP1)",
    "fsdp2": "FSDP2",
    "unsharded": "an unsharded strategy (single device or DDP)",
}
RESUME_WITH = {
    "fsdp1": "FSDPStrategy (configs/fsdp.yaml, GPUs, any world size)",
    "fsdp2": "ModelParallelStrategy (configs/fsdp2.yaml, any world size, devices: 1 included)",
    "unsharded": "strategy: ddp or on one device",
}
#: the key prefix of the model state in a sharded folder, by the strategy that wrote it
SHARDED_PREFIX = {"fsdp1": "model.", "fsdp2": "state_dict."}


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a distributed (sharded) checkpoint folder (FSDP2 or FSDP1, one file
    a rank)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def saved_sharding(header: dict[str, Any]) -> str:
    """``fsdp1``, ``fsdp2`` or ``unsharded``: the layout a checkpoint was saved with."""
    layout = header.get("lightning_prune_layout", {})
    if layout.get("fsdp1"):
        return "fsdp1"
    return "fsdp2" if layout.get("fsdp2") else "unsharded"


def current_sharding(fsdp2: bool, fsdp1: bool) -> str:
    """``fsdp1``, ``fsdp2`` or ``unsharded``: the layout of the running strategy."""
    return "fsdp1" if fsdp1 else "fsdp2" if fsdp2 else "unsharded"


def read_checkpoint_header(path: str | Path) -> dict[str, Any]:
    """Everything but the tensors' data of a fit checkpoint (file or sharded folder): the
    fingerprint and the layout it was saved with. Memory-maps a file, reads nothing large."""
    path = Path(path)
    target = path / "meta.pt" if is_sharded_checkpoint(path) else path
    try:
        return torch.load(target, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ConfigError(f"ckpt_path: '{path}' is not a readable checkpoint ({err})") from err


def check_resume_layout(
    path: str | Path, fsdp2: bool, world_size: int, fsdp1: bool = False
) -> None:
    """Refuse, before any loading, a checkpoint that this strategy cannot reshard.

    A checkpoint resumes under the kind of strategy that saved it, at any world size: FSDP2
    (sharded folder or full file), FSDP1 (``FSDPStrategy``, sharded folder or full file), or an
    unsharded one (single device, DDP). Each keys its optimizer state for its own layout of
    the parameters (DTensor shards, FSDP1's flat parameters, whole tensors).
    """
    header = read_checkpoint_header(path)
    if not is_sharded_checkpoint(path) and "optimizer_states" not in header:
        raise ConfigError(
            f"ckpt_path: '{path}' holds no optimizer state (a consolidated checkpoint); export "
            "and evaluate read it, resume from the sharded folder it came from"
        )
    saved, current = saved_sharding(header), current_sharding(fsdp2, fsdp1)
    if saved == "unsharded" and is_sharded_checkpoint(path):
        saved = "fsdp2"  # a folder without a layout record
    if saved != current:
        ranks = header.get("lightning_prune_layout", {}).get("world_size", 1)
        raise ConfigError(
            f"ckpt_path: '{path}' was saved by {SAVED_BY[saved]} on {ranks} rank(s); resume "
            f"it with {RESUME_WITH[saved]}: its optimizer state cannot be resharded onto "
            f"{SAVED_BY[current]} with {world_size} rank(s). Export and evaluate read it "
            "under any strategy"
        )


def check_sharded_strategy(path: str | Path, fsdp2: bool, fsdp1: bool) -> None:
    """Refuse to validate a sharded folder under a strategy that cannot read it: FSDP2
    folders need ``ModelParallelStrategy``, FSDP1 folders ``FSDPStrategy``."""
    saved = saved_sharding(read_checkpoint_header(path))
    saved = "fsdp1" if saved == "fsdp1" else "fsdp2"
    if saved != current_sharding(fsdp2, fsdp1):
        use = {
            "fsdp1": "FSDPStrategy (configs/fsdp.yaml, GPUs)",
            "fsdp2": "ModelParallelStrategy (configs/fsdp2.yaml, devices: 1 works)",
        }[saved]
        raise ConfigError(
            f"ckpt_path: '{path}' is a sharded checkpoint; validate it with {use} or export it"
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
    prefix = SHARDED_PREFIX["fsdp1" if saved_sharding(checkpoint) == "fsdp1" else "fsdp2"]
    saved = {k.removeprefix(prefix) for k in stored if k.startswith(prefix)}
    state = {k: v.detach().clone() for k, v in module.state_dict().items() if k in saved}
    dcp.load({prefix[:-1]: state}, checkpoint_id=str(path))
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
