"""The evaluate record reproduces its numbers' protocol; mixed protocols are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_prune.cli import main
from lightning_prune.data.datamodule import CalibrationDataModule
from lightning_prune.protocol import (
    ProtocolMismatchError,
    check_comparable,
    load_record,
    token_hash,
)

CONFIG = Path(__file__).parents[1] / "configs" / "proxsparse_2of4.yaml"


def evaluate_dense(model: str, output: Path, seq_len: int, *extra: str) -> None:
    main(
        [
            "evaluate",
            "--config",
            str(CONFIG),
            f"--model.model={model}",
            "--model.init_mask=null",
            f"--data.seq_len={seq_len}",
            "--data.eval_tokens=256",
            f"--output={output}",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def record_64(small_model, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("eval") / "dense_64.json"
    evaluate_dense(small_model, output, 64)
    return output


def test_record_holds_what_reproduces_the_number(small_model, record_64) -> None:
    record = json.loads(record_64.read_text())
    assert record["kind"] == "lightning_prune.evaluate"
    [entry] = record["protocol"]
    assert (entry["source"], entry["seq_len"], entry["stride"]) == ("wikipedia", 64, 64)
    assert entry["tokens"] == 256 and entry["windows"] == 4
    assert entry["heldout_fraction"] == 0.1 and entry["split_seed"] == 0
    assert entry["metric"] == "perplexity" and entry["tokenizer"] == small_model
    for package in ("torch", "transformers", "lightning", "lightning-prune", "python"):
        assert record["versions"][package], package
    assert record["seed"] == 0  # seed_everything of the config
    assert record["model"] == {
        "model": small_model,
        "dtype": "float32",
        "checkpoint": None,
        "exported": [],
    }
    # the hash names exactly the evaluated token ids: rebuild them independently
    data = CalibrationDataModule(tokenizer=small_model, seq_len=64, eval_tokens=256)
    windows = data.heldout_windows()
    assert entry["token_sha256"] == token_hash(windows)
    changed = windows.clone()
    changed[0, 0] += 1
    assert token_hash(changed) != entry["token_sha256"]
    assert record["rows"][0]["model"] == "dense" and record["rows"][0]["wikipedia"] > 1


def test_compare_refuses_a_different_protocol(small_model, record_64, tmp_path, capsys) -> None:
    short = tmp_path / "dense_32.json"
    with pytest.raises(SystemExit) as exit_info:
        evaluate_dense(small_model, short, 32, f"--compare=[{record_64}]")
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "different protocols" in message and "seq_len 32 vs 64" in message
    assert "--allow_mixed_protocols" in message
    assert short.is_file()  # the new record itself was written before the comparison

    evaluate_dense(
        small_model, short, 32, f"--compare=[{record_64}]", "--allow_mixed_protocols=true"
    )
    out = capsys.readouterr()
    assert "compared with earlier records" in out.out and str(record_64) in out.out
    assert "warning: mixed protocols" in out.err


def test_compare_accepts_the_same_protocol(small_model, record_64, tmp_path, capsys) -> None:
    again = tmp_path / "again.json"  # overwritten and compared with its earlier content
    again.write_text(record_64.read_text())
    evaluate_dense(small_model, again, 64, f"--compare=[{again}]")
    out = capsys.readouterr()
    assert "compared with earlier records" in out.out and "warning" not in out.err
    assert f"{again} (this evaluation)" in out.out and out.out.count(str(again)) >= 3
    first, second = load_record(record_64), load_record(again)
    assert first["rows"][0]["wikipedia"] == pytest.approx(second["rows"][0]["wikipedia"])


def test_check_comparable_only_compares_shared_sources(record_64) -> None:
    record = load_record(record_64)
    other = json.loads(json.dumps(record))
    other["protocol"][0]["source"] = "shakespeare"
    other["protocol"][0]["token_sha256"] = "0" * 16
    assert check_comparable({"a": record, "b": other}) == []
    other["protocol"][0]["source"] = "wikipedia"
    with pytest.raises(ProtocolMismatchError, match="token_sha256"):
        check_comparable({"a": record, "b": other})
    [problem] = check_comparable({"a": record, "b": other}, allow_mixed=True)
    assert problem.startswith("source 'wikipedia': a and b differ")


def test_load_record_names_a_file_that_is_not_a_record(tmp_path) -> None:
    path = tmp_path / "speed.json"
    path.write_text(json.dumps({"rows": [], "params": {}}))
    with pytest.raises(Exception, match="speed.json.*expected the JSON written by `evaluate"):
        load_record(path)


def test_token_hash_depends_on_shape() -> None:
    ids = torch.arange(8)
    assert token_hash(ids.view(2, 4)) != token_hash(ids.view(4, 2))
