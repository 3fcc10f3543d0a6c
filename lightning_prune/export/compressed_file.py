"""Read and write the ``compressed-nm`` weight file (``model.nm.safetensors``, format version 1).

The layout is specified in docs/compressed-nm.md. Writing encodes the N:M weights with
:mod:`lightning_prune.export.nm_codec`; reading checks, before decoding anything, that the file
is a complete safetensors file of a known format version, that the header (every metadata field
and every tensor's dtype and shape) matches its SHA-256 digest (``header_sha256``) and that every
tensor matches its own, and names the field or tensor at fault otherwise. Only safetensors is
read: no pickle.
"""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_prune.errors import LightningPruneError
from lightning_prune.export.nm_codec import NMPatternError, decode_nm, encode_nm, position_bits

WEIGHTS_NAME = "model.nm.safetensors"
FORMAT_NAME = "lightning-prune-compressed-nm"
FORMAT_VERSION = 1
VALUES_SUFFIX = ".nm_values"
POSITIONS_SUFFIX = ".nm_positions"
HEADER_DIGEST = "header_sha256"
#: safetensors' names of the dtypes a state dict holds
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class CompressedFormatError(LightningPruneError, ValueError):
    """A compressed-nm file is truncated, tampered, of an unknown version, or inconsistent."""


def _digest(tensor: Tensor) -> str:
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def header_digest(metadata: dict[str, str], table: dict[str, dict[str, Any]]) -> str:
    """SHA-256 of the whole header: every ``__metadata__`` field but ``header_sha256`` (as the
    stored strings) and every tensor's ``dtype`` and ``shape`` (docs/compressed-nm.md)."""
    record = {
        "metadata": {k: v for k, v in metadata.items() if k != HEADER_DIGEST},
        "tensors": {
            name: {"dtype": entry.get("dtype"), "shape": entry.get("shape")}
            for name, entry in table.items()
        },
    }
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _tensor_entry(name: str, tensor: Tensor) -> dict[str, Any]:
    """The ``dtype`` and ``shape`` that safetensors writes for ``tensor``."""
    if tensor.dtype not in SAFETENSORS_DTYPES:
        raise CompressedFormatError(f"tensor '{name}': dtype {tensor.dtype} cannot be stored")
    return {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape)}


def shared_tensors(state: dict[str, Tensor]) -> dict[str, str]:
    """``{name: earlier name}`` for state entries sharing storage with an earlier entry (ties)."""
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
    tied = {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
    return tied


def write_compressed(
    path: Path, state: dict[str, Tensor], compressed: dict[str, bool], n: int, m: int
) -> dict[str, Any]:
    """Write ``state`` to ``path``: the weights named in ``compressed`` N:M-encoded.

    ``compressed`` maps a weight name to whether it is stored ``[in, out]`` (transposed).
    Tensors sharing storage are written once and listed under ``tied``. Raises
    :class:`CompressedFormatError` naming a weight with a group of more than ``n`` nonzeros.
    Returns the header metadata (decoded JSON values).
    """
    from safetensors.torch import save_file

    tied = shared_tensors(state)
    tensors: dict[str, Tensor] = {}
    layout: dict[str, dict[str, Any]] = {}
    for name, tensor in state.items():
        if name in tied:
            continue
        if name not in compressed:
            tensors[name] = tensor.detach().contiguous()
            continue
        transposed = compressed[name]
        rows = tensor.detach().t() if transposed else tensor.detach()
        try:
            values, positions = encode_nm(rows, n, m)
        except NMPatternError as err:
            raise CompressedFormatError(
                f"tensor '{name}': breaks the {n}:{m} pattern: {err}"
            ) from err
        tensors[name + VALUES_SUFFIX] = values
        tensors[name + POSITIONS_SUFFIX] = positions
        layout[name] = {"shape": list(tensor.shape), "transposed": transposed}
    missing = set(compressed) - set(layout)
    if missing:
        raise CompressedFormatError(f"tensors {sorted(missing)} to compress are not in the state")
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "n": n,
        "m": m,
        "position_bits": position_bits(m),
        "compressed": layout,
        "tied": tied,
        "sha256": {name: _digest(t) for name, t in tensors.items()},
    }
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in header.items()}
    table = {name: _tensor_entry(name, t) for name, t in tensors.items()}
    metadata[HEADER_DIGEST] = header[HEADER_DIGEST] = header_digest(metadata, table)
    save_file(tensors, str(path), metadata=metadata)
    return header


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The safetensors header's tensor table and our metadata (decoded), after checking that
    the file is complete, is ``compressed-nm`` and has a version this code reads."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CompressedFormatError(f"'{path}': truncated ({size} bytes), not safetensors")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            raise CompressedFormatError(
                f"'{path}': truncated or not safetensors (header of {length} bytes, file {size})"
            )
        try:
            table = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CompressedFormatError(f"'{path}': unreadable safetensors header ({err})") from err
    if not isinstance(table, dict) or not all(isinstance(e, dict) for e in table.values()):
        raise CompressedFormatError(f"'{path}': safetensors header entries are not JSON objects")
    raw = table.pop("__metadata__", None) or {}
    if raw.get("format") != FORMAT_NAME:
        raise CompressedFormatError(
            f"'{path}': header field 'format' is {raw.get('format')!r}, expected '{FORMAT_NAME}'"
        )
    version = raw.get("format_version")
    if version != str(FORMAT_VERSION):
        raise CompressedFormatError(
            f"'{path}': unknown header version {version!r} (this lightning-prune reads version "
            f"{FORMAT_VERSION}; upgrade lightning-prune to read newer files)"
        )
    _check_header_digest(path, raw, table)
    try:
        meta = {
            k: raw[k] if k == "format" else json.loads(raw[k])
            for k in (
                "format",
                "format_version",
                "n",
                "m",
                "position_bits",
                "compressed",
                "tied",
                "sha256",
            )
        }
    except (KeyError, json.JSONDecodeError) as err:
        raise CompressedFormatError(
            f"'{path}': header metadata is incomplete or invalid ({err})"
        ) from err
    data_size = size - 8 - length
    for name, entry in table.items():
        end = entry.get("data_offsets", [0, 0])[1]
        if end > data_size:
            raise CompressedFormatError(
                f"'{path}': tensor '{name}' is truncated: its data ends at byte {end} of the "
                f"data section, which has {data_size} bytes"
            )
    return table, meta


def _check_header_digest(path: Path, raw: dict[str, str], table: dict[str, Any]) -> None:
    """Refuse a header whose metadata fields or tensor dtypes/shapes were changed after
    writing. Files written before header digests existed load with a warning."""
    stored = raw.get(HEADER_DIGEST)
    if stored is None:
        warnings.warn(
            f"'{path}' has no {HEADER_DIGEST} (written by an earlier lightning-prune): its "
            "per-tensor fields (shape, transposed, tied, dtypes) are not verified; re-export it",
            stacklevel=3,
        )
        return
    if header_digest(raw, table) != stored:
        raise CompressedFormatError(
            f"'{path}': the header fails its SHA-256 check ({HEADER_DIGEST}): a metadata field "
            "(n, m, compressed shapes or transposed flags, tied, sha256) or a tensor's dtype or "
            "shape was modified after writing"
        )


def read_compressed(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Decode ``path`` into a dense state dict (tied entries omitted) and its metadata."""
    from safetensors.torch import load_file

    table, meta = read_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise CompressedFormatError(f"'{path}': not a valid safetensors file ({err})") from err
    digests = meta["sha256"]
    for name in sorted(set(tensors) | set(digests)):
        if name not in digests or name not in tensors:
            raise CompressedFormatError(f"'{path}': tensor '{name}' is not listed in the header")
        if _digest(tensors[name]) != digests[name]:
            raise CompressedFormatError(
                f"'{path}': tensor '{name}' fails its SHA-256 check (the file was modified or "
                "corrupted)"
            )
    n, m = meta["n"], meta["m"]
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise CompressedFormatError(f"'{path}': header n:m is {n}:{m}, expected 0 < n < m")
    state: dict[str, Tensor] = {}
    for name, layout in meta["compressed"].items():
        values = tensors.pop(name + VALUES_SUFFIX, None)
        packed = tensors.pop(name + POSITIONS_SUFFIX, None)
        if values is None or packed is None:
            raise CompressedFormatError(f"'{path}': tensor '{name}' lacks its values or positions")
        try:
            shape, transposed = tuple(layout["shape"]), bool(layout["transposed"])
        except (KeyError, TypeError) as err:
            raise CompressedFormatError(
                f"'{path}': tensor '{name}': header entry {layout!r} lacks shape/transposed"
            ) from err
        if len(shape) != 2:
            raise CompressedFormatError(f"'{path}': tensor '{name}' has shape {shape}, not 2-D")
        rows_shape = shape[::-1] if transposed else shape
        try:
            rows = decode_nm(values, packed, n, m, rows_shape)
        except NMPatternError as err:
            raise CompressedFormatError(f"'{path}': tensor '{name}': {err}") from err
        state[name] = rows.t().contiguous() if transposed else rows
    state.update(tensors)
    return state, meta
