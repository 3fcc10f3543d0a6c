"""lm-evaluation-harness tasks on an exported model (optional extra: ``lightning-prune[lm-eval]``).

Any export (``hf`` with exact zeros, ``compressed-nm`` or a structured smaller model) is loaded
with :func:`lightning_prune.loader.load_pretrained` and wrapped in the harness's ``HFLM``; the
result is written as JSON next to the export's ``pruning.json`` record and package versions.

    lightning-prune lm-eval exports/pruned --tasks hellaswag arc_easy --output zero_shot.json

Hub tasks download their data sets, so they need internet; ``--include_path`` adds local task
YAML files (e.g. a ``json`` data set with local ``data_files``), which run offline.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from lightning_prune.errors import ConfigError, LightningPruneError
from lightning_prune.evaluation import format_table, write_json
from lightning_prune.protocol import package_versions

RECORD_KIND = "lightning_prune.lm_eval"


def harness_lm(folder: str | Path, batch_size: int = 1, device: str = "cpu", dtype=None) -> Any:
    """The exported model in ``folder`` as an lm-evaluation-harness ``HFLM``."""
    _require_harness()
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from lightning_prune.loader import load_pretrained

    model = load_pretrained(folder, dtype=dtype, device=device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)


def run_tasks(
    folder: str | Path,
    tasks: list[str],
    include_path: str | None = None,
    include_defaults: bool = True,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run harness ``tasks`` on the export in ``folder``; return a JSON-ready record.

    Args:
        include_path: folder of extra task YAML files (local tasks).
        include_defaults: also index the harness's built-in tasks (slow to index; ``False``
            when only ``include_path`` tasks are run).
        num_fewshot: few-shot examples (``None``: each task's default, zero-shot for most).
        limit: evaluate only this many (or this share of) documents per task.
    """
    if not tasks:
        raise ConfigError("tasks: name at least one lm-evaluation-harness task")
    _require_harness()
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"tasks: {unknown} are not lm-evaluation-harness tasks here (built-in tasks: "
            f"{'indexed' if include_defaults else 'not indexed'}, include_path: {include_path})"
        )
    lm = harness_lm(folder, batch_size, device)
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=False,
    )
    pruning = Path(folder) / "pruning.json"
    return {
        "kind": RECORD_KIND,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": str(folder),
        "tasks": tasks,
        "results": output["results"],
        "n_shot": output.get("n-shot", {}),
        "settings": {"num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size},
        "pruning": json.loads(pruning.read_text()) if pruning.is_file() else None,
        "versions": {**package_versions(), "lm-eval": metadata.version("lm-eval")},
    }


def _require_harness() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise LightningPruneError(
            "lm-evaluation-harness is not installed: pip install 'lightning-prune[lm-eval]'"
        ) from err


def main(argv: list[str]) -> int:
    """``lightning-prune lm-eval EXPORT --tasks ...``; errors exit with status 2."""
    parser = argparse.ArgumentParser(
        prog="lightning-prune lm-eval",
        description="Run lm-evaluation-harness tasks on an exported model folder.",
    )
    parser.add_argument("export", help="exported model folder (any export format)")
    parser.add_argument("--tasks", nargs="+", required=True, help="harness task names")
    parser.add_argument("--include_path", help="folder of extra (local) task YAML files")
    parser.add_argument(
        "--no_default_tasks", action="store_true", help="index only --include_path tasks"
    )
    parser.add_argument("--num_fewshot", type=int)
    parser.add_argument("--limit", type=float, help="documents (or share) per task")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", help="JSON file for the results")
    args = parser.parse_args(argv)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    try:
        record = run_tasks(
            args.export,
            args.tasks,
            args.include_path,
            not args.no_default_tasks,
            args.num_fewshot,
            limit,
            args.batch_size,
            args.device,
        )
    except LightningPruneError as err:
        print(f"lightning-prune: error: {err}", file=sys.stderr)
        return 2
    rows = [
        {"task": task, "metric": name, "value": value}
        for task, metrics in record["results"].items()
        for name, value in metrics.items()
        if isinstance(value, float)
    ]
    print(format_table(rows, ["task", "metric", "value"]))
    if args.output:
        write_json(args.output, record)
        print(f"wrote {args.output}")
    return 0
