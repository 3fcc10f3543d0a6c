"""``lightning-prune report RUN_DIR_OR_EXPORT [...] --output report.html``."""

from __future__ import annotations

import argparse
import html
import re
from pathlib import Path
from typing import Any

import yaml

from lightning_prune.errors import LightningPruneError, print_error
from lightning_prune.export.atomic import check_output_file, write_file_atomic
from lightning_prune.protocol import check_comparable, joint_rows
from lightning_prune.report import document
from lightning_prune.report.masks import NMSummary, summarize
from lightning_prune.report.plots import nm_figure, structured_figure, training_curves
from lightning_prune.report.runs import RunData, load_run, unique_names


def build_parser() -> argparse.ArgumentParser:
    """The ``report`` subcommand's arguments."""
    parser = argparse.ArgumentParser(
        prog="lightning-prune report",
        description="Write one self-contained HTML report (and its plots as PNG files beside "
        "it) for fit run folders or exported model folders; several are compared side by side.",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR_OR_EXPORT",
        help="fit trainer.default_root_dir, "
        "one of its lightning_logs/version_N folders, or an exported model folder",
    )
    parser.add_argument("--output", default="report.html", help="HTML file to write")
    parser.add_argument("--title", default="lightning-prune report")
    parser.add_argument(
        "--allow_mixed_protocols",
        "--allow-mixed-protocols",
        action="store_true",
        help="show perplexities measured with different protocols side by side (flagged)",
    )
    return parser


def main(argv: list[str], debug: bool = False) -> int:
    """Run the subcommand; errors print ``lightning-prune: error: ...`` (with the traceback
    when ``debug``) and return 2."""
    args = build_parser().parse_args(argv)
    try:
        output = write_report(args.runs, args.output, args.allow_mixed_protocols, args.title)
    except LightningPruneError as err:
        print_error(err, debug)
        return 2
    print(f"wrote {output}")
    return 0


def write_report(
    paths: list[str],
    output: str | Path,
    allow_mixed: bool = False,
    title: str = "lightning-prune report",
) -> Path:
    """Read the runs, draw the figures, write ``output`` and ``<stem>_*.png`` beside it.

    An existing ``output`` is replaced only if it is a report this command wrote, and its
    figures only together with it (checked before anything is read or drawn).
    """
    output = check_output_file(output, "--output", document.is_report, "an HTML report")
    runs = [load_run(path) for path in paths]
    unique_names(runs)
    records = {f"{run.name}: {name}": rec for run in runs for name, rec in run.records.items()}
    problems = check_comparable(records, allow_mixed)  # refuses before anything is written
    figures: dict[str, bytes] = {}
    masks_body = []
    for run in runs:
        body, png = _mask_view(run)
        masks_body.append(f"<h3>{html.escape(run.name)}</h3>{body}")
        if png:
            figures[f"masks_{_slug(run.name)}"] = png
            masks_body.append(document.image(png, f"masks of {run.name}"))
    curves = training_curves(runs)
    curves_body = document.note("no metrics.csv in the folders")
    if curves:
        figures["curves"] = curves
        curves_body = document.image(curves, "training curves")
    run_rows = [_run_row(run) for run in runs]
    sections = [
        ("runs", "Runs", document.table(run_rows, list(run_rows[0]))),
        ("perplexity", "Held-out perplexity", _perplexity(records, problems)),
        ("speed", "Speed and size", _speed_and_size(runs)),
        ("masks", "What the masks keep", "".join(masks_body)),
        ("curves", "Training curves", curves_body),
        ("config", "Resolved config", _configs(runs)),
        ("protocol", "Evaluation protocol", _protocol(records)),
    ]
    ours = output.is_file()  # checked above: an existing output is a report we wrote
    pngs = {output.parent / f"{output.stem}_{name}.png": png for name, png in figures.items()}
    for path in pngs:
        check_output_file(path, "--output", lambda _: ours, f"a figure of report '{output}'")
    for path, png in pngs.items():
        write_file_atomic(path, png)
    write_file_atomic(output, document.page(title, sections).encode())
    return output


def _mask_view(run: RunData) -> tuple[str, bytes | None]:
    try:
        summary = summarize(run)
    except (LightningPruneError, OSError, ValueError) as err:
        return document.note(f"mask view unavailable: {err}"), None
    if summary is None:
        return document.note("no checkpoint or export to read the mask from"), None
    if isinstance(summary, NMSummary):
        return "", nm_figure(summary, run.metrics, run.name)
    return "", structured_figure(summary, run.metrics, run.name)


def _run_row(run: RunData) -> dict[str, Any]:
    config = yaml.safe_load(run.config_text) if run.config_text else {}
    model = (config or {}).get("model") or {}
    if run.kind == "export":  # pruning.json names what made the export
        record = run.exports[run.path.name]
        model = {
            "model": record.get("source_model"),
            "mask_family": record.get("mask_family"),
            "solver": record.get("method"),
            "init_mask": record.get("init_mask"),
        }
    steps = [step for series in run.metrics.values() for step, _ in series]
    return {
        "run": run.name,
        "kind": run.kind,
        "folder": str(run.path),
        "model": model.get("model"),
        "mask family": _class_name(model.get("mask_family")),
        "solver": _class_name(model.get("solver")),
        "init_mask": _class_name(model.get("init_mask")),
        "steps logged": max(steps) + 1 if steps else None,
        "checkpoint": str(run.checkpoint) if run.checkpoint else None,
        "evaluate records": len(run.records),
    }


def _class_name(spec: Any) -> str | None:
    if isinstance(spec, dict):
        spec = spec.get("class_path")
    return spec.rsplit(".", 1)[-1] if isinstance(spec, str) else spec


def _perplexity(records: dict[str, dict[str, Any]], problems: list[str]) -> str:
    if not records:
        return document.note(
            "no evaluate record in the run folders; write one with `lightning-prune evaluate "
            "... --output RUN_DIR/evaluation.json`"
        )
    rows, columns = joint_rows(records)
    intro = "<p>Lower is better. Rows come from the evaluate records found in the folders.</p>"
    warnings = "".join(document.note(f"mixed protocols: {p}") for p in problems)
    return intro + warnings + document.table(rows, columns)


def _speed_and_size(runs: list[RunData]) -> str:
    sizes: list[dict[str, Any]] = []
    speed: list[dict[str, Any]] = []
    files: list[dict[str, Any]] = []
    for run in runs:
        for folder, record in run.exports.items():
            params = record.get("parameters") or {}
            sparsity = record.get("sparsity") or {}
            sizes.append(
                {
                    "run": run.name,
                    "export": folder,
                    "pattern": record.get("pattern"),
                    "dense parameters": params.get("dense"),
                    "pruned parameters": params.get("pruned"),
                    "removed share": _percent(params.get("removed_share")),
                    "mean sparsity of pruned modules": _percent(
                        sum(sparsity.values()) / len(sparsity) if sparsity else None
                    ),
                    "pruned shape": str(record.get("pruned_shape") or ""),
                }
            )
        for name, payload in run.speed.items():
            speed.extend(_speed_row(f"{run.name}: {name}", row) for row in payload["rows"])
        for name, payload in run.inference.items():
            files.extend(_inference_row(f"{run.name}: {name}", r) for r in payload["results"])
    parts = []
    if sizes:
        parts.append(document.table(sizes, list(sizes[0])))
    if files:
        parts.append(
            "<p>Files, loading and speed of each export (tools/bench_inference.py; medians, "
            "speed-ups against dense at the largest batch and length measured).</p>"
        )
        parts.append(document.table(files, list(files[0])))
    if speed:
        parts.append("<p>Tokens per second (tools/bench_speed.py), dense → pruned.</p>")
        parts.append(document.table(speed, list(speed[0])))
    return "".join(parts) or document.note(
        "no export (pruning.json) or speed benchmark JSON (tools/bench_speed.py or "
        "tools/bench_inference.py --output) found"
    )


def _inference_row(label: str, result: dict[str, Any]) -> dict[str, Any]:
    """One ``bench_inference.py`` variant: size, load, memory, speed at its largest cell."""
    rows = result.get("rows") or [{}]
    last = max(rows, key=lambda r: (r.get("batch", 0), r.get("length", 0)))
    speedup = {p: last.get(f"{p}_speedup") for p in ("prefill", "decode")}
    return {
        "record": label,
        "variant": result.get("variant"),
        "file MB": f"{result['file_bytes'] / 2**20:.1f}",
        "× dense file": f"{result.get('file_ratio', float('nan')):.3f}",
        "load s": f"{result.get('load_s', float('nan')):.2f}",
        "peak MB": f"{result.get('peak_mb', float('nan')):.0f}",
        "prefill / decode speed-up": " / ".join(
            "–" if v is None else f"{v:.2f}x" for v in speedup.values()
        ),
        "FLOP bound": "–" if last.get("flop_bound") is None else f"{last['flop_bound']:.2f}x",
        "speed-up expected": result.get("speedup_expected", ""),
    }


def _speed_row(label: str, row: dict[str, Any]) -> dict[str, Any]:
    """One ``bench_speed.py`` row as the README shows it: dense → pruned, speed-ups."""
    shown: dict[str, Any] = {"record": label, "batch": row.get("batch")}
    shown["prompt length"] = row.get("length")
    for phase in ("prefill", "decode"):
        dense, pruned = row.get(f"dense_{phase}_tok_s"), row.get(f"pruned_{phase}_tok_s")
        shown[f"{phase} tok/s dense → pruned"] = f"{dense:.1f} → {pruned:.1f}"
        shown[f"{phase} speed-up"] = f"{row.get(f'{phase}_speedup'):.2f}x"
    shown["FLOP bound"] = f"{row.get('flop_speedup_bound'):.2f}x"
    return shown


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.1f}%"


def _configs(runs: list[RunData]) -> str:
    parts = []
    for run in runs:
        text = run.config_text or "(no config.yaml found)"
        parts.append(
            f"<details open><summary>{html.escape(run.name)}</summary>"
            f"<pre>{html.escape(text)}</pre></details>"
        )
    return "".join(parts)


def _protocol(records: dict[str, dict[str, Any]]) -> str:
    if not records:
        return document.note("no evaluate record, so no protocol to show")
    intro = (
        "<p>Numbers compare only where source, token hash, sequence length, stride, token count "
        "and metric agree.</p>"
    )
    return intro + document.protocol_tables(records)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"
