"""Calibration and evaluation text."""

from lightning_prune.data.datamodule import CalibrationDataModule

__all__ = ["CalibrationDataModule"]
