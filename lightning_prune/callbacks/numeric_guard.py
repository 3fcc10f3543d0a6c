"""Catch NaN and inf in the loss, the gradients and the learnable masks at the step they appear."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from lightning_prune.errors import ConfigError, LightningPruneError


class NumericalFaultError(LightningPruneError, FloatingPointError):
    """A NaN or inf appeared in the loss, a gradient or a mask."""


class NumericGuard(Callback):
    """Checks every step for non-finite values and names where they came from.

    A non-finite loss is traced to the first module whose output is non-finite (the batch is run
    again with forward hooks); a non-finite gradient or mask is named by its parameter.

    Args:
        on_fault: ``stop`` raises :class:`NumericalFaultError` before the step's checkpoint is
            written, so the last good checkpoint stays the newest; ``skip`` drops the batch: the
            learnable parameters and optimizer state stay as they were (the learning-rate
            schedule still advances), and the run stops after ``max_skips`` skipped steps.
        max_skips: skipped steps allowed in ``skip`` mode before the run stops.
    """

    def __init__(self, on_fault: Literal["stop", "skip"] = "stop", max_skips: int = 10):
        if on_fault not in ("stop", "skip"):
            raise ConfigError(
                f"NumericGuard.on_fault: expected 'stop' or 'skip', got {on_fault!r}"
            )
        if not isinstance(max_skips, int) or max_skips < 0:
            raise ConfigError(
                f"NumericGuard.max_skips: expected an integer >= 0, got {max_skips!r}"
            )
        self.on_fault, self.max_skips = on_fault, max_skips
        self.skipped = 0
        self._batch: Any = None
        self._fault: str | None = None
        self._snapshot: dict[str, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch, self._fault, self._snapshot = batch, None, None

    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor
    ) -> None:
        if not torch.isfinite(loss.detach()).all():
            where = first_nonfinite_module(pl_module, self._batch)
            self._fault = f"loss is {loss.item()} at step {trainer.global_step}" + (
                f"; the first non-finite output is from {where}" if where else ""
            )

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._fault is None:
            bad = _first_nonfinite(
                (name, p.grad) for name, p in _learnable(pl_module) if p.grad is not None
            )
            if bad:
                self._fault = f"gradient of {bad} is not finite at step {trainer.global_step}"
        if self._fault is None:
            return
        self._handle(trainer)
        self._snapshot = {name: p.detach().clone() for name, p in _learnable(pl_module)}
        for _, param in _learnable(pl_module):
            param.grad = None  # torch optimizers leave parameters without a gradient untouched

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._snapshot is not None:  # a skipped step: undo what ran after the optimizer
            with torch.no_grad():
                for name, param in _learnable(pl_module):
                    param.copy_(self._snapshot[name])
            self._snapshot = None
            return
        bad = _first_nonfinite((name, p) for name, p in _learnable(pl_module))
        if bad:
            raise NumericalFaultError(
                f"mask parameter {bad} is not finite after step {trainer.global_step}; the run "
                "stopped before writing a checkpoint of this step"
            )

    def _handle(self, trainer: Trainer) -> None:
        if self.on_fault == "stop":
            raise NumericalFaultError(
                f"{self._fault}; the run stopped before writing a checkpoint of this step "
                "(NumericGuard on_fault: skip drops such batches instead)"
            )
        self.skipped += 1
        if self.skipped > self.max_skips:
            raise NumericalFaultError(
                f"{self._fault}; {self.skipped} steps skipped, more than max_skips "
                f"{self.max_skips}"
            )
        rank_zero_warn(f"NumericGuard: skipping the step: {self._fault}")


def _learnable(pl_module: LightningModule) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]


def _first_nonfinite(named: Any) -> str | None:
    for name, tensor in named:
        if not torch.isfinite(tensor.detach()).all():
            return _short_name(name)
    return None


def _short_name(name: str) -> str:
    """``model.model.layers.3.mlp.up_proj.parametrizations.weight.0.logits`` → readable form."""
    module, sep, rest = name.partition(".parametrizations.")
    return f"{module.removeprefix('model.')} ({rest})" if sep else name.removeprefix("model.")


def first_nonfinite_module(pl_module: LightningModule, batch: Any) -> str | None:
    """Run ``batch`` again and return the first module (in call order) with a non-finite output."""
    model: torch.nn.Module | None = getattr(pl_module, "model", None)
    if batch is None or model is None:
        return None
    found: list[str] = []

    def hook(name: str):
        def check(module: torch.nn.Module, args: Any, output: Any) -> None:
            if not found and any(
                isinstance(t, torch.Tensor) and t.is_floating_point() and not _finite(t)
                for t in _tensors(output)
            ):
                found.append(name)

        return check

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if name and not name.endswith("parametrizations") and ".parametrizations." not in name
    ]
    try:
        with torch.no_grad():
            pl_module(batch["input_ids"], batch.get("labels"))
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def _finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all()) if tensor.numel() else True


def _tensors(output: Any) -> list[Any]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, tuple | list):
        return [t for item in output for t in _tensors(item)]
    if hasattr(output, "values") and callable(output.values):
        return [t for item in output.values() for t in _tensors(item)]
    return []


