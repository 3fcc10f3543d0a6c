"""Calibration data: sources, document-level held-out split, packing and caching."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_prune.data import CalibrationDataModule
from lightning_prune.data.sources import DataSourceError, read_documents
from lightning_prune.data.tokens import split_documents


def write_corpus(tmp_path):
    docs = [
        ("Document number {i} talks about topic {t} at some length. " * 20)
        .strip()
        .format(i=i, t=i % 7)
        for i in range(12)
    ]
    (tmp_path / "a.txt").write_text("\n\n".join(docs[:6]))
    with open(tmp_path / "b.jsonl", "w") as f:
        for doc in docs[6:]:
            f.write(json.dumps({"text": doc}) + "\n")
    return docs


def test_local_folder_reads_txt_and_jsonl(tmp_path) -> None:
    docs = write_corpus(tmp_path)
    assert read_documents(str(tmp_path)) == docs


def test_parquet_through_datasets(tmp_path) -> None:
    import datasets

    datasets.Dataset.from_dict({"body": ["one text here", "another text"]}).to_parquet(
        str(tmp_path / "c.parquet")
    )
    assert read_documents(str(tmp_path / "c.parquet"), text_column="body") == [
        "one text here",
        "another text",
    ]


def test_heldout_split_is_disjoint_by_document() -> None:
    docs = [f"doc {i}" for i in range(40)]
    calibration, heldout = split_documents(docs, 0.25, seed=3)
    assert len(heldout) == 10 and not set(calibration) & set(heldout)
    assert sorted(calibration + heldout) == sorted(docs)
    assert split_documents(docs, 0.25, seed=3) == (calibration, heldout)


def test_datamodule_packs_seeded_windows(tmp_path, small_model) -> None:
    write_corpus(tmp_path)
    dm = CalibrationDataModule(
        source=str(tmp_path),
        tokenizer=small_model,
        seq_len=32,
        num_samples=5,
        heldout_fraction=0.25,
        eval_tokens=64,
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (1, 32)
    assert torch.equal(batch["input_ids"], batch["labels"])
    again = CalibrationDataModule(
        source=str(tmp_path),
        tokenizer=small_model,
        seq_len=32,
        num_samples=5,
        heldout_fraction=0.25,
        eval_tokens=64,
    )
    assert torch.equal(dm.calibration_windows(), again.calibration_windows())
    assert dm.heldout_windows().shape == (2, 32)
    with pytest.raises(ValueError, match="data.num_samples"):
        CalibrationDataModule(
            source=str(tmp_path), tokenizer=small_model, seq_len=32, num_samples=10_000
        ).calibration_windows()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.txt", "does not exist"),
        (lambda p: (p / "empty.txt").write_text("\n\n") and p / "empty.txt", "holds no text"),
        (lambda p: (p / "bin.txt").write_bytes(b"\xff\xfe\x00\x01") and p / "bin.txt", "UTF-8"),
        (
            lambda p: (p / "x.jsonl").write_text('{"content": "hi"}\n') and p / "x.jsonl",
            "no field 'text'",
        ),
        (lambda p: (p / "x.csv").write_text("a,b") and p / "x.csv", "expected one of"),
    ],
)
def test_bad_corpora_are_named(tmp_path, make, message) -> None:
    with pytest.raises(DataSourceError, match=message):
        read_documents(str(make(tmp_path)))
