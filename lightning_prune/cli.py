"""``lightning-prune``: one ``LightningCLI`` for fit, validate, export, evaluate and plugins."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from lightning_prune.callbacks import NumericGuard, ResumeState
from lightning_prune.checkpoint_io import SafeCheckpointIO
from lightning_prune.checkpoints import check_stored_hyperparameters
from lightning_prune.cli_names import install_short_names
from lightning_prune.commands import run_evaluate, run_export
from lightning_prune.data.datamodule import CalibrationDataModule
from lightning_prune.errors import ConfigError, LightningPruneError, debug_requested
from lightning_prune.launch_checks import check_trainer_config
from lightning_prune.loggers import ClaimedVersionCSVLogger
from lightning_prune.module import PruningModule
from lightning_prune.registry import get_registry


class PruningTrainer(Trainer):
    """Lightning's ``Trainer`` plus the export and evaluate subcommands."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's ``Trainer``; the default logger is CSV (``trainer.logger`` picks others).

        Lightning's own default switches to TensorBoard whenever it is installed; the CSV
        files under ``default_root_dir/lightning_logs`` are what ``report`` reads. Its
        ``version_N`` folder is claimed atomically, so fits started at once in one
        ``default_root_dir`` never share (and overwrite) a log folder.
        """
        if kwargs.get("logger") in (None, True):
            root = kwargs.get("default_root_dir") or os.getcwd()
            kwargs["logger"] = ClaimedVersionCSVLogger(root)
        super().__init__(*args, **kwargs)

    def fit(
        self,
        model: PruningModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
        weights_only: bool | None = True,
    ) -> None:
        """Learn the mask; ``ckpt_path`` resumes a killed fit: a file, or ``last`` for the
        newest ``last.ckpt`` under ``default_root_dir`` (none there: a fresh start).

        Checkpoints are always read with ``weights_only=True``.
        """
        check_writable(self.default_root_dir, "trainer.default_root_dir")
        if ckpt_path == "last":
            ckpt_path = newest_last_checkpoint(self.default_root_dir) or ckpt_path
            if ckpt_path != "last":  # checked as a named checkpoint is (in before_fit)
                model.check_resume(ckpt_path, self)
        super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, True)

    def export(
        self,
        model: PruningModule,
        datamodule: CalibrationDataModule | None = None,
        ckpt_path: str | None = None,
        output_dir: str = "exports/pruned",
        format: str = "hf",
        overwrite: bool = False,
        dtype: str | None = None,
    ) -> None:
        """Export the pruned model of a fit checkpoint (formats: hf, compressed-nm).

        Args:
            ckpt_path: fit checkpoint to export.
            output_dir: folder to write (atomically; refused if it exists unless overwrite).
            format: ``hf``: a dense HF checkpoint (N:M: exact zeros; structured: a smaller
                model); ``compressed-nm``: N:M weights as kept values plus 2-bit positions
                (docs/compressed-nm.md), loaded with ``lightning_prune.load_pretrained``.
            overwrite: replace an existing ``output_dir``.
            dtype: write the weights as ``float16``/``bfloat16``/``float32``
                (``compressed-nm`` only; default: the model's dtype).
        """
        run_export(
            model,
            ckpt_path,
            output_dir,
            format,
            overwrite,
            getattr(self, "run_config", None),
            dtype,
        )

    def evaluate(
        self,
        model: PruningModule,
        datamodule: CalibrationDataModule,
        ckpt_path: str | None = None,
        sources: list[str] | None = None,
        baselines: list[str] | None = None,
        exported: list[str] | None = None,
        dense: bool = True,
        output: str | None = None,
        compare: list[str] | None = None,
        allow_mixed_protocols: bool = False,
    ) -> None:
        """Held-out perplexity of the dense model, baselines, a checkpoint and exports.

        Args:
            ckpt_path: fit checkpoint whose learned mask is evaluated.
            sources: text sources to evaluate on (default: the data source).
            baselines: one-shot initializer plugins to evaluate (e.g. ``magnitude``).
            exported: exported model folders to evaluate with plain transformers.
            dense: also evaluate the dense model.
            output: JSON file for the results and the protocol.
            compare: earlier ``evaluate`` JSON records to show next to this one; refused when
                their protocol differs on a shared source.
            allow_mixed_protocols: compare records made with different protocols anyway.
        """
        run_evaluate(
            model,
            datamodule,
            ckpt_path,
            sources,
            baselines or [],
            exported or [],
            dense,
            output,
            compare or [],
            allow_mixed_protocols,
        )


class PruneCLI(LightningCLI):
    """The lightning-prune command line (see ``lightning-prune --help``)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's ``fit`` and ``validate`` plus ``export`` and ``evaluate`` (``test`` and
        ``predict`` have nothing to do here: a pruning run has no test set or predictions)."""
        lightning = LightningCLI.subcommands()
        return {
            "fit": lightning["fit"],
            "validate": lightning["validate"],
            "export": {"model", "datamodule"},
            "evaluate": {"model", "datamodule"},
        }

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured trainer plus what every run needs unless configured otherwise:
        RNG state in checkpoints, numeric fault checks and atomic checkpoint files."""
        config = self._get(self.config_init, "trainer", default={})
        check_trainer_config(config)  # strategy / devices / nodes, before any process starts
        callbacks = _as_list(config.get("callbacks"))
        callbacks += [
            default()
            for default in (ResumeState, NumericGuard)
            if not any(isinstance(callback, default) for callback in callbacks)
        ]
        plugins = _as_list(config.get("plugins"))
        if isinstance(config.get("strategy", "auto"), str) and not any(
            isinstance(plugin, CheckpointIO) for plugin in plugins
        ):
            plugins.append(SafeCheckpointIO())
        return super().instantiate_trainer(callbacks=callbacks, plugins=plugins, **kwargs)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would merge the checkpoint's stored hyperparameters over the command
        # line; here the command line decides and a contradiction is an error. The checkpoint
        # is read through the guarded reader (sharded folders verified) before anything else.
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and Path(path).exists():
            model = self.config[subcommand].get("model")
            check_stored_hyperparameters(path, model.as_dict() if model is not None else {})

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model", "data.tokenizer")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")

    def before_fit(self) -> None:
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path:  # a checkpoint this strategy cannot reshard: refused before launching
            self.model.check_resume(ckpt_path, self.trainer)

    def before_validate(self) -> None:
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path:
            self.model.check_resume(ckpt_path, self.trainer, resume=False)

    def before_export(self) -> None:
        config = self.config[self.subcommand]
        self.trainer.run_config = _to_plain(config.as_dict())


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def newest_last_checkpoint(root: str | Path) -> str | None:
    """The most recently written ``last.ckpt`` below ``root`` (earlier runs' log versions)."""
    found = sorted(Path(root).glob("**/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return str(found[-1]) if found else None


def check_writable(folder: str | Path, field: str) -> None:
    """Raise ``ConfigError`` naming ``field`` unless files can be created in ``folder``."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise ConfigError(f"{field}: cannot write to '{path}' ({reason})") from err


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


#: seconds ``lightning-prune plugins`` waits for one plugin's import by default
PLUGIN_IMPORT_TIMEOUT = 30.0


def print_plugins(argv: list[str]) -> int:
    """Print every plugin found: kind, name, class, distribution, version, status.

    Each plugin is imported with a time limit (``--timeout``): one whose import does not finish
    in time is listed as hanging rather than hanging the listing.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-prune plugins", description="List every installed plugin."
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=PLUGIN_IMPORT_TIMEOUT,
        help="seconds to wait for each plugin's import (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if not args.timeout > 0:
        parser.error(f"--timeout: expected a positive number of seconds, got {args.timeout}")
    registry = get_registry()
    registry.load_all(timeout=args.timeout)
    conflicts = registry.conflicts()
    rows = [("kind", "name", "class", "distribution", "version", "status")]
    for info in registry.infos():
        if info.error:
            status = f"BROKEN: {info.error}"
        elif (info.kind, info.name) in conflicts:
            status = "CONFLICT: name claimed by several distributions"
        else:
            status = "ok"
        rows.append(
            (info.kind, info.name, info.class_path, info.distribution, info.version, status)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[5], flush=True)
    return 0


def main(args: list[str] | None = None) -> None:
    """Console-script entry point.

    ``lightning-prune --debug COMMAND ...`` (or ``LIGHTNING_PRUNE_DEBUG=1``) prints the
    traceback of a user error before its one-line message.
    """
    argv = sys.argv[1:] if args is None else list(args)
    debug = argv[:1] == ["--debug"]
    if debug:
        argv = argv[1:]
    if argv[:1] == ["plugins"]:
        raise SystemExit(print_plugins(argv[1:]))
    if argv[:1] == ["report"]:
        from lightning_prune.report.command import main as report_main

        raise SystemExit(report_main(argv[1:], debug))
    if argv[:1] == ["lm-eval"]:  # optional extra: lightning-prune[lm-eval]
        from lightning_prune.lm_eval_adapter import main as lm_eval_main

        raise SystemExit(lm_eval_main(argv[1:]))
    install_short_names()
    try:
        if argv[:1] == ["recover"]:
            from lightning_prune.recovery import recover_main

            recover_main(argv[1:])
        else:
            _run_cli(None if args is None and not debug else argv)
    except Exception as err:
        ours = _our_error(err)
        if ours is None:
            raise
        if debug or debug_requested():  # the whole chain, from the library error up
            traceback.print_exception(err, file=sys.stderr)
        print(f"lightning-prune: error: {ours}", file=sys.stderr)
        raise SystemExit(2) from None


def _our_error(err: BaseException | None) -> LightningPruneError | None:
    """``err`` or the error it wraps (jsonargparse wraps errors raised in ``__init__``)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, LightningPruneError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


#: ``lightning-prune --help``: the commands parsed outside LightningCLI are listed here too
DESCRIPTION = (
    "Learn pruning masks for causal LMs. Commands: fit (learn a mask), validate, export (write "
    "the pruned model), evaluate (held-out perplexity); and, each with its own --help: "
    "plugins (list the installed plugins), report (HTML report of a run or export), recover "
    "(LoRA recovery fine-tuning of an export), lm-eval (lm-evaluation-harness on an export, "
    "optional extra lightning-prune[lm-eval]). --debug before a command shows tracebacks."
)


def _run_cli(args: list[str] | None) -> None:
    PruneCLI(
        PruningModule,
        CalibrationDataModule,
        trainer_class=PruningTrainer,
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION},
    )
