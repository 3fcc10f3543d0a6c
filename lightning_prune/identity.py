"""A model's identity by content: its config and a digest of its weights files.

Checkpoints record both (``PruningModule.fingerprint``), so a checkpoint is refused for another
model even when every shape agrees (a fine-tune of the same base, another release).

- ``config``: canonical JSON (sorted keys) of the HF config's fields, without the ones that say
  how the model was loaded or saved rather than what it is (:data:`RUNTIME_FIELDS`, names that
  start with ``_``). Compared field by field, only where both sides have the field, so a field
  that a newer transformers adds to every config does not make old checkpoints foreign.
- ``weights_sha256``: SHA-256 over the model's safetensors files, tensor by tensor in name
  order: the name, dtype and shape of every tensor and :data:`SAMPLES` blocks of
  :data:`BLOCK` bytes evenly spaced over its data (all of it when smaller). It does not depend
  on how the tensors are split into files or ordered in them; another model differs in almost
  every block, while a single deliberately edited value may go unnoticed. Reading the samples
  of the 538 MB default model takes milliseconds, where hashing every byte takes 1.5 s.
  ``None`` when the model has no local safetensors files (a hub id, ``.bin`` weights).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

#: config fields about loading, saving or running, not about which model it is
RUNTIME_FIELDS = frozenset(
    {
        "transformers_version",
        "dtype",
        "torch_dtype",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "attn_implementation",
    }
)
SAMPLES = 16
BLOCK = 4096


def config_record(config: Any) -> str:
    """Canonical JSON of the identifying fields of an HF config."""
    fields = {
        key: value
        for key, value in config.to_dict().items()
        if not key.startswith("_") and key not in RUNTIME_FIELDS
    }
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)


def config_differences(saved: str, current: str) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved value, current value)}`` for the fields whose values differ between two
    :func:`config_record` texts (fields missing on one side are not compared). Raises
    ``ValueError`` for a text that is not such a record."""
    old, new = json.loads(saved), json.loads(current)
    if not (isinstance(old, dict) and isinstance(new, dict)):
        raise ValueError("a config record is a JSON object")
    return {
        key: (old[key], new[key]) for key in sorted(old.keys() & new.keys()) if old[key] != new[key]
    }


def _tensor_table(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor entries of a safetensors header (offsets made absolute in the file)."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        table = json.loads(handle.read(length))
    table.pop("__metadata__", None)
    for entry in table.values():
        begin, end = entry["data_offsets"]
        entry["span"] = (8 + length + begin, 8 + length + end)
    return table


def _sample(handle: Any, begin: int, end: int) -> bytes:
    """:data:`SAMPLES` blocks of :data:`BLOCK` bytes evenly spaced in ``[begin, end)``."""
    size = end - begin
    if size <= SAMPLES * BLOCK:
        handle.seek(begin)
        return handle.read(size)
    step = (size - BLOCK) // (SAMPLES - 1)
    parts = []
    for index in range(SAMPLES):
        handle.seek(begin + index * step)
        parts.append(handle.read(BLOCK))
    return b"".join(parts)


def weights_digest(files: list[Path]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and sampled bytes in ``files``."""
    entries = []
    for path in sorted(set(files)):
        entries += [(name, entry, path) for name, entry in _tensor_table(path).items()]
    digest = hashlib.sha256()
    handles: dict[Path, Any] = {}
    try:
        for name, entry, path in sorted(entries, key=lambda item: item[0]):
            handle = handles.setdefault(path, path.open("rb"))
            header = json.dumps([name, entry["dtype"], entry["shape"]])
            digest.update(header.encode() + b"\0")
            digest.update(_sample(handle, *entry["span"]))
    finally:
        for handle in handles.values():
            handle.close()
    return digest.hexdigest()


def model_weights_digest(model_name: str) -> str | None:
    """:func:`weights_digest` of a model's safetensors files, ``None`` without local ones."""
    from lightning_prune.models.sharded_loading import safetensors_files

    files = safetensors_files(model_name)
    return weights_digest(list(files.values())) if files else None
