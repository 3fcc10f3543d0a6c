"""A full disk or an unwritable folder: a clear error, and earlier checkpoints and exports intact.

Disk-full is simulated by making the write path raise ``ENOSPC`` (``os.fsync`` for checkpoints,
``save_pretrained`` for exports); everything else is real.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from lightning_prune.checkpoint_io import CheckpointWriteError, SafeCheckpointIO
from lightning_prune.cli import main

CONFIG = Path(__file__).parents[1] / "configs" / "proxsparse_2of4.yaml"


def fit_args(model: str, root: Path, *extra: str) -> list[str]:
    return [
        "fit", f"--config={CONFIG}", f"--model.model={model}", "--model.init_mask=null",
        "--data.seq_len=32", "--data.num_samples=4", "--data.eval_tokens=64",
        f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=0", "--trainer.callbacks.init_args.every_n_train_steps=1",
        *extra,
    ]


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_checkpoint_write_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch) -> None:
    io, path = SafeCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()
    monkeypatch.setattr("lightning_prune.checkpoint_io.os.fsync", disk_full)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))


def test_fit_stops_clearly_when_the_disk_fills(tmp_path, capsys, monkeypatch, small_model):
    calls = {"n": 0}
    real_fsync = os.fsync

    def fills_on_third_write(fd):
        calls["n"] += 1
        if calls["n"] >= 3:  # step 1 writes step-1.ckpt and last.ckpt; step 2 fails
            disk_full()
        real_fsync(fd)

    monkeypatch.setattr("lightning_prune.checkpoint_io.os.fsync", fills_on_third_write)
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(small_model, tmp_path))
    assert exit_info.value.code == 2
    assert "could not be written (No space left on device)" in capsys.readouterr().err
    (last,) = tmp_path.glob("lightning_logs/version_0/checkpoints/last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 1
    assert not list(tmp_path.rglob(".*partial*"))


def test_unwritable_root_is_refused_before_work(tmp_path, capsys, small_model) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit):
        main(fit_args(small_model, blocker / "run"))
    assert "trainer.default_root_dir: cannot write to" in capsys.readouterr().err


@pytest.fixture(scope="module")
def fitted(small_model, tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("run")
    main(fit_args(small_model, root))
    return small_model, root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


def export(model: str, ckpt: Path, out: Path, *extra: str) -> None:
    main([
        "export", f"--config={CONFIG}", f"--model.model={model}", "--model.init_mask=null",
        f"--ckpt_path={ckpt}", f"--output_dir={out}", *extra,
    ])


def test_export_on_a_full_disk_keeps_the_previous_export(fitted, tmp_path, capsys, monkeypatch):
    model, ckpt = fitted
    out = tmp_path / "export"
    export(model, ckpt, out)
    before = digest(out)
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    with pytest.raises(SystemExit) as exit_info:
        export(model, ckpt, out, "--overwrite=true")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "could not be written (No space left on device); the previous export is unchanged" in err
    assert digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no partial folder left


def test_export_into_a_file_path_is_refused_before_work(fitted, tmp_path, capsys) -> None:
    model, ckpt = fitted
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit):
        export(model, ckpt, blocker / "export")
    assert "is a file, expected a folder" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"
