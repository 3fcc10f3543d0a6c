"""Find and read what a run folder or an export folder holds: logs, config, records, checkpoint."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_prune.errors import LightningPruneError
from lightning_prune.protocol import is_record

#: JSON files of a Hugging Face folder, never evaluation or benchmark records
_HF_FILES = {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "pruning.json",
}
_MAX_JSON_BYTES = 4_000_000


class ReportError(LightningPruneError):
    """A report input is missing or unreadable."""


@dataclass
class RunData:
    """Everything the report shows about one run folder or export folder."""

    name: str
    path: Path
    kind: str  # "run" (fit folder) or "export" (exported HF folder)
    log_dir: Path | None = None
    config_text: str = ""
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    checkpoint: Path | None = None
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # by path in the folder
    speed: dict[str, dict[str, Any]] = field(default_factory=dict)
    inference: dict[str, dict[str, Any]] = field(default_factory=dict)  # bench_inference.py
    exports: dict[str, dict[str, Any]] = field(default_factory=dict)  # pruning.json by folder


def load_run(path: str | Path) -> RunData:
    """Read a fit run folder (``default_root_dir``), one of its log folders, or an export."""
    root = Path(path)
    if not root.is_dir():
        raise ReportError(f"run folder '{root}': does not exist or is not a folder")
    resolved = root.resolve()
    name = resolved.name
    if resolved.parent.name == "lightning_logs":  # a version folder: name it by its run
        name = f"{resolved.parent.parent.name}/{name}"
    run = RunData(name=name, path=root, kind="run")
    if (root / "pruning.json").is_file():
        run.kind = "export"
        run.exports[root.name] = _read_json(root / "pruning.json")
        config = run.exports[root.name].get("config") or {}
        run.config_text = json.dumps(config, indent=2) if config else ""
    else:
        _read_logs(run, root)
    _read_json_files(run, root)
    if not (run.log_dir or run.records or run.exports or run.speed or run.inference):
        raise ReportError(
            f"run folder '{root}': found no fit log folder (metrics.csv, config.yaml or "
            "checkpoints/), no pruning.json and no evaluate or benchmark JSON; expected a fit's "
            "trainer.default_root_dir, one of its log folders, or an exported model folder"
        )
    return run


def _read_logs(run: RunData, root: Path) -> None:
    markers = [*root.rglob("metrics.csv"), *root.rglob("config.yaml"), *root.rglob("checkpoints")]
    folders = sorted({p.parent for p in markers}, key=lambda p: p.stat().st_mtime)
    if not folders:
        return
    run.log_dir = folders[-1]  # the newest fit when the folder holds several versions
    metrics = run.log_dir / "metrics.csv"  # absent when a fit logged nothing (one-shot)
    run.metrics = read_metrics(metrics) if metrics.is_file() else {}
    config = run.log_dir / "config.yaml"
    run.config_text = config.read_text() if config.is_file() else ""
    checkpoints = run.log_dir / "checkpoints"
    last = checkpoints / "last.ckpt"
    others = sorted(checkpoints.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    # a file, or a folder for sharded (FSDP2) checkpoints: load_learned_state reads both
    run.checkpoint = last if last.exists() else (others[-1] if others else None)
    if run.checkpoint is not None:
        _check_checkpoint(run.checkpoint)


def _check_checkpoint(path: Path) -> None:
    """Refuse, before anything is drawn or written, a run checkpoint that is unreadable, not
    safe to read (a sharded folder failing verification) or holds non-finite learned state."""
    from lightning_prune.checkpoints import check_checkpoint_usable

    try:
        check_checkpoint_usable(path)
    except LightningPruneError as err:
        raise ReportError(f"run checkpoint refused: {err}") from err


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Columns of a Lightning ``metrics.csv`` as ``(step, value)`` series (blank cells skipped)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            step = _step(row.get("step"), path, line)
            for column, cell in row.items():
                if column in ("step", "epoch") or cell in ("", None):
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    continue
                if math.isfinite(value):
                    series.setdefault(column, []).append((step, value))
    return series


def _step(cell: str | None, path: Path, line: int) -> int:
    """The ``step`` cell of one ``metrics.csv`` row as an integer (blank: 0)."""
    try:
        step = float(cell or 0)
    except ValueError:
        step = math.nan
    if not math.isfinite(step):
        raise ReportError(f"'{path}' line {line}: step {cell!r} is not a number")
    return int(step)


def _read_json_files(run: RunData, root: Path) -> None:
    for path in sorted(root.rglob("*.json")):
        if path.stat().st_size > _MAX_JSON_BYTES:
            continue
        relative = str(path.relative_to(root))
        if path.name == "pruning.json" and path.parent != root:
            run.exports[str(path.parent.relative_to(root))] = _read_json(path)
        if path.name in _HF_FILES:
            continue
        try:
            payload = _read_json(path)
        except ReportError:
            continue  # an unrelated file of the folder; records are JSON
        if is_record(payload):
            run.records[relative] = payload
        elif is_speed(payload):
            run.speed[relative] = payload
        elif is_inference(payload):
            run.inference[relative] = payload


def is_speed(payload: Any) -> bool:
    """Whether ``payload`` is the JSON of ``tools/bench_speed.py``."""
    return (
        isinstance(payload, dict)
        and isinstance(payload.get("rows"), list)
        and isinstance(payload.get("params"), dict)
        and all(isinstance(r, dict) and "prefill_speedup" in r for r in payload["rows"])
    )


def is_inference(payload: Any) -> bool:
    """Whether ``payload`` is the JSON of ``tools/bench_inference.py``."""
    return (
        isinstance(payload, dict)
        and isinstance(payload.get("results"), list)
        and all(isinstance(r, dict) and "file_bytes" in r for r in payload["results"])
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ReportError(f"'{path}': not readable JSON ({err})") from err


def unique_names(runs: list[RunData]) -> None:
    """Make run names unique by prefixing parent folders where two runs share a name."""
    for depth in range(1, 8):
        names = [r.name for r in runs]
        clashes = {n for n in names if names.count(n) > 1}
        if not clashes:
            return
        for run in runs:
            if run.name in clashes:
                parts = run.path.resolve().parts
                run.name = "/".join(parts[-depth - 1 :])
