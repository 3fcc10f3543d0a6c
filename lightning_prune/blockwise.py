"""The block-wise objective: learn decoder blocks one after another, each to reproduce its dense
output on the inputs that the already-pruned blocks before it produce.

Block ``i`` trains for ``steps_per_block`` optimizer steps on

    ‖B_i^mask(X_i) − B_i(X_i)‖² / ‖B_i(X_i)‖²   (per sequence, averaged over the batch)

where ``X_i`` is the input of block ``i`` when blocks ``0..i−1`` run with their final hard masks
(``inputs: pruned``, the sequential scheme of SparseGPT and Wanda) or dense (``inputs: dense``),
and ``B_i`` is block ``i`` with its masks off. When block ``i``'s turn comes, ``X_i`` is computed
once for every calibration sequence and cached (:class:`BlockInputCache`, spilled to disk beyond
a memory budget): from block ``i−1``'s cached inputs through its final masks, so the whole
sequence of blocks costs one forward pass over the calibration set, and every step then runs
block ``i`` only. The cache is derived state: a resumed fit rebuilds it with one forward of
blocks ``0..i−1`` per calibration batch, which gives the same tensors, so the state of a run is
still its step counter and its learned tensors.

After the last block, an optional end-to-end phase of ``e2e_steps`` steps learns every block
at once on the language-model loss (plus the solver's own terms), starting from the block-wise
masks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_prune.block_cache import BlockInputCache
from lightning_prune.errors import ConfigError

BlockInputs = Literal["pruned", "dense"]


class _Captured(Exception):
    """Stops the model's forward once the learned block's inputs are captured."""


@dataclass
class BlockCall:
    """The positional and keyword arguments one decoder block is called with."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def hidden(self) -> torch.Tensor:
        """The hidden states the block is called with."""
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor) -> BlockCall:
        """The same call with other hidden states."""
        if self.args:
            return BlockCall((hidden, *self.args[1:]), self.kwargs)
        return BlockCall(self.args, {**self.kwargs, "hidden_states": hidden})


class BlockwiseObjective:
    """Per-block reconstruction loss and the block schedule of a block-wise fit.

    Args:
        steps_per_block: optimizer steps spent on every decoder block.
        inputs: ``pruned`` (blocks before run with their final hard masks) or ``dense``.
        e2e_steps: optimizer steps of the end-to-end phase after the last block (0: none).
        cache_mb: MiB of block inputs held in memory; the rest spill to disk.
    """

    def __init__(
        self,
        steps_per_block: int,
        inputs: BlockInputs = "pruned",
        e2e_steps: int = 0,
        cache_mb: float = 1024.0,
    ):
        if not (isinstance(steps_per_block, int) and steps_per_block >= 1):
            raise ConfigError(
                f"model.steps_per_block: expected an integer >= 1, got {steps_per_block!r}"
            )
        if inputs not in ("pruned", "dense"):
            raise ConfigError(f"model.block_inputs: expected 'pruned' or 'dense', got {inputs!r}")
        if not (isinstance(e2e_steps, int) and e2e_steps >= 0):
            raise ConfigError(f"model.e2e_steps: expected an integer >= 0, got {e2e_steps!r}")
        if not (isinstance(cache_mb, (int, float)) and cache_mb >= 0):
            raise ConfigError(f"model.block_cache_mb: expected a number >= 0, got {cache_mb!r}")
        self.steps_per_block, self.inputs, self.e2e_steps = steps_per_block, inputs, e2e_steps
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: BlockInputCache | None = None
        self._templates: dict[tuple[int, tuple[int, ...]], BlockCall] = {}

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

    def block_call(
        self,
        model: nn.Module,
        blocks: list[nn.Module],
        index: int,
        input_ids: torch.Tensor,
        batches: Callable[[], Iterable[dict[str, torch.Tensor]]] | None,
    ) -> BlockCall:
        """The call of block ``index`` for ``input_ids``: the cached inputs of its sequences
        (the cache is filled for this block first, from ``batches``: every calibration batch)
        with the block's other arguments for this input shape. Without ``batches``, or for a
        sequence the cache does not hold, the blocks before it run on ``input_ids``. The blocks
        before ``index`` must already be in their final mode (hard masks, or off)."""
        if batches is None:
            return self.capture(model, blocks[index], input_ids)
        self._fill(model, blocks, index, batches)
        call = self._cached_call(model, blocks, index, input_ids)
        return call if call is not None else self.capture(model, blocks[index], input_ids)

    def release(self) -> None:
        """Drop the cached block inputs (end of the block phase or of the fit)."""
        if self._cache is not None:
            self._cache.close()
        self._cache = None
        self._templates.clear()

    def _cached_call(
        self, model: nn.Module, blocks: list[nn.Module], index: int, input_ids: torch.Tensor
    ) -> BlockCall | None:
        cache = self._cache
        assert cache is not None, "_fill() caches the inputs first"
        rows = [cache.get(tokens) for tokens in input_ids]
        found = [row for row in rows if row is not None]
        if len(found) < len(rows):
            return None
        key = (index, tuple(input_ids.shape))
        if key not in self._templates:  # the block's other arguments depend on the shape only
            self._templates[key] = self.capture(model, blocks[index], input_ids)
        template = self._templates[key]
        reference = template.hidden
        return template.with_hidden(torch.stack(found).to(reference.device, reference.dtype))

    @torch.no_grad()
    def _fill(
        self,
        model: nn.Module,
        blocks: list[nn.Module],
        index: int,
        batches: Callable[[], Iterable[dict[str, torch.Tensor]]],
    ) -> None:
        """Cache block ``index``'s inputs for every calibration sequence: from the cached
        inputs of block ``index − 1`` through it, or (first block, resumed fit) by running the
        blocks before it."""
        previous = self._cache
        if previous is not None and previous.block == index:
            return
        fresh = BlockInputCache(index, self.cache_bytes)
        chain = previous is not None and previous.block == index - 1
        device = next(blocks[index].parameters()).device
        for batch in tqdm(batches(), desc=f"block {index}: inputs", leave=False):
            input_ids = batch["input_ids"].to(device)
            call = self._cached_call(model, blocks, index - 1, input_ids) if chain else None
            if call is not None:
                hidden = self.run(blocks[index - 1], call)
            else:
                hidden = self.capture(model, blocks[index], input_ids).hidden
            for tokens, row in zip(input_ids, hidden):
                fresh.put(tokens, row)
        self.release()
        self._cache = fresh


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``‖output − target‖² / ‖target‖²`` per sequence (dim 0), averaged over the batch, in
    float32: scale-free across blocks and models, and the same objective whether a global
    batch runs on one device or is split over DDP ranks."""
    error = (output.float() - target.float()).pow(2).flatten(1).sum(1)
    return (error / target.float().pow(2).flatten(1).sum(1).clamp_min(1e-12)).mean()
