"""Calibration and evaluation text."""

from lightning_prune.data.datamodule import CalibrationDataModule
from lightning_prune.data.streaming import StreamingConfig, StreamSource

__all__ = ["CalibrationDataModule", "StreamSource", "StreamingConfig"]
