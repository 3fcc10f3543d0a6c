"""Layer-by-layer calibration: run the decoder layers one at a time on cached inputs.

One-shot methods (Wanda, SparseGPT, FLAP, ...) need statistics of the inputs of every prunable
Linear. Running the whole model with hooks on every layer keeps all activations of a batch alive
at once; instead, :class:`LayerwiseCalibration` runs the model once with every decoder layer
replaced by an identity that records its arguments (hidden states plus the per-layer keyword
arguments such as attention masks and rotary embeddings), then runs the real layers one at a
time on those cached inputs. Activation memory stays near one layer's inputs and outputs.

Sequential flow (as in the SparseGPT/Wanda reference code): collect statistics of layer ``l``
with :meth:`LayerwiseCalibration.collect`, prune it, then :meth:`LayerwiseCalibration.advance`
with the pruned weights (and compensated biases) swapped in (:func:`swapped_weights`), so layer
``l + 1`` sees the outputs of the already-pruned layers. Weights stay where they are (no CPU
offload).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_prune.adapters.base import ModelAdapter, adapter_for
from lightning_prune.errors import ConfigError

#: called with (target name, inputs ``[tokens, in_features]``) for every calibration batch
Observer = Callable[[str, torch.Tensor], None]


def storage_weight(module: nn.Module) -> torch.Tensor:
    """The tensor that holds ``module``'s weight (the original when parametrized)."""
    if parametrize.is_parametrized(module, "weight"):
        parametrizations = cast(nn.ModuleDict, module.parametrizations)
        return cast(parametrize.ParametrizationList, parametrizations["weight"]).original
    return cast(torch.Tensor, module.weight)


@contextmanager
def swapped_weights(
    weights: dict[nn.Module, torch.Tensor], biases: dict[nn.Module, torch.Tensor] | None = None
) -> Iterator[None]:
    """Temporarily copy ``weights`` (storage orientation) into the modules' stored weights and
    ``biases`` into their biases (e.g. a one-shot method's bias compensation)."""
    stored = [(storage_weight(m), w) for m, w in weights.items()]
    stored += [(cast(torch.Tensor, m.bias), b) for m, b in (biases or {}).items()]
    saved = []
    try:
        with torch.no_grad():
            for tensor, value in stored:
                saved.append((tensor, tensor.detach().clone()))
                tensor.copy_(value.to(tensor))
        yield
    finally:
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class LayerwiseCalibration:
    """Cached decoder-layer inputs of calibration batches, advanced one layer at a time.

    Args:
        model: the causal LM (parametrized or not; run in whatever mask mode it is in).
        batches: iterable of dicts with ``input_ids`` (e.g. a data module's train loader).
        adapter: the model's architecture adapter (default: looked up).
        max_batches: use at most this many batches.
        min_tokens: raise :class:`ConfigError` when the batches hold fewer tokens.
        what: name used in error messages (e.g. ``init_mask 'wanda'``).
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[dict[str, torch.Tensor]] | None,
        adapter: ModelAdapter | None = None,
        max_batches: int | None = None,
        min_tokens: int = 1,
        what: str = "calibration",
    ):
        if batches is None:
            raise ConfigError(f"{what}: needs calibration batches (a datamodule), got none")
        self.model = model
        self.adapter = adapter or adapter_for(model)
        self.layers = list(self.adapter.decoder_layers(model))
        self.inputs: list[list[tuple[tuple, dict]]] = [[] for _ in self.layers]
        self.hidden: list[torch.Tensor] = []
        self.tokens = 0
        self._capture(batches, max_batches)
        if self.tokens < min_tokens:
            raise ConfigError(
                f"{what}: calibration data holds {self.tokens} tokens, the method needs at least "
                f"{min_tokens}; raise data.num_samples or data.seq_len"
            )

    @torch.no_grad()
    def _capture(self, batches: Iterable[dict[str, torch.Tensor]], max_batches: int | None):
        device = next(self.model.parameters()).device
        current: list[torch.Tensor | None] = [None]

        def recorder(index: int) -> Callable[..., torch.Tensor]:
            def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
                hidden = args[0] if args else kwargs.pop("hidden_states")
                if index == 0:
                    current[0] = hidden
                self.inputs[index].append((tuple(args[1:]), kwargs))
                return hidden

            return forward

        for index, layer in enumerate(self.layers):
            layer.forward = recorder(index)
        was_training = self.model.training
        self.model.eval()
        try:
            for count, batch in enumerate(batches):
                if max_batches is not None and count >= max_batches:
                    break
                ids = batch["input_ids"].to(device)
                self.model(input_ids=ids, use_cache=False)
                hidden = current[0]
                assert hidden is not None, "the model did not run its first decoder layer"
                self.hidden.append(hidden)
                self.tokens += ids.numel()
        finally:
            for layer in self.layers:
                del layer.forward  # back to the class's forward
            self.model.train(was_training)

    def layer_targets(self, index: int, targets: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """The entries of ``targets`` (qualified names) that live in decoder layer ``index``."""
        prefix = f"{self.adapter.layers_path}.{index}."
        return {name: module for name, module in targets.items() if name.startswith(prefix)}

    def _run(self, index: int) -> Iterator[torch.Tensor]:
        layer = self.layers[index]
        for hidden, (args, kwargs) in zip(self.hidden, self.inputs[index]):
            yield _hidden(layer(hidden, *args, **kwargs))

    @torch.no_grad()
    def collect(self, index: int, modules: dict[str, nn.Module], observe: Observer) -> None:
        """Run layer ``index`` on every cached input; ``observe`` sees each module's inputs."""

        def hook(name: str) -> Callable[..., None]:
            def record(module: nn.Module, inputs: tuple) -> None:
                observe(name, inputs[0].detach().reshape(-1, inputs[0].shape[-1]))

            return record

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
        try:
            for _ in self._run(index):
                pass
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def advance(self, index: int) -> None:
        """Replace the cached inputs by layer ``index``'s outputs (inputs of layer ``index+1``)."""
        self.hidden = list(self._run(index))
        self.inputs[index] = []
