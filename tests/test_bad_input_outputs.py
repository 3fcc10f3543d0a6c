"""Outputs never replace what they must not, and concurrent fits never share a log folder.

Each case runs the real CLI (in-process) against a workspace that holds a finished fit (its
checkpoint) and an export of it; the workspace, the model folder and the case's own folder are
hashed before and after (files by content, links by target), and must be identical.

Cases (28):
  export   1 output_dir '.'               2 output_dir '' (unset variable)  3 a symlink to an export
           4 the model folder (an export) 5 a folder above the model      6 the checkpoint's run
           7 the HF cache (HF_HOME)       8 the hub cache (HF_HUB_CACHE)  9 our own cache
          10 a regular file              11 a folder not made by us      12 a fake pruning.json
          13 the home folder             14 a folder above the cwd       15 exists, no overwrite
          16 a symlink to a file         17 pruning.json is a symlink
  recover 18 output_dir = export_dir     19 output_dir = the run folder  20 output_dir ''
  report  21 --output a user's file      22 --output a folder            23 --output a symlink
          24 --output ''                 25 --output a run's config.yaml 26 a user's PNG where a
                                                                            figure would go
          27 --output a FIFO
  evaluate 28 --output a user's JSON file
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from snapshots import snapshot

from lightning_prune.cli import PruningTrainer, main
from lightning_prune.loggers import ClaimedVersionCSVLogger

CONFIGS = Path(__file__).parents[1] / "configs"
PROX = CONFIGS / "proxsparse_2of4.yaml"
MARKER = json.dumps({"lightning_prune_version": "0.0.0", "note": "looks like an export"})


@dataclass
class Workspace:
    root: Path
    model: str
    ckpt: Path
    export: Path


@dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[Workspace, Path, pytest.MonkeyPatch], list[str]]
    expected: tuple[str, ...]


def fit_args(model: str, root: Path) -> list[str]:
    return [
        "fit", f"--config={PROX}", f"--model.model={model}", "--model.init_mask=null",
        "--data.seq_len=32", "--data.num_samples=2", "--data.eval_tokens=64",
        f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
    ]


def export_args(ws: Workspace, output_dir: str | Path, model: str | None = None,
                overwrite: bool = True) -> list[str]:
    return [
        "export", f"--config={PROX}", f"--model.model={model or ws.model}",
        "--model.init_mask=null", f"--ckpt_path={ws.ckpt}", f"--output_dir={output_dir}",
        f"--overwrite={str(overwrite).lower()}",
    ]


def marked(folder: Path) -> Path:
    """``folder`` holding a pruning.json that names a lightning-prune version (the marker)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pruning.json").write_text(MARKER)
    (folder / "precious.txt").write_text("must survive")
    return folder


def to(make: Callable[[Workspace, Path, pytest.MonkeyPatch], str | Path], **kw):
    def build(ws: Workspace, tmp: Path, mp: pytest.MonkeyPatch) -> list[str]:
        return export_args(ws, make(ws, tmp, mp), **kw)

    return build


def into_cwd(ws: Workspace, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    mp.chdir(marked(tmp / "cwd"))
    return "."


def symlink_to_export(ws: Workspace, tmp: Path, mp: pytest.MonkeyPatch) -> Path:
    (tmp / "link").symlink_to(ws.export, target_is_directory=True)
    return tmp / "link"


def model_is_export(ws: Workspace, tmp: Path, mp: pytest.MonkeyPatch) -> list[str]:
    model = tmp / "pruned-model"
    shutil.copytree(ws.export, model)
    return export_args(ws, model, model=str(model))


def above_model(ws: Workspace, tmp: Path, mp: pytest.MonkeyPatch) -> list[str]:
    model = tmp / "models" / "lm"
    shutil.copytree(ws.model, model)
    marked(tmp / "models")
    return export_args(ws, tmp / "models", model=str(model))


def run_folder(ws: Workspace, tmp: Path, mp: pytest.MonkeyPatch) -> list[str]:
    ckpt = tmp / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(ws.ckpt, ckpt)
    marked(tmp / "run")
    return [a if not a.startswith("--ckpt_path=") else f"--ckpt_path={ckpt}"
            for a in export_args(ws, tmp / "run")]


def env_folder(variable: str) -> Callable[[Workspace, Path, pytest.MonkeyPatch], Path]:
    def make(ws: Workspace, tmp: Path, mp: pytest.MonkeyPatch) -> Path:
        folder = marked(tmp / variable.lower())
        mp.setenv(variable, str(folder))
        return folder

    return make


def regular_file(ws: Workspace, tmp: Path, mp: pytest.MonkeyPatch) -> Path:
    (tmp / "notes.txt").write_text("my notes")
    return tmp / "notes.txt"


def user_folder(ws: Workspace, tmp: Path, mp: pytest.MonkeyPatch) -> Path:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "thesis.tex").write_text("\\documentclass{article}")
    return tmp / "mine"


def fake_marker(ws: Workspace, tmp: Path, mp: pytest.MonkeyPatch) -> Path:
    folder = tmp / "fake"
    folder.mkdir()
    (folder / "pruning.json").write_text('{"pattern": "2:4"}')  # no lightning_prune_version
    return folder


def above_cwd(ws: Workspace, tmp: Path, mp: pytest.MonkeyPatch) -> Path:
    marked(tmp / "parent")
    (tmp / "parent" / "cwd").mkdir()
    mp.chdir(tmp / "parent" / "cwd")
    return tmp / "parent"


def link_to_file(ws: Workspace, tmp: Path, mp: pytest.MonkeyPatch) -> Path:
    (tmp / "file.txt").write_text("data")
    (tmp / "out").symlink_to(tmp / "file.txt")
    return tmp / "out"


def linked_marker(ws: Workspace, tmp: Path, mp: pytest.MonkeyPatch) -> Path:
    (tmp / "data").mkdir()
    (tmp / "data" / "pruning.json").symlink_to(ws.export / "pruning.json")
    return tmp / "data"


def recover_args(export_dir: Path, output_dir: str | Path, root: Path) -> list[str]:
    return [
        "recover", f"--model.export_dir={export_dir}", f"--model.output_dir={output_dir}",
        "--model.method=full", "--model.overwrite=true", "--data.seq_len=32",
        "--data.num_samples=2", "--data.eval_tokens=64", "--trainer.max_steps=1",
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
    ]


def recover_into_own_input(ws: Workspace, tmp: Path, mp: pytest.MonkeyPatch) -> list[str]:
    return recover_args(ws.export, ws.export, tmp / "run")


def recover_into_run_folder(ws: Workspace, tmp: Path, mp: pytest.MonkeyPatch) -> list[str]:
    return recover_args(ws.export, marked(tmp / "run"), tmp / "run")


def report(make: Callable[[Workspace, Path], str | Path]):
    def build(ws: Workspace, tmp: Path, mp: pytest.MonkeyPatch) -> list[str]:
        return ["report", str(ws.root), "--output", str(make(ws, tmp))]

    return build


def user_html(ws: Workspace, tmp: Path) -> Path:
    (tmp / "index.html").write_text("<html>my page</html>")
    return tmp / "index.html"


def html_link(ws: Workspace, tmp: Path) -> Path:
    (tmp / "r.html").symlink_to(user_html(ws, tmp))
    return tmp / "r.html"


def user_png(ws: Workspace, tmp: Path) -> Path:
    (tmp / "r_curves.png").write_bytes(b"\x89PNG my holiday photo")
    return tmp / "r.html"


def fifo(ws: Workspace, tmp: Path) -> Path:
    os.mkfifo(tmp / "pipe.html")
    return tmp / "pipe.html"


def evaluate_into_user_file(ws: Workspace, tmp: Path, mp: pytest.MonkeyPatch) -> list[str]:
    (tmp / "results.json").write_text('{"mine": true}')
    return [
        "evaluate", f"--config={PROX}", f"--model.model={ws.model}", "--model.init_mask=null",
        f"--ckpt_path={ws.ckpt}", f"--output={tmp / 'results.json'}",
    ]


CASES = [
    Case("export-cwd", to(into_cwd), ("output_dir", "the current folder")),
    Case("export-empty", to(lambda ws, tmp, mp: ""), ("output_dir", "the path is empty")),
    Case("export-symlink", to(symlink_to_export), ("output_dir", "symbolic link")),
    Case("export-model-folder", model_is_export, ("the model folder (model.model)",)),
    Case("export-above-model", above_model, ("a folder above the model folder",)),
    Case("export-run-folder", run_folder, ("a folder above the checkpoint (ckpt_path)",)),
    Case("export-hf-home", to(env_folder("HF_HOME")), ("Hugging Face cache (HF_HOME)",)),
    Case("export-hub-cache", to(env_folder("HF_HUB_CACHE")), ("Hugging Face hub cache",)),
    Case("export-lp-cache", to(env_folder("LIGHTNING_PRUNE_CACHE")),
         ("the lightning-prune cache",)),
    Case("export-regular-file", to(regular_file), ("is a file, not an export folder",)),
    Case("export-user-folder", to(user_folder), ("was not written by lightning-prune",)),
    Case("export-fake-marker", to(fake_marker), ("was not written by lightning-prune",)),
    Case("export-home", to(env_folder("HOME")), ("the home folder",)),
    Case("export-above-cwd", to(above_cwd), ("a folder above the current folder",)),
    Case("export-no-overwrite", to(lambda ws, tmp, mp: ws.export, overwrite=False),
         ("already exists", "overwrite")),
    Case("export-link-to-file", to(link_to_file), ("symbolic link",)),
    Case("export-linked-marker", to(linked_marker), ("was not written by lightning-prune",)),
    Case("recover-own-input", recover_into_own_input,
         ("the export being recovered (model.export_dir)",)),
    Case("recover-run-folder", recover_into_run_folder,
         ("the run folder (trainer.default_root_dir)",)),
    Case("recover-empty", lambda ws, tmp, mp: recover_args(ws.export, "", tmp / "run"),
         ("output_dir", "the path is empty")),
    Case("report-user-file", report(user_html), ("--output", "not an HTML report")),
    Case("report-folder", report(lambda ws, tmp: tmp), ("--output", "is a folder")),
    Case("report-symlink", report(html_link), ("--output", "symbolic link")),
    Case("report-empty", report(lambda ws, tmp: ""), ("--output", "the path is empty")),
    Case("report-run-config", report(lambda ws, tmp: ws.ckpt.parents[1] / "config.yaml"),
         ("--output", "config.yaml", "not an HTML report")),
    Case("report-user-png", report(user_png), ("r_curves.png", "not a figure of report")),
    Case("report-fifo", report(fifo), ("--output", "not a regular file")),
    Case("evaluate-user-file", evaluate_into_user_file,
         ("output", "results.json", "not an evaluate record")),
]


@pytest.fixture(scope="module")
def workspace(small_model, tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("outputs-workspace")
    main(fit_args(small_model, root))
    ckpt = next(root.glob("lightning_logs/version_0/checkpoints/*.ckpt"))
    ws = Workspace(root, small_model, ckpt, root / "export")
    main(export_args(ws, ws.export, overwrite=False))
    return ws


def test_case_count_is_visible() -> None:
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_outputs_never_replace_what_they_must_not(
    case, workspace, tmp_path, capsys, monkeypatch
) -> None:
    args = case.args(workspace, tmp_path, monkeypatch)
    before = snapshot(workspace.root, Path(workspace.model), tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    for expected in case.expected:
        assert expected in err, f"{case.id}: {expected!r} not in:\n{err[-2000:]}"
    assert "Traceback" not in err
    assert snapshot(workspace.root, Path(workspace.model), tmp_path) == before


def test_overwrite_replaces_an_earlier_export(workspace, tmp_path, capsys) -> None:
    out = tmp_path / "again"
    shutil.copytree(workspace.export, out)
    (out / "stale.txt").write_text("from the earlier export")
    main(export_args(workspace, out))
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "pruning.json").read_text())["lightning_prune_version"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_report_replaces_its_own_report_and_figures(workspace, tmp_path) -> None:
    output = tmp_path / "r.html"
    with pytest.raises(SystemExit) as first:
        main(["report", str(workspace.root), "--output", str(output)])
    assert first.value.code == 0 and output.is_file()
    figures = sorted(tmp_path.glob("r_*.png"))
    assert figures
    output.write_text(output.read_text().replace("</body>", "<p>edited</p></body>"))
    with pytest.raises(SystemExit) as second:
        main(["report", str(workspace.root), "--output", str(output)])
    assert second.value.code == 0 and "edited" not in output.read_text()
    assert sorted(tmp_path.glob("r_*.png")) == figures


# -- one log version per fit, even when fits start at once ------------------------------------


def test_two_loggers_in_one_root_claim_distinct_versions(tmp_path) -> None:
    """The race made deterministic: both loggers exist before either has chosen a version."""
    first, second = ClaimedVersionCSVLogger(tmp_path), ClaimedVersionCSVLogger(tmp_path)
    assert (first.version, second.version) == (0, 1)
    assert first.log_dir != second.log_dir
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == [
        "version_0", "version_1",
    ]


def test_default_fit_logger_claims_its_version(tmp_path) -> None:
    trainer = PruningTrainer(default_root_dir=tmp_path, accelerator="cpu")
    assert isinstance(trainer.logger, ClaimedVersionCSVLogger)


CLAIM = """
import sys, time
from pathlib import Path
from lightning_prune.loggers import ClaimedVersionCSVLogger
root, ready, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
logger = ClaimedVersionCSVLogger(root)
ready.touch()
while not go.exists():
    time.sleep(0.001)
print(logger.version)
"""


def test_concurrent_processes_claim_distinct_versions(tmp_path) -> None:
    """Real processes released at the same moment into one root each get their own folder
    (Lightning's own choice gives every one of them version_0)."""
    go, processes = tmp_path / "go", 4
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIM, str(tmp_path / "root"), str(tmp_path / f"ready{i}"),
             str(go)],
            stdout=subprocess.PIPE, text=True, env=env,
        )
        for i in range(processes)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready*"))) < processes and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    versions = [int(child.communicate(timeout=120)[0].strip()) for child in children]
    assert sorted(versions) == list(range(processes))


def test_other_ranks_create_no_version_folder(tmp_path, monkeypatch) -> None:
    """Only global rank zero claims; the others read the number (Lightning broadcasts rank
    zero's log folder), so data-parallel fits leave no empty version folders behind."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert ClaimedVersionCSVLogger(tmp_path).version == 0
    assert not (tmp_path / "lightning_logs").exists()
