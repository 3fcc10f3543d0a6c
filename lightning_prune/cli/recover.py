"""``lightning-prune recover``: a Lightning fit of ``lightning_prune.recovery.RecoveryModule``,
then its export (with the same resume state, numeric checks and atomic checkpoints as mask
learning)."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser

from lightning_prune.cli.common import BaseCLI, BaseTrainer, check_writable
from lightning_prune.data.datamodule import CalibrationDataModule
from lightning_prune.export.atomic import check_target
from lightning_prune.recovery import RecoveryModule


class RecoveryCLI(BaseCLI):
    """The ``recover`` command line: :class:`RecoveryModule` and the calibration data."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.export_dir", "data.tokenizer")


def recover_main(args: list[str]) -> None:
    """Run ``lightning-prune recover ARGS`` (see ``lightning-prune recover --help``)."""
    cli = RecoveryCLI(
        RecoveryModule,
        CalibrationDataModule,
        trainer_class=BaseTrainer,
        args=args,
        run=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "description": "Recovery fine-tuning of an exported pruned model (LoRA or full), "
            "merged and written as a new verified export."
        },
    )
    run_folder = ("the run folder (trainer.default_root_dir)", Path(cli.trainer.default_root_dir))
    cli.model.protected.append(run_folder)  # it holds the recovery's checkpoints
    check_target(cli.model.output_dir, cli.model.overwrite, cli.model.protected)
    check_writable(cli.trainer.default_root_dir, "trainer.default_root_dir")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if cli.trainer.is_global_zero:
        path = cli.model.write_export(cli.trainer.global_step)
        print(f"recovered model written to {path}")
