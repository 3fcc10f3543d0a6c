"""Streamed ``datasets`` sources (``data.streaming``): read lazily, never materialised.

A source is a ``datasets`` hub name, streamed with ``load_dataset(..., streaming=True)``, or a
local ``.parquet``/``.jsonl`` file or folder, streamed through the ``parquet`` or
``json`` builder with ``data_files``. Documents are held out for validation by a hash of their
text and the seed, so the split needs no pass over the corpus and does not depend on how the
corpus is sharded over ranks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from lightning_prune.data.sources import DataSourceError, regular_file_size, text_value
from lightning_prune.errors import ConfigError, LightningPruneError

#: local file suffix -> ``datasets`` builder that streams it
LOCAL_BUILDERS = {".parquet": "parquet", ".jsonl": "json"}


@dataclass
class StreamSource:
    """One streamed source of a calibration mixture.

    Args:
        path: a ``datasets`` hub name (e.g. ``allenai/c4``), or a local ``.parquet`` or
            ``.jsonl`` file, or a folder of files of one of these kinds.
        weight: share of the calibration windows taken from this source, relative to the
            other sources' weights (any positive number).
        text_column: field that holds the text.
        dataset_config: ``datasets`` configuration name (hub sources, e.g. ``en``).
        split: ``datasets`` split (hub sources).
    """

    path: str
    weight: float = 1.0
    text_column: str = "text"
    dataset_config: str | None = None
    split: str = "train"


@dataclass
class StreamingConfig:
    """Calibration text streamed from ``datasets`` sources up to a token budget.

    Args:
        sources: the sources, mixed by weight (each window comes from one source).
        token_budget: calibration tokens over all ranks together, packed into
            ``data.seq_len`` windows (replaces ``data.num_samples``).
    """

    sources: list[StreamSource]
    token_budget: int


def check_streaming(value: StreamingConfig | dict[str, Any], seq_len: int) -> StreamingConfig:
    """``value`` (a config or a plain mapping) checked; errors name the field at fault."""
    config = _build(StreamingConfig, value, "data.streaming")
    if not isinstance(config.sources, list | tuple) or not config.sources:
        raise ConfigError(
            f"data.streaming.sources: expected at least one source, got {config.sources!r}"
        )
    sources = [
        _check_source(_build(StreamSource, source, source_field(i)), source_field(i))
        for i, source in enumerate(config.sources)
    ]
    budget = config.token_budget
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < seq_len:
        raise ConfigError(
            f"data.streaming.token_budget: expected an integer of at least one window "
            f"(data.seq_len = {seq_len} tokens), got {budget!r}"
        )
    return StreamingConfig(sources, budget)


def source_field(index: int) -> str:
    """The config field of source ``index`` (for error messages)."""
    return f"data.streaming.sources[{index}]"


def _build(cls: type, value: Any, field: str) -> Any:
    """An instance of dataclass ``cls`` from ``value`` (one already, or a mapping of its fields)."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{field}: expected a mapping, got {value!r}")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ConfigError(f"{field}: unknown field(s) {unknown}, expected some of {known}")
    for f in fields(cls):
        if f.default is MISSING and f.name not in value:
            raise ConfigError(f"{field}.{f.name}: required, got nothing")
    return cls(**value)


def _check_source(source: StreamSource, field: str) -> StreamSource:
    if not isinstance(source.path, str) or not source.path.strip():
        raise ConfigError(f"{field}.path: expected a hub name or local path, got {source.path!r}")
    weight = source.weight
    valid = isinstance(weight, int | float) and not isinstance(weight, bool)
    if not valid or not math.isfinite(weight) or weight <= 0:
        raise ConfigError(f"{field}.weight: expected a positive number, got {weight!r}")
    if not isinstance(source.text_column, str) or not source.text_column:
        raise ConfigError(
            f"{field}.text_column: expected a column name, got {source.text_column!r}"
        )
    return source


def open_source(source: StreamSource, field: str):
    """The source as a streaming ``datasets.IterableDataset`` (nothing read yet but metadata)."""
    path = Path(source.path).expanduser()
    if path.exists():
        dataset = _open_local(path, field)
    elif source.path.startswith((".", "/", "~")) or path.suffix in LOCAL_BUILDERS:
        raise DataSourceError(f"{field}.path: '{source.path}' does not exist")
    else:
        dataset = _open_hub(source, field)
    features = dataset.features
    if features is not None and source.text_column not in features:
        raise DataSourceError(
            f"{field}.text_column: '{source.path}' has no column '{source.text_column}' "
            f"(columns: {list(features)})"
        )
    return dataset


def _local_files(path: Path, field: str) -> list[Path]:
    if not path.is_dir():
        if path.suffix not in LOCAL_BUILDERS:
            raise DataSourceError(
                f"{field}.path: '{path}' has suffix '{path.suffix}', expected one of "
                f"{tuple(LOCAL_BUILDERS)}"
            )
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS and not p.is_dir())
    if not files:
        raise DataSourceError(
            f"{field}.path: folder '{path}' has no {'/'.join(LOCAL_BUILDERS)} files"
        )
    return files


def _open_local(path: Path, field: str):
    import datasets

    files = _local_files(path, field)
    for file in files:
        regular_file_size(file, f"{field}.path")
    builders = sorted({LOCAL_BUILDERS[f.suffix] for f in files})
    if len(builders) > 1:
        raise DataSourceError(
            f"{field}.path: folder '{path}' mixes .parquet and .jsonl files; give each kind "
            "its own source"
        )
    data_files = [str(f) for f in files]
    try:
        return datasets.load_dataset(
            builders[0], data_files=data_files, split="train", streaming=True
        )
    except Exception as err:  # datasets raises many types for unreadable files
        raise DataSourceError(f"{field}.path: cannot stream '{path}' ({err})") from err


def _open_hub(source: StreamSource, field: str):
    import datasets

    try:
        return datasets.load_dataset(
            source.path, source.dataset_config, split=source.split, streaming=True
        )
    except Exception as err:  # datasets raises many types for offline / unknown names
        raise DataSourceError(
            f"{field}.path: '{source.path}' is not a local path and could not be streamed with "
            f"datasets ({err}); on a machine without internet point it at a local copy"
        ) from err


def documents(dataset, source: StreamSource, field: str) -> Iterator[str]:
    """The non-blank texts of ``dataset`` in stream order, read lazily."""
    column = source.text_column
    for number, row in enumerate(_rows(dataset, source.path, field), start=1):
        if column not in row:
            raise DataSourceError(
                f"{field}.text_column: '{source.path}' row {number} has no field '{column}' "
                f"(fields: {sorted(row)})"
            )
        where = f"'{source.path}' row {number}"
        text = text_value(row[column], where, column, f"{field}.text_column")
        if text.strip():
            yield text


def _rows(dataset, path: str, field: str) -> Iterator[dict[str, Any]]:
    """The rows of ``dataset``; a failure to read one names the source."""
    iterator = iter(dataset)
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except LightningPruneError:
            raise
        except Exception as err:  # malformed JSON, a broken parquet page, a lost connection
            raise DataSourceError(f"{field}.path: reading '{path}' failed ({err})") from err
        yield row


def is_heldout(text: str, seed: int, fraction: float) -> bool:
    """Whether a document is held out: a hash of ``seed`` and its text below ``fraction``."""
    digest = hashlib.blake2b(text.encode(), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64
