"""Shared by the benchmarks: the calibration data with its held-out sets, and a one-epoch fit."""

from __future__ import annotations

import argparse
import time

import torch
from lightning.pytorch import LightningModule, Trainer

from lightning_prune.data import CalibrationDataModule


def calibration_parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser (described by ``doc``'s first line) with the model and the
    calibration and held-out sizes every 2:4 benchmark takes."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=40, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    return parser


def calibration_data(
    model: str, samples: int, seq_len: int, eval_tokens: int
) -> tuple[CalibrationDataModule, dict[str, torch.Tensor]]:
    """Wikipedia calibration windows, and held-out windows of Wikipedia and Shakespeare."""
    data = CalibrationDataModule(
        source="wikipedia",
        tokenizer=model,
        seq_len=seq_len,
        num_samples=samples,
        eval_tokens=eval_tokens,
    )
    data.setup()
    sources = {"wikipedia": data.heldout_windows()}
    sources["shakespeare"] = data.heldout_windows(data.load_splits("shakespeare"))
    return data, sources


def cpu_trainer(epochs: int = 1, progress_bar: bool = False, max_steps: int = -1) -> Trainer:
    """A one-device CPU trainer that logs, validates and saves nothing."""
    return Trainer(
        max_epochs=epochs,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
    )


def fit_one_epoch(
    module: LightningModule, data: CalibrationDataModule, progress_bar: bool = False
) -> float:
    """One epoch over the calibration windows on CPU, nothing logged or saved; returns seconds."""
    trainer = cpu_trainer(progress_bar=progress_bar)
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return time.perf_counter() - started
