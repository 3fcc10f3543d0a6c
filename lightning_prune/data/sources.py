"""Read documents from a text source: embedded corpus, local files/folders or a HF dataset."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_prune.data.corpora import available_corpora, load_embedded_corpus
from lightning_prune.errors import ConfigError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


class DataSourceError(ConfigError):
    """A text source does not exist, cannot be read or holds no text."""


def read_documents(
    source: str,
    text_column: str = "text",
    dataset_config: str | None = None,
    split: str = "train",
) -> list[str]:
    """Documents of ``source`` in a stable order.

    ``source`` is an embedded corpus name (``wikipedia``, ``shakespeare``), a local ``.txt``
    (documents separated by blank lines), ``.jsonl`` (one object per line with
    ``text_column``) or ``.parquet`` file, a folder of such files, or a ``datasets`` name/path.
    """
    if source in available_corpora():
        documents = load_embedded_corpus(source)
    else:
        path = Path(source).expanduser()
        if path.exists():
            documents = _read_local(path, text_column)
        elif source.startswith((".", "/", "~")) or Path(source).suffix in LOCAL_SUFFIXES:
            raise DataSourceError(f"data.source: path '{source}' does not exist")
        else:
            documents = _read_hub(source, text_column, dataset_config, split)
    documents = [d for d in documents if d and d.strip()]
    if not documents:
        raise DataSourceError(f"data.source: '{source}' holds no text")
    return documents


def _read_local(path: Path, text_column: str) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file())
        if not files:
            raise DataSourceError(
                f"data.source: folder '{path}' has no {'/'.join(LOCAL_SUFFIXES)} files"
            )
        return [doc for f in files for doc in _read_file(f, text_column)]
    if path.suffix not in LOCAL_SUFFIXES:
        raise DataSourceError(
            f"data.source: '{path}' has suffix '{path.suffix}', expected one of {LOCAL_SUFFIXES}"
        )
    return _read_file(path, text_column)


def _read_file(path: Path, text_column: str) -> list[str]:
    if path.suffix == ".parquet":
        import datasets

        table = datasets.load_dataset("parquet", data_files=str(path), split="train")
        if text_column not in table.column_names:
            raise DataSourceError(
                f"data.text_column: '{path}' has no column '{text_column}' "
                f"(columns: {table.column_names})"
            )
        return [str(t) for t in table[text_column]]
    try:
        text = path.read_text(encoding="utf-8")
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
        documents.append(str(record[text_column]))
    return documents


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
    return [str(t) for t in table[text_column]]
