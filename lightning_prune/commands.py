"""The work behind the ``export`` and ``evaluate`` subcommands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from lightning_prune.checkpoints import load_learned_state, read_checkpoint_header
from lightning_prune.data.datamodule import CalibrationDataModule
from lightning_prune.errors import ConfigError, MissingPathError
from lightning_prune.evaluation import format_table, perplexity, write_json
from lightning_prune.export.atomic import check_output_file, check_target
from lightning_prune.export.base import casting_formats, exporter_for
from lightning_prune.masks.init import MaskInitializer, one_shot_applied
from lightning_prune.module import PruningModule
from lightning_prune.protocol import (
    check_comparable,
    evaluation_record,
    heldout_protocol,
    is_record,
    joint_rows,
    load_record,
)
from lightning_prune.registry import get_registry


def run_export(
    module: PruningModule,
    ckpt_path: str | None,
    output_dir: str,
    export_format: str,
    overwrite: bool,
    run_config: dict[str, Any] | None = None,
    dtype: str | None = None,
) -> Path:
    """Load the fit checkpoint, then write the export of ``export_format`` (the exporter
    registered under that name, refused if it does not support the run's mask family).

    ``dtype`` casts the written weights (only formats whose exporter ``casts_dtype``).
    """
    exporter = exporter_for(export_format, module.mask_family)
    if ckpt_path is None:
        raise ConfigError("ckpt_path: export needs a fit checkpoint (--ckpt_path)")
    if dtype is not None and not exporter.casts_dtype:
        raise ConfigError(
            f"dtype: only --format {', '.join(casting_formats())} casts at export; "
            f"--format {export_format} writes the model's dtype (set --model.dtype)"
        )
    check_target(output_dir, overwrite, export_inputs(module, ckpt_path))
    load_learned_state(module, ckpt_path)
    path = exporter.export(module, output_dir, overwrite, run_config, dtype)
    print(f"exported {export_format} model to {path}")
    return path


def export_inputs(module: PruningModule, ckpt_path: str) -> list[tuple[str, Path]]:
    """The export's inputs that ``output_dir`` must not replace: the model folder (embedded
    models and hub ids live in the caches, which are always protected) and the checkpoint."""
    inputs = [("the checkpoint (ckpt_path)", Path(ckpt_path))]
    if Path(module.model_name).expanduser().exists():
        inputs.append(("the model folder (model.model)", Path(module.model_name).expanduser()))
    return inputs


def check_checkpoint_early(module: PruningModule, ckpt_path: str | Path) -> None:
    """Refuse a missing checkpoint, or one made for another model or mask, before any work."""
    if not Path(ckpt_path).exists():
        raise MissingPathError(f"ckpt_path: '{ckpt_path}' does not exist")
    header = read_checkpoint_header(ckpt_path)
    if not isinstance(header, dict):
        raise ConfigError(f"ckpt_path: '{ckpt_path}' is not a lightning-prune checkpoint")
    module.check_checkpoint(header)


def _is_evaluation_record(path: Path) -> bool:
    """Whether ``path`` holds a record written by ``evaluate --output`` (it may be replaced)."""
    try:
        return is_record(json.loads(path.read_bytes()))
    except (OSError, ValueError):
        return False


def run_evaluate(
    module: PruningModule,
    datamodule: CalibrationDataModule,
    ckpt_path: str | None,
    sources: list[str] | None,
    baselines: list[str],
    exported: list[str],
    dense: bool,
    output: str | None,
    compare: list[str] | None = None,
    allow_mixed_protocols: bool = False,
) -> dict[str, Any]:
    """Held-out perplexity of dense, one-shot baselines, the learned mask and exported models.

    The result holds the rows and the protocol of every source (see ``protocol.py``); with
    ``compare``, earlier records are checked against it and shown in one table.
    """
    from transformers import AutoModelForCausalLM

    earlier = {path: load_record(path) for path in compare or []}  # fail before the work
    if output:
        check_output_file(output, "output", _is_evaluation_record, "an evaluate record")
    module.configure_model()
    if ckpt_path is not None:  # checked now, loaded after the dense and baseline rows
        check_checkpoint_early(module, ckpt_path)
    registry = get_registry()
    for name in baselines:
        registry.info("initializers", name)
    windows, protocols = {}, []
    for source in sources or [datamodule.source]:
        splits = datamodule.load_splits(source)
        windows[source] = datamodule.heldout_windows(splits)
        protocols.append(heldout_protocol(datamodule, source, windows[source], splits.fingerprint))

    def loaded() -> torch.nn.Module:
        assert module.model is not None, "configure_model() builds the model"
        return module.model

    def measure(label: str, model: torch.nn.Module) -> dict[str, Any]:
        row: dict[str, Any] = {"model": label}
        for source, tokens in windows.items():
            row[source] = perplexity(model, tokens, desc=f"{label} / {source}")
        print(format_table([row], ["model", *windows]).splitlines()[-1], flush=True)
        return row

    family, rows = module.mask_family, []
    if dense:
        family.set_mode("off")
        rows.append(measure("dense", loaded()))
    for name in baselines:
        initializer: MaskInitializer = registry.get("initializers", name)()
        batches = datamodule.train_dataloader() if initializer.needs_data else None
        update = initializer.compute_update(loaded(), family, batches)
        with one_shot_applied(family, update):  # SparseGPT's weights, FLAP's biases; restored
            rows.append(measure(name, loaded()))
    if ckpt_path is not None:  # a one-shot checkpoint may replace W0s and biases (SparseGPT, FLAP)
        load_learned_state(module, ckpt_path)
        family.harden()
        rows.append(measure(f"learned ({Path(ckpt_path).name})", loaded()))
    for folder in exported:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=loaded().dtype).eval()
        rows.append(measure(f"exported ({folder})", model))
    print("\nheld-out perplexity (lower is better)")
    print(format_table(rows, ["model", *windows]))
    result = evaluation_record(module, datamodule, rows, protocols, ckpt_path, exported, baselines)
    if output:
        write_json(output, result)
        print(f"wrote {output}")
    if earlier:
        records = {f"{output or ''} (this evaluation)".strip(): result, **earlier}
        for problem in check_comparable(records, allow_mixed_protocols):
            print(f"warning: mixed protocols: {problem}", file=sys.stderr)
        print("\ncompared with earlier records (held-out perplexity)")
        print(format_table(*joint_rows(records)))
    return result
