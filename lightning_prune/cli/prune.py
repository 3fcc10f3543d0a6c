"""Mask learning's ``LightningCLI``: fit, validate, export and evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_prune.checkpoints import check_stored_hyperparameters
from lightning_prune.cli.common import BaseCLI, BaseTrainer, check_writable, newest_last_checkpoint
from lightning_prune.commands import run_evaluate, run_export
from lightning_prune.data.datamodule import CalibrationDataModule
from lightning_prune.module import PruningModule

#: ``lightning-prune --help``: the commands parsed outside LightningCLI are listed here too
DESCRIPTION = (
    "Learn pruning masks for causal LMs. Commands: fit (learn a mask), validate, export (write "
    "the pruned model), evaluate (held-out perplexity); and, each with its own --help: "
    "plugins (list the installed plugins), report (HTML report of a run or export), recover "
    "(LoRA recovery fine-tuning of an export), lm-eval (lm-evaluation-harness on an export, "
    "optional extra lightning-prune[lm-eval]). --debug before a command shows tracebacks."
)


class PruningTrainer(BaseTrainer):
    """Lightning's ``Trainer`` plus the export and evaluate subcommands."""

    #: the resolved command-line config, for the export's record (set by ``before_export``)
    run_config: dict[str, Any] | None = None

    def fit(
        self,
        model: LightningModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: LightningDataModule | None = None,
        # narrower than Trainer.fit's str | Path: LightningCLI parses this annotation
        ckpt_path: str | None = None,  # type: ignore[override]
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
                assert isinstance(model, PruningModule)  # the model class of this CLI
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
        """Export the pruned model of a fit checkpoint (built-in formats: hf, compressed-nm;
        ``lightning-prune plugins`` lists the installed exporters).

        Args:
            ckpt_path: fit checkpoint to export.
            output_dir: folder to write (atomically; refused if it exists unless overwrite).
            format: a registered exporter. ``hf``: a dense HF checkpoint (N:M: exact zeros;
                structured: a smaller model); ``compressed-nm``: N:M weights as kept values
                plus 2-bit positions (docs/compressed-nm.md), loaded with
                ``lightning_prune.load_pretrained``.
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
            self.run_config,
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


class PruneCLI(BaseCLI):
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
        assert isinstance(self.trainer, PruningTrainer)  # the trainer class of this CLI
        self.trainer.run_config = _to_plain(config.as_dict())


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def prune_main(args: list[str] | None) -> None:
    """Run ``lightning-prune fit|validate|export|evaluate ARGS`` (``None``: ``sys.argv``)."""
    PruneCLI(
        PruningModule,
        CalibrationDataModule,
        trainer_class=PruningTrainer,
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION},
    )
