"""Read documents from a text source: embedded corpus, local files/folders or a HF dataset.

Local files must be regular files (after resolving links: never a FIFO, device or socket) and
together at most ``max_source_bytes`` (``data.max_source_bytes``, 2 GiB by default), read with
that bound. Every document must be a string: a JSONL value or parquet/dataset cell that is
null, a number, an object or an array is refused with its file and line (or row).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from lightning_prune.data.corpora import available_corpora, load_embedded_corpus
from lightning_prune.errors import ConfigError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")

#: default bound on the bytes read from a local source (one file or a folder's files together)
MAX_SOURCE_BYTES = 2 * 2**30

_NOT_REGULAR = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


class DataSourceError(ConfigError):
    """A text source does not exist, cannot be read or holds no text."""


def read_documents(
    source: str,
    text_column: str = "text",
    dataset_config: str | None = None,
    split: str = "train",
    max_source_bytes: int = MAX_SOURCE_BYTES,
) -> list[str]:
    """Documents of ``source`` in a stable order.

    ``source`` is an embedded corpus name (``wikipedia``, ``shakespeare``), a local ``.txt``
    (documents separated by blank lines), ``.jsonl`` (one object per line with
    ``text_column``) or ``.parquet`` file, a folder of such files, or a ``datasets`` name/path.
    Local files are read only up to ``max_source_bytes`` in all.
    """
    if source in available_corpora():
        documents = load_embedded_corpus(source)
    else:
        path = Path(source).expanduser()
        if path.exists():
            documents = _read_local(path, text_column, max_source_bytes)
        elif source.startswith((".", "/", "~")) or Path(source).suffix in LOCAL_SUFFIXES:
            raise DataSourceError(f"data.source: path '{source}' does not exist")
        else:
            documents = _read_hub(source, text_column, dataset_config, split)
    documents = [d for d in documents if d and d.strip()]
    if not documents:
        raise DataSourceError(f"data.source: '{source}' holds no text")
    return documents


def _read_local(path: Path, text_column: str, limit: int) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and not p.is_dir())
        if not files:
            raise DataSourceError(
                f"data.source: folder '{path}' has no {'/'.join(LOCAL_SUFFIXES)} files"
            )
        sizes = [regular_file_size(f) for f in files]
        if sum(sizes) > limit:
            raise DataSourceError(
                f"data.source: the files of folder '{path}' hold {sum(sizes)} bytes, above the "
                f"limit of {limit} bytes (raise data.max_source_bytes to read more)"
            )
        return [doc for f in files for doc in _read_file(f, text_column, limit)]
    if path.suffix not in LOCAL_SUFFIXES:
        raise DataSourceError(
            f"data.source: '{path}' has suffix '{path.suffix}', expected one of {LOCAL_SUFFIXES}"
        )
    return _read_file(path, text_column, limit)


def regular_file_size(path: Path, field: str = "data.source") -> int:
    """Size of ``path``, which must be a regular file once links are followed."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = _NOT_REGULAR.get(stat.S_IFMT(mode), "not a regular file")
        via = f" (a link to '{path.resolve()}')" if path.is_symlink() else ""
        raise DataSourceError(
            f"{field}: '{path}'{via} is {kind}, expected a regular .txt, .jsonl or .parquet file"
        )
    return os.stat(path).st_size


def _read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of regular file ``path``, refused above ``limit`` (checked while reading too)."""
    size = regular_file_size(path)
    if size > limit:
        raise DataSourceError(
            f"data.source: '{path}' is {size} bytes, above the limit of {limit} bytes (raise "
            "data.max_source_bytes to read it)"
        )
    with path.open("rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise DataSourceError(
            f"data.source: '{path}' grew above the limit of {limit} bytes while being read"
        )
    return data


def _read_file(path: Path, text_column: str, limit: int) -> list[str]:
    if path.suffix == ".parquet":
        return _read_parquet(path, text_column, limit)
    try:
        text = _read_bounded(path, limit).decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataSourceError(f"data.source: '{path}' is not UTF-8 text ({err.reason})") from err
    if "\x00" in text:
        raise DataSourceError(f"data.source: '{path}' looks binary, expected text")
    if path.suffix == ".txt":
        return [block.strip() for block in text.split("\n\n") if block.strip()]
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataSourceError(f"data.source: {path} line {number} is not JSON ({err})") from err
        if not isinstance(record, dict) or text_column not in record:
            raise DataSourceError(
                f"data.text_column: {path} line {number} has no field '{text_column}'"
            )
        documents.append(text_value(record[text_column], f"{path} line {number}", text_column))
    return documents


def _read_parquet(path: Path, text_column: str, limit: int) -> list[str]:
    """The ``text_column`` strings of a parquet file (read with pyarrow, bounded in size)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    size = regular_file_size(path)
    if size > limit:
        raise DataSourceError(
            f"data.source: '{path}' is {size} bytes, above the limit of {limit} bytes (raise "
            "data.max_source_bytes to read it)"
        )
    try:
        file = pq.ParquetFile(path)
        columns = file.schema_arrow.names
        if text_column not in columns:
            raise DataSourceError(
                f"data.text_column: '{path}' has no column '{text_column}' (columns: {columns})"
            )
        values = file.read(columns=[text_column]).column(text_column).to_pylist()
    except pa.ArrowException as err:
        raise DataSourceError(
            f"data.source: '{path}' is not a readable parquet file ({err})"
        ) from err
    return [
        text_value(v, f"{path} row {row}", text_column) for row, v in enumerate(values, start=1)
    ]


def _read_hub(source: str, text_column: str, dataset_config: str | None, split: str) -> list[str]:
    import datasets

    try:
        table = datasets.load_dataset(source, dataset_config, split=split)
    except Exception as err:  # datasets raises many types for offline / unknown names
        raise DataSourceError(
            f"data.source: '{source}' is not an embedded corpus ({', '.join(available_corpora())}),"
            f" not a local path, and could not be loaded with datasets ({err}); on a machine "
            "without internet point data.source at a local copy"
        ) from err
    if text_column not in table.column_names:
        raise DataSourceError(
            f"data.text_column: dataset '{source}' has no column '{text_column}' "
            f"(columns: {table.column_names})"
        )
    return [
        text_value(v, f"dataset '{source}' row {row}", text_column)
        for row, v in enumerate(table[text_column], start=1)
    ]


def text_value(value: Any, where: str, text_column: str, field: str = "data.text_column") -> str:
    """``value`` if it is a string; otherwise a ``DataSourceError`` naming ``where``."""
    if isinstance(value, str):
        return value
    raise DataSourceError(
        f"{field}: {where}: field '{text_column}' is {_json_kind(value)}, expected a string"
    )


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a {type(value).__name__}"
