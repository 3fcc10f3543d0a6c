"""Check a sharded (torch distributed checkpoint) folder before torch reads any of it.

``torch.distributed.checkpoint`` reads a folder's ``.metadata`` with plain ``pickle.load`` and
the non-tensor entries of its ``.distcp`` shard files with ``torch.load(weights_only=False)``:
a crafted folder would run code. :func:`verify_sharded_folder` reads ``.metadata`` with an
unpickler that constructs only the plain data classes of that metadata (any other global is
refused, never imported), checks that every entry it lists lies inside a shard file of the
folder, and loads every non-tensor entry with ``torch.load(weights_only=True)``. Bytes that
pass these checks make torch's own readers construct nothing else, so the folder may then be
handed to ``torch.distributed.checkpoint`` (the tensors themselves it reads ``weights_only``).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from lightning_prune.errors import ConfigError

METADATA_NAME = ".metadata"
META_NAME = "meta.pt"
_DCP = "torch.distributed.checkpoint.metadata"
#: the globals a ``.metadata`` file written by torch may name: plain records and values
_ALLOWED_GLOBALS = {
    (_DCP, "Metadata"),
    (_DCP, "MetadataIndex"),
    (_DCP, "StorageMeta"),
    (_DCP, "TensorStorageMetadata"),
    (_DCP, "BytesStorageMetadata"),
    (_DCP, "ChunkStorageMetadata"),
    (_DCP, "TensorProperties"),
    (_DCP, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles only :data:`_ALLOWED_GLOBALS` and torch dtypes; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it names '{module}.{name}'")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it holds a persistent id")


def _refuse(folder: Path, detail: str) -> ConfigError:
    return ConfigError(f"ckpt_path: sharded checkpoint '{folder}' is refused: {detail}")


def read_dcp_metadata(folder: Path) -> Any:
    """The folder's ``.metadata`` (torch's ``Metadata`` record), read without running code."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = folder / METADATA_NAME
    try:
        with path.open("rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except Exception as err:  # only allowed constructors ran; any failure is a refusal
        raise _refuse(
            folder,
            f"its {METADATA_NAME} is not the metadata torch writes ({err}); it was not unpickled",
        ) from err
    if not isinstance(metadata, Metadata) or not isinstance(
        getattr(metadata, "storage_data", None), dict
    ):
        raise _refuse(folder, f"its {METADATA_NAME} holds {type(metadata).__name__}, not Metadata")
    return metadata


def _entry_bytes(folder: Path, fqn: str, info: Any, sizes: dict[str, int]) -> tuple[Path, int]:
    """The shard file and end offset of one storage entry, after checking that it is a file of
    ``folder`` (no path outside it) and that the entry lies inside it."""
    name = getattr(info, "relative_path", None)
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise _refuse(folder, f"entry '{fqn}' points outside the folder ({name!r})")
    if getattr(info, "transform_descriptors", None):
        transforms = info.transform_descriptors
        raise _refuse(folder, f"entry '{fqn}' is stored with transforms {transforms}")
    if name not in sizes:
        path = folder / name
        if not path.is_file():
            raise _refuse(folder, f"entry '{fqn}' is in shard file '{name}', which is missing")
        sizes[name] = path.stat().st_size
    offset, length = getattr(info, "offset", None), getattr(info, "length", None)
    if not (isinstance(offset, int) and isinstance(length, int) and 0 <= offset and 0 < length):
        raise _refuse(folder, f"entry '{fqn}' has offset {offset!r} and length {length!r}")
    if offset + length > sizes[name]:
        raise _refuse(
            folder,
            f"entry '{fqn}' ends at byte {offset + length} of '{name}', which has "
            f"{sizes[name]} bytes (truncated)",
        )
    return folder / name, offset + length


def _check_plain_entry(folder: Path, fqn: str, path: Path, end: int, length: int) -> None:
    """A non-tensor entry must load with ``weights_only=True`` (torch later loads the same
    bytes without that restriction)."""
    with path.open("rb") as handle:
        handle.seek(end - length)
        data = handle.read(length)
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _refuse(
            folder,
            f"entry '{fqn}' in '{path.name}' holds objects other than tensors and plain values "
            f"({first[:200]}); it was not unpickled",
        ) from err


def verify_sharded_folder(folder: str | Path) -> Any:
    """Check a sharded checkpoint folder as described in the module docstring; return its
    ``Metadata``. Raises ``ConfigError`` naming the file or entry at fault."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    folder = Path(folder)
    for name in (META_NAME, METADATA_NAME):
        if not (folder / name).is_file():
            raise _refuse(
                folder,
                f"it has no {name} (a sharded checkpoint holds {META_NAME}, {METADATA_NAME} and "
                "one .distcp file a rank)",
            )
    metadata = read_dcp_metadata(folder)
    kinds = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(kinds, dict):
        raise _refuse(folder, f"its {METADATA_NAME} lists no state_dict_metadata")
    sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        fqn = getattr(index, "fqn", None)
        if not isinstance(fqn, str) or fqn not in kinds:
            raise _refuse(folder, f"storage entry {fqn!r} is not in state_dict_metadata")
        path, end = _entry_bytes(folder, fqn, info, sizes)
        if isinstance(kinds[fqn], BytesStorageMetadata):
            _check_plain_entry(folder, fqn, path, end, info.length)
    return metadata
