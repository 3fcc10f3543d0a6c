"""Read fit checkpoints (files and sharded folders) through one guarded path.

Nothing from a checkpoint is ever unpickled: files are read with ``torch.load(weights_only=
True)``; a sharded folder is verified by :func:`lightning_prune.dcp_guard.verify_sharded_folder`
before torch's distributed checkpoint reader sees it. :func:`read_checkpoint` then checks the
model's identity (shapes, config, weights digest), the mask family and that every learned
tensor is finite (``check_checkpoint`` of the module, on the rules of
:mod:`lightning_prune.checkpoint_format`), before export, evaluate or report use the state.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from lightning_prune.checkpoint_format import LAYOUT_KEY, check_finite_state
from lightning_prune.dcp_guard import META_NAME, verify_sharded_folder
from lightning_prune.errors import ConfigError, MissingPathError

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


class CheckpointTarget(Protocol):
    """What reading a checkpoint into a module needs of it (``PruningModule`` provides it)."""

    def configure_model(self) -> None: ...

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any: ...


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is read as a distributed (sharded) checkpoint folder (FSDP2 or FSDP1,
    one file a rank): any folder is, and is verified before anything of it is read."""
    return Path(path).is_dir()


def saved_sharding(header: dict[str, Any]) -> str:
    """``fsdp1``, ``fsdp2`` or ``unsharded``: the layout a checkpoint was saved with."""
    layout = header.get(LAYOUT_KEY, {})
    if layout.get("fsdp1"):
        return "fsdp1"
    return "fsdp2" if layout.get("fsdp2") else "unsharded"


def current_sharding(fsdp2: bool, fsdp1: bool) -> str:
    """``fsdp1``, ``fsdp2`` or ``unsharded``: the layout of the running strategy."""
    return "fsdp1" if fsdp1 else "fsdp2" if fsdp2 else "unsharded"


def unreadable(path: str | Path, err: BaseException) -> ConfigError:
    """The error for a checkpoint file that ``torch.load(..., weights_only=True)`` refused."""
    if isinstance(err, pickle.UnpicklingError):
        return ConfigError(
            f"ckpt_path: '{path}' is not a readable checkpoint: it holds objects other than "
            "tensors and plain values, and checkpoints are never unpickled"
        )
    text = str(err).strip()
    first_line = text.splitlines()[0] if text else type(err).__name__
    return ConfigError(
        f"ckpt_path: '{path}' is not a readable checkpoint (truncated or not a torch file: "
        f"{first_line})"
    )


def _load_file(path: Path, mmap: bool = False) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a checkpoint file, refusing anything but a dict."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        raise unreadable(path, err) from err
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"ckpt_path: '{path}' is not a lightning-prune checkpoint")
    return checkpoint


def _verify_folder(path: Path) -> Any:
    """Verify a sharded checkpoint folder (see :mod:`lightning_prune.dcp_guard`); return its
    DCP ``Metadata``. An empty folder is named as such."""
    if not any(path.iterdir()):
        raise ConfigError(
            f"ckpt_path: '{path}' is an empty folder, not a checkpoint (expected a checkpoint "
            f"file, or a sharded checkpoint folder holding {META_NAME}, .metadata and .distcp "
            "files)"
        )
    return verify_sharded_folder(path)


def read_checkpoint_header(path: str | Path) -> dict[str, Any]:
    """Everything but the tensors' data of a fit checkpoint (file or sharded folder): the
    fingerprint and the layout it was saved with. Memory-maps a file, reads nothing large; a
    folder is verified first."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        _verify_folder(path)
        return _load_file(path / META_NAME, mmap=True)
    if not path.is_file():
        raise MissingPathError(f"ckpt_path: '{path}' does not exist")
    return _load_file(path, mmap=True)


def check_stored_hyperparameters(path: str | Path, model_config: dict[str, Any]) -> None:
    """Refuse a checkpoint whose stored Lightning ``hyper_parameters`` contradict the model
    section of the config (``model.model`` above all).

    LightningCLI would merge them over the command line and silently load another model;
    lightning-prune never merges them (its checkpoints store none), so the command line
    always decides, and a contradiction is an error naming each field.
    """
    stored = read_checkpoint_header(path).get("hyper_parameters") or {}
    if not isinstance(stored, dict):
        raise ConfigError(f"ckpt_path: '{path}' holds hyper_parameters that are not a mapping")
    plain = (str, int, float, bool)
    wrong = {
        key: (value, model_config[key])
        for key, value in stored.items()
        if key in model_config and isinstance(value, plain) and value != model_config[key]
    }
    if wrong:
        detail = ", ".join(
            f"model.{k}: checkpoint {a!r} vs command line {b!r}" for k, (a, b) in wrong.items()
        )
        raise ConfigError(
            f"ckpt_path: '{path}' stores hyperparameters that contradict the config ({detail}); "
            "settings are never taken from a checkpoint: give the ones it was made with"
        )


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
        ranks = header.get(LAYOUT_KEY, {}).get("world_size", 1)
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


def read_sharded_state(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata (``meta.pt``) and the learned state, as whole tensors, of a sharded
    checkpoint folder, after verifying it. Works without a process group, at any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    metadata = _verify_folder(path)
    checkpoint = _load_file(path / META_NAME)
    prefix = SHARDED_PREFIX["fsdp1" if saved_sharding(checkpoint) == "fsdp1" else "fsdp2"]
    state = {
        key.removeprefix(prefix): torch.empty(tuple(kind.size), dtype=kind.properties.dtype)
        for key, kind in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(kind, TensorStorageMetadata)
    }
    try:
        dcp.load({prefix[:-1]: state}, checkpoint_id=str(path))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"ckpt_path: '{path}': its shards are unreadable ({first})") from err
    return checkpoint, state


def read_checkpoint(module: CheckpointTarget, ckpt_path: str | Path) -> dict[str, Any]:
    """A fit checkpoint (file or sharded folder) with its learned state as whole tensors,
    checked against ``module`` (identity, mask family, learnable tensors, finite values).

    Builds the module's model. The one way export, evaluate and report read a checkpoint.
    """
    path = Path(ckpt_path)
    if is_sharded_checkpoint(path):
        checkpoint, state = read_sharded_state(path)
        checkpoint["state_dict"] = state
    elif not path.is_file():
        raise MissingPathError(f"ckpt_path: '{path}' does not exist")
    else:
        checkpoint = _load_file(path)
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise ConfigError(f"ckpt_path: '{path}' holds no state_dict")
    module.configure_model()
    module.check_checkpoint(checkpoint)
    return checkpoint


def check_checkpoint_usable(path: str | Path) -> None:
    """Without a model: refuse a checkpoint that is unreadable, unsafe (see
    :func:`read_checkpoint_header`) or holds a non-finite learned value."""
    if is_sharded_checkpoint(path):
        _, state = read_sharded_state(path)
    else:
        header_state = read_checkpoint_header(path).get("state_dict")
        if not isinstance(header_state, dict):
            raise ConfigError(f"ckpt_path: '{path}' holds no state_dict")
        state = header_state
    check_finite_state(state)


def consolidate_checkpoint(
    module: CheckpointTarget, sharded: str | Path, output: str | Path
) -> Path:
    """Write a sharded checkpoint folder as one full checkpoint file (learned state, metadata;
    the optimizer state stays in the folder, so the file serves export/evaluate)."""
    checkpoint = read_checkpoint(module, sharded)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    torch.save(checkpoint, partial)
    partial.replace(output)
    return output


def load_learned_state(module: CheckpointTarget, ckpt_path: str | Path) -> None:
    """Build the module's model and load a fit checkpoint into it (see :func:`read_checkpoint`).

    ``ckpt_path`` is a single-file checkpoint or a sharded (distributed) checkpoint folder.
    """
    checkpoint = read_checkpoint(module, ckpt_path)
    try:
        module.load_state_dict(checkpoint["state_dict"], strict=False)
    except RuntimeError as err:
        raise ConfigError(f"ckpt_path: '{ckpt_path}' does not fit the model ({err})") from err
