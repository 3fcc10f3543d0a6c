"""The block-wise objective: learn decoder blocks one after another, each to reproduce its dense
output on the inputs that the already-pruned blocks before it produce.

Block ``i`` trains for ``steps_per_block`` optimizer steps on

    ‖B_i^mask(X_i) − B_i(X_i)‖² / ‖B_i(X_i)‖²   (per sequence, averaged over the batch)

where ``X_i`` is the input of block ``i`` when blocks ``0..i−1`` run with their final hard masks
(``inputs: pruned``, the sequential scheme of SparseGPT and Wanda) or dense (``inputs: dense``),
and ``B_i`` is block ``i`` with its masks off. Every step computes ``X_i`` for its own batch with
one forward of blocks ``0..i−1`` (no gradient, the rest of the model is skipped), so the state
of a run is its step counter: a resumed fit, a DDP rank with its own batches and a fresh run all
see the same inputs, with no cache to rebuild or keep in step.

After the last block, an optional end-to-end phase of ``e2e_steps`` steps learns every block
at once on the language-model loss (plus the solver's own terms), starting from the block-wise
masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lightning_prune.errors import ConfigError

BlockInputs = Literal["pruned", "dense"]


class _Captured(Exception):
    """Stops the model's forward once the learned block's inputs are captured."""


@dataclass
class BlockCall:
    """The positional and keyword arguments one decoder block is called with."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class BlockwiseObjective:
    """Per-block reconstruction loss and the block schedule of a block-wise fit.

    Args:
        steps_per_block: optimizer steps spent on every decoder block.
        inputs: ``pruned`` (blocks before run with their final hard masks) or ``dense``.
        e2e_steps: optimizer steps of the end-to-end phase after the last block (0: none).
    """

    def __init__(self, steps_per_block: int, inputs: BlockInputs = "pruned", e2e_steps: int = 0):
        if not (isinstance(steps_per_block, int) and steps_per_block >= 1):
            raise ConfigError(
                f"model.steps_per_block: expected an integer >= 1, got {steps_per_block!r}"
            )
        if inputs not in ("pruned", "dense"):
            raise ConfigError(f"model.block_inputs: expected 'pruned' or 'dense', got {inputs!r}")
        if not (isinstance(e2e_steps, int) and e2e_steps >= 0):
            raise ConfigError(f"model.e2e_steps: expected an integer >= 0, got {e2e_steps!r}")
        self.steps_per_block, self.inputs, self.e2e_steps = steps_per_block, inputs, e2e_steps

    def total_steps(self, num_blocks: int) -> int:
        """Optimizer steps of the whole fit."""
        return num_blocks * self.steps_per_block + self.e2e_steps

    def block_at(self, step: int, num_blocks: int) -> int | None:
        """The block that optimizer step ``step`` (0-based) learns, or ``None`` in the
        end-to-end phase."""
        index = step // self.steps_per_block
        return index if index < num_blocks else None

    def schedule_span(self, step: int, num_blocks: int) -> tuple[int, int]:
        """``(position, length)`` of ``step`` in its learning-rate schedule: the schedule
        restarts on every block and once more for the end-to-end phase."""
        block_steps = num_blocks * self.steps_per_block
        if step < block_steps:
            return step % self.steps_per_block, self.steps_per_block
        return step - block_steps, max(self.e2e_steps, 1)

    @torch.no_grad()
    def capture(self, model: nn.Module, block: nn.Module, input_ids: torch.Tensor) -> BlockCall:
        """The arguments ``block`` receives when ``model`` runs on ``input_ids``; the blocks
        after it are not run."""
        seen: list[BlockCall] = []

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen.append(BlockCall(tuple(args), dict(kwargs)))
            raise _Captured

        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            model(input_ids=input_ids, use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
        if not seen:
            raise RuntimeError("the decoder block was not called by the model's forward")
        return seen[0]

    @staticmethod
    def run(block: nn.Module, call: BlockCall) -> torch.Tensor:
        """The block's output hidden states for one captured call."""
        output = block(*call.args, **call.kwargs)
        return output[0] if isinstance(output, tuple) else output


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``‖output − target‖² / ‖target‖²`` per sequence (dim 0), averaged over the batch, in
    float32: scale-free across blocks and models, and the same objective whether a global
    batch runs on one device or is split over DDP ranks."""
    error = (output.float() - target.float()).pow(2).flatten(1).sum(1)
    return (error / target.float().pow(2).flatten(1).sum(1).clamp_min(1e-12)).mean()
