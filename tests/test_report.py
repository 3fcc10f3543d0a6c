"""`lightning-prune report` on real tiny runs: sections, decodable images, masks, protocols."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from lightning_prune.cli import main
from lightning_prune.report.masks import NMSummary, StructuredSummary, summarize
from lightning_prune.report.runs import load_run

ROOT = Path(__file__).parents[1]
NM_CONFIG = ROOT / "configs" / "proxsparse_2of4.yaml"
MM_CONFIG = ROOT / "configs" / "maskprune_uniform.yaml"
SECTIONS = ("runs", "perplexity", "speed", "masks", "curves", "config", "protocol")
SMALL = ["--data.seq_len=32", "--data.eval_tokens=128"]


def cli(command: str, config: Path, model: str, *extra: str) -> None:
    main([command, "--config", str(config), f"--model.model={model}", *SMALL, *extra])


def fit(config: Path, model: str, root: Path, *extra: str) -> Path:
    cli(
        "fit",
        config,
        model,
        "--data.num_samples=6",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=1",
        *extra,
    )
    return root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def runs(small_model, tmp_path_factory) -> dict[str, Path]:
    """A ProxSparse run with an evaluate record and a minimax run with export, record, speed."""
    base = tmp_path_factory.mktemp("report-runs")
    nm, mm = base / "proxsparse", base / "minimax"
    ckpt = fit(
        NM_CONFIG,
        small_model,
        nm,
        "--model.init_mask=null",
        "--model.regularizers.init_args.lam=0.3",
    )
    cli(
        "evaluate",
        NM_CONFIG,
        small_model,
        "--model.init_mask=null",
        f"--ckpt_path={ckpt}",
        "--baselines=[magnitude]",
        f"--output={nm / 'evaluation.json'}",
    )
    ckpt = fit(MM_CONFIG, small_model, mm)
    cli("export", MM_CONFIG, small_model, f"--ckpt_path={ckpt}", f"--output_dir={mm / 'export'}")
    cli(
        "evaluate",
        MM_CONFIG,
        small_model,
        f"--ckpt_path={ckpt}",
        f"--output={mm / 'evaluation.json'}",
    )
    bench = [
        sys.executable,
        str(ROOT / "tools" / "bench_speed.py"),
        "--dense",
        small_model,
        "--pruned",
        str(mm / "export"),
        "--batch-sizes",
        "1",
        "--lengths",
        "16",
        "--new-tokens",
        "2",
        "--repeats",
        "1",
        "--output",
        str(mm / "speed.json"),
    ]
    subprocess.run(bench, check=True, capture_output=True)
    return {"nm": nm, "mm": mm}


def report(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(["report", *args])
    return exit_info.value.code


def embedded_images(page: str) -> list[np.ndarray]:
    encoded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return [mpimg.imread(io.BytesIO(base64.b64decode(data)), format="png") for data in encoded]


def test_report_holds_every_section_and_decodable_images(runs, small_model, tmp_path) -> None:
    output = tmp_path / "out" / "report.html"
    export = runs["mm"] / "export"
    assert report(str(runs["nm"]), str(runs["mm"]), str(export), "--output", str(output)) == 0
    page = output.read_text()
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in page, anchor
    images = embedded_images(page)
    assert len(images) == 4  # masks of each run and of the export, training curves
    for picture in images:
        assert picture.shape[0] > 300 and picture.shape[1] > 800
        assert picture[..., :3].std() > 0.05  # not a blank canvas
    pngs = sorted(p.name for p in output.parent.glob("*.png"))
    assert pngs == [
        "report_curves.png",
        "report_masks_export.png",
        "report_masks_minimax.png",
        "report_masks_proxsparse.png",
    ]
    assert mpimg.imread(output.parent / "report_curves.png").shape == images[-1].shape
    record = json.loads((runs["nm"] / "evaluation.json").read_text())
    learned = next(r for r in record["rows"] if r["model"].startswith("learned"))
    assert f"{learned['wikipedia']:,.2f}" in page  # the perplexity table
    assert record["protocol"][0]["token_sha256"] in page  # the protocol section
    assert "magnitude" in page and "class_path: lightning_prune.masks.nm.NMMaskFamily" in page
    assert "decode tok/s dense → pruned" in page and "export" in page  # speed and size
    row = f"<td>export</td><td>{export}</td><td>{small_model}</td><td>UniformStructuredFamily</td>"
    assert row + "<td>MinimaxSolver</td>" in page  # the export's run row, from pruning.json


def test_mask_views_read_the_checkpoint_and_agree_with_the_export(
    runs, small_model, tmp_path
) -> None:
    nm = summarize(load_run(runs["nm"]))
    assert isinstance(nm, NMSummary) and (nm.n, nm.m) == (2, 4)
    assert nm.layers == [0, 1] and nm.modules[0] == "q_proj" and len(nm.modules) == 7
    assert np.allclose(nm.levels.sum(-1), 1.0)
    assert 0 < nm.done().mean() < 1  # lam=0.3 for six steps: some groups are N:M, not all
    metrics = load_run(runs["nm"]).metrics
    version = load_run(runs["nm"] / "lightning_logs" / "version_0")
    assert version.name == "proxsparse/version_0" and version.metrics == metrics
    assert {"reg/nm_groups_done_l0", "reg/nm_groups_done_l1"} <= set(metrics)
    levels = np.array([[v for _, v in metrics[f"reg/nm_groups_nnz{k}"]] for k in range(5)])
    done = np.array([v for _, v in metrics["reg/nm_groups_done"]])
    assert np.allclose(levels.sum(0), 1.0) and np.allclose(levels[:3].sum(0), done)
    ckpt = runs["nm"] / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    packed = tmp_path / "compressed"
    cli(
        "export",
        NM_CONFIG,
        small_model,
        "--model.init_mask=null",
        f"--ckpt_path={ckpt}",
        f"--output_dir={packed}",
        "--format=compressed-nm",
    )
    exported = summarize(load_run(packed))
    assert isinstance(exported, NMSummary) and exported.modules == nm.modules
    assert np.allclose(exported.done(), 1.0)  # the shipped weights are exactly 2:4

    from_checkpoint = summarize(load_run(runs["mm"]))
    from_export = summarize(load_run(runs["mm"] / "export"))
    assert isinstance(from_checkpoint, StructuredSummary)
    shape = json.loads((runs["mm"] / "export" / "pruning.json").read_text())["pruned_shape"]
    for kind, size in (("heads", "num_heads"), ("channels", "intermediate_size")):
        kept = from_checkpoint.kept[kind]
        assert (kept.sum(1) == shape[size]).all(), kind  # the same width in every layer
        assert (kept == from_export.kept[kind]).all(), kind


def test_report_refuses_mixed_protocols_unless_allowed(runs, small_model, tmp_path, capsys):
    other = tmp_path / "other"
    cli(
        "evaluate",
        NM_CONFIG,
        small_model,
        "--model.init_mask=null",
        "--data.seq_len=16",
        f"--output={other / 'evaluation.json'}",
    )
    output = tmp_path / "mixed.html"
    assert report(str(runs["nm"]), str(other), "--output", str(output)) == 2
    message = capsys.readouterr().err
    assert "lightning-prune: error:" in message and "seq_len 32 vs 16" in message
    assert not output.exists()
    code = report(str(runs["nm"]), str(other), "--output", str(output), "--allow_mixed_protocols")
    assert code == 0 and "mixed protocols: source &#x27;wikipedia&#x27;" in output.read_text()


def test_report_bad_input_names_the_folder(tmp_path, capsys) -> None:
    output = tmp_path / "r.html"
    assert report(str(tmp_path / "missing"), "--output", str(output)) == 2
    assert "missing': does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report(str(empty), "--output", str(output)) == 2
    assert "found no fit log folder (metrics.csv, config.yaml" in capsys.readouterr().err
    assert not output.exists()
    broken = tmp_path / "broken" / "lightning_logs" / "version_0"
    broken.mkdir(parents=True)
    (broken / "metrics.csv").write_text("step,train/loss\n0,1.5\nten,1.2\n")
    assert report(str(tmp_path / "broken"), "--output", str(output)) == 2
    err = capsys.readouterr().err
    assert "metrics.csv' line 3: step 'ten' is not a number" in err and "Traceback" not in err
    assert not output.exists()


def test_tensorboard_logger_from_yaml(small_model, tmp_path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is in the dev extra")
    config = tmp_path / "tensorboard.yaml"
    config.write_text(
        "trainer:\n"
        "  logger:\n"
        "    class_path: lightning.pytorch.loggers.TensorBoardLogger\n"
        f"    init_args: {{save_dir: {tmp_path / 'tb'}}}\n"
    )
    fit(
        NM_CONFIG,
        small_model,
        tmp_path / "run",
        "--model.init_mask=null",
        "--trainer.max_steps=2",
        "--config",
        str(config),
    )
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert not list((tmp_path / "run").rglob("metrics.csv"))  # the configured logger only


def test_report_on_a_one_shot_run_without_training_log(small_model, tmp_path) -> None:
    config = ROOT / "configs" / "wanda_2of4.yaml"  # zero steps: no metrics.csv is written
    cli(
        "fit",
        config,
        small_model,
        "--data.num_samples=4",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    )
    assert not list(tmp_path.rglob("metrics.csv"))
    output = tmp_path / "report.html"
    assert report(str(tmp_path), "--output", str(output)) == 0
    page = output.read_text()
    assert "no metrics.csv in the folders" in page and "OneShotSolver" in page
    [masks] = embedded_images(page)
    assert masks.shape[1] > 800
    summary = summarize(load_run(tmp_path))
    assert np.allclose(summary.done(), 1.0)  # a one-shot 2:4 mask is N:M from the start


def test_report_shows_the_inference_benchmark_table(tmp_path) -> None:
    """A folder holding only a ``tools/bench_inference.py`` JSON (its fields as the tool writes
    them) gets the files / loading / speed table."""
    result = {
        "variant": "2:4 compressed-nm (restored)",
        "file_bytes": 3 * 2**20,
        "file_ratio": 0.655,
        "load_s": 1.5,
        "peak_mb": 300.0,
        "rows": [
            {"batch": 1, "length": 32, "prefill_speedup": 1.1, "decode_speedup": 0.9,
             "flop_bound": 1.0},
            {"batch": 4, "length": 128, "prefill_speedup": 1.02, "decode_speedup": 0.97,
             "flop_bound": 1.0},
        ],
        "speedup_expected": "no speed-up: restored to the same dense tensors",
    }
    (tmp_path / "inference.json").write_text(json.dumps({"config": {}, "results": [result]}))
    out = tmp_path / "report.html"
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path), "--output", str(out)])
    assert exit_info.value.code == 0
    page = out.read_text()
    assert "tools/bench_inference.py" in page
    assert "0.655" in page and "1.02x / 0.97x" in page and "no speed-up: restored" in page
