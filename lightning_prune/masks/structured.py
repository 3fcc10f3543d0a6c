"""Uniform structured masks: the same number of attention heads and MLP channels in every layer.

A unit's gate multiplies the input columns it owns in the layer's output projection (``o_proj``
for heads, ``down_proj`` for channels): a closed gate removes the unit's whole contribution, so
the hard-masked model computes exactly what the sliced smaller model computes. Every gate owns
its logits and its layer's Lagrange multipliers (``y1``, ``y2``), so the learnable state lives
inside the modules it masks. When the split between heads and channels is learned under one
parameter budget, the per-type targets are parameters of this family (a submodule of the
``PruningModule``, so checkpoints keep them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_prune.adapters.base import ModelAdapter, StructuredSpec
from lightning_prune.errors import ConfigError
from lightning_prune.masks.base import STATE_DTYPE, Float32State, MaskFamily, MaskParametrization
from lightning_prune.ops.hard_concrete import (
    expected_score,
    sample_hard_concrete,
    straight_through_topk,
    uniform_topk,
)
from lightning_prune.ops.lagrangian import nearest_allowed, project_to_budget, ramped_target

KINDS = ("heads", "channels")


class UnitGate(MaskParametrization):
    """Gates on groups of input columns of one output projection (one gate per unit).

    Args:
        kind: ``heads`` or ``channels``.
        units: gates in this layer.
        unit_size: consecutive input columns per unit.
        groups: units form this many equal groups that keep the same count (query heads
            of each KV head); 1 otherwise.
        weight_shape: storage shape of the masked weight.
        transposed: the weight is stored ``[in, out]`` (GPT-2 ``Conv1D``).
        gate: ``hard_concrete`` (sampled L0 gates) or ``sigmoid_topk`` (score with a
            straight-through top-k).
        init_logit: initial logit of every gate (large: start dense).
    """

    def __init__(
        self,
        kind: str,
        units: int,
        unit_size: int,
        groups: int,
        weight_shape: torch.Size,
        transposed: bool,
        gate: str,
        init_logit: float,
    ):
        super().__init__()
        self.kind, self.units, self.unit_size, self.groups = kind, units, unit_size, groups
        self.weight_shape, self.transposed, self.gate = tuple(weight_shape), transposed, gate
        self.logits = nn.Parameter(torch.full((units,), float(init_logit), dtype=STATE_DTYPE))
        # Lagrange multipliers of this layer and kind
        self.y1 = nn.Parameter(torch.zeros((), dtype=STATE_DTYPE))
        self.y2 = nn.Parameter(torch.zeros((), dtype=STATE_DTYPE))
        self.keep = units  # final kept count (set by the family)
        self.train_keep = units  # count of the straight-through forward (ramped target)

    def expected_score(self) -> torch.Tensor:
        """Per-unit probability of being kept (differentiable)."""
        if self.gate == "hard_concrete":
            return expected_score(self.logits)
        return torch.sigmoid(self.logits)

    def gates(self) -> torch.Tensor:
        """Gate values of one training forward."""
        if self.gate == "hard_concrete":
            return sample_hard_concrete(self.logits)
        return straight_through_topk(torch.sigmoid(self.logits), self.train_keep, self.groups)

    def expand(self, unit_values: torch.Tensor) -> torch.Tensor:
        """Per-unit values broadcast over the masked weight (storage orientation)."""
        columns = unit_values.repeat_interleave(self.unit_size)
        return columns[:, None] if self.transposed else columns[None, :]

    def unit_mask(self) -> torch.Tensor:
        """The final kept units: top ``keep`` by score (same count in every group)."""
        return uniform_topk(self.logits.detach(), self.keep, self.groups)

    def compute_hard_mask(self) -> torch.Tensor:
        return self.expand(self.unit_mask()).expand(self.weight_shape)

    def learned_weight(self, original: torch.Tensor) -> torch.Tensor:
        return original * self.expand(self.gates().to(original.dtype))


@dataclass
class _Kind:
    """Bookkeeping of one unit type: layout, allowed kept counts and parameter costs."""

    units: int  # gates per layer
    groups: int  # equal groups per layer that keep the same count
    allowed: list[int]  # kept counts per layer that the export can express
    unit_params: int  # parameters removed per unit and layer
    fixed_target: float | None = None  # kept fraction when given per type


class UniformStructuredFamily(MaskFamily, Float32State):
    """Uniform structured pruning: attention heads and MLP channels, the same count per layer.

    Builds its gates in :meth:`attach` (no ``make_parametrization``). Provides
    :class:`~lightning_prune.contracts.GatedUnits`, :class:`~lightning_prune.contracts.ScoredUnits`
    and :class:`~lightning_prune.contracts.UnitLayouts`.

    Either give the kept share per type (``keep_heads``, ``keep_channels``) or one ``budget``
    (share of decoder-layer Linear parameters to remove) and let the minimax solver learn the
    split. Kept counts are rounded to what a stock config can express.

    Args:
        keep_heads: share of attention heads kept in every layer (1.0: heads untouched).
        keep_channels: share of MLP channels kept in every layer (1.0: untouched).
        budget: share of decoder-layer Linear parameters to remove; the split between heads
            and channels is learned. Leave ``keep_heads``/``keep_channels`` at 1.0 with it.
        gqa: ``kv_group`` removes whole KV heads with their query heads; ``query`` keeps every
            KV head and removes the same number of query heads in each KV group.
        gate: ``hard_concrete`` (L0 gates) or ``sigmoid_topk`` (straight-through top-k).
        init_logit: initial gate logit (2.0: every gate open with probability ~0.97).
        channel_multiple: kept MLP channels are a multiple of this (kernel-friendly widths).
        prune_heads: set ``False`` to prune MLP channels only (e.g. in ``budget`` mode).
    """

    def __init__(
        self,
        keep_heads: float = 1.0,
        keep_channels: float = 1.0,
        budget: float | None = None,
        gqa: Literal["kv_group", "query"] = "kv_group",
        gate: Literal["hard_concrete", "sigmoid_topk"] = "hard_concrete",
        init_logit: float = 2.0,
        channel_multiple: int = 1,
        prune_heads: bool = True,
    ):
        nn.Module.__init__(self)
        MaskFamily.__init__(self, None, None)
        for field, value in (("keep_heads", keep_heads), ("keep_channels", keep_channels)):
            if not 0 < value <= 1:
                what = "zero units" if value <= 0 else "more than every unit"
                raise ConfigError(
                    f"mask_family.{field}: expected a share in (0, 1], got {value} ({what})"
                )
        if budget is not None:
            if not 0 < budget < 1:
                raise ConfigError(f"mask_family.budget: expected a share in (0, 1), got {budget}")
            if keep_heads != 1.0 or keep_channels != 1.0:
                raise ConfigError(
                    "mask_family: set either budget or keep_heads/keep_channels, not both"
                )
        elif keep_heads == 1.0 and keep_channels == 1.0:
            raise ConfigError(
                "mask_family: nothing to prune; set keep_heads and/or keep_channels below 1, "
                "or a budget"
            )
        if gqa not in ("kv_group", "query"):
            raise ConfigError(f"mask_family.gqa: expected kv_group or query, got '{gqa}'")
        if gate not in ("hard_concrete", "sigmoid_topk"):
            raise ConfigError(
                f"mask_family.gate: expected hard_concrete or sigmoid_topk, got '{gate}'"
            )
        if not (isinstance(channel_multiple, int) and channel_multiple >= 1):
            raise ConfigError(
                f"mask_family.channel_multiple: expected an integer >= 1, got {channel_multiple}"
            )
        self.keep_heads, self.keep_channels, self.budget = keep_heads, keep_channels, budget
        self.gqa, self.gate, self.init_logit = gqa, gate, float(init_logit)
        self.channel_multiple, self.prune_heads = channel_multiple, prune_heads
        self.progress = 1.0  # target ramp (the solver moves it from 0 to 1 during warm-up)
        self._kinds: dict[str, _Kind] = {}
        self._gates: dict[str, list[UnitGate]] = {}
        self._names: dict[str, list[str]] = {}
        self.adapter: ModelAdapter | None = None
        self.spec: StructuredSpec | None = None
        self.config: Any = None  # the model's HF config, set by attach
        self.learned_targets: nn.Parameter | None = None
        self._layers: list[nn.Module] = []
        self.decoder_params = 0  # decoder-layer Linear parameters of the dense model
        self._budget_terms: tuple[float, float] = (0.0, 0.0)  # fixed params, total params

    # -- attach -------------------------------------------------------------------------------
    def attach(self, model: nn.Module, adapter: ModelAdapter) -> None:
        config: Any = model.config  # an HF PretrainedConfig
        spec = adapter.structured_spec()
        if spec is None:
            raise ConfigError(
                f"mask_family uniform_structured: model_type '{config.model_type}' "
                f"({type(model).__name__}, adapter {type(adapter).__name__}) has no structured "
                "pruning support; add it by implementing structured_spec() and "
                "structured_config() on the architecture's adapter (see "
                "lightning_prune/adapters/llama.py)"
            )
        self.adapter, self.spec, self.config = adapter, spec, config
        layers = adapter.decoder_layers(model)
        first = layers[0]
        heads_wanted = self.prune_heads and (self.budget is not None or self.keep_heads < 1)
        if self.keep_heads < 1 and not spec.prunes_heads:
            raise ConfigError(
                f"mask_family.keep_heads: model_type '{config.model_type}' cannot lose heads "
                f"({spec.heads_note}); set keep_heads: 1.0 and prune channels only"
            )
        if heads_wanted and spec.prunes_heads:
            self._kinds["heads"] = self._head_kind(first, adapter, spec, config)
        if self.budget is not None or self.keep_channels < 1:
            self._kinds["channels"] = self._channel_kind(first, adapter, spec, config)
        if not self._kinds:
            raise ConfigError("mask_family uniform_structured: nothing to prune on this model")
        device = next(model.parameters()).device
        total = sum(_params(m) for m in adapter.target_linears(model).values())
        self.decoder_params = total
        self._layers = list(layers)  # a plain list: not registered as submodules
        for kind, info in self._kinds.items():
            local = self._out_name(kind)
            self._gates[kind], self._names[kind] = [], []
            for index, layer in enumerate(layers):
                module = layer.get_submodule(local)
                transposed = adapter.weight_is_transposed(module)
                gate = UnitGate(
                    kind,
                    info.units,
                    _in_features(module, transposed) // info.units,
                    info.groups,
                    _weight(module).shape,
                    transposed,
                    self.gate,
                    self.init_logit,
                ).to(device)
                parametrize.register_parametrization(module, "weight", gate, unsafe=True)
                name = f"{adapter.layers_path}.{index}.{local}"
                self._targets[name] = module
                self._gates[kind].append(gate)
                self._names[kind].append(name)
        if self.budget is not None:
            self._init_budget(total, torch.device("cpu") if device.type == "meta" else device)
        self._sync_counts()

    def _head_kind(self, layer, adapter, spec, config) -> _Kind:
        layout = adapter.head_layout(config)
        heads, kv, group = layout.num_heads, layout.num_kv_heads, layout.group_size
        intermediate = adapter.intermediate_size(config)
        q_params = sum(_params(layer.get_submodule(n)) for n in spec.query) // heads
        kv_params = sum(_params(layer.get_submodule(n)) for n in spec.kv) // kv
        o_params = _weight_params(layer.get_submodule(spec.attn_out)) // heads
        if self.gqa == "kv_group":
            if kv == 1 and (self.budget is not None or self.keep_heads < 1):
                raise ConfigError(
                    "mask_family.gqa: kv_group removes whole KV groups, but this model has a "
                    f"single KV head ({heads} query heads); use gqa: query"
                )
            units, groups, step = kv, 1, 1
            candidates = [(c * group, c) for c in range(1, kv + 1)]
            unit_params = group * (q_params + o_params) + kv_params
        else:
            if group == 1:
                raise ConfigError(
                    "mask_family.gqa: query removes query heads inside each KV group, but this "
                    f"model has one query head per KV head ({heads} heads, {kv} KV heads); "
                    "use gqa: kv_group"
                )
            units, groups, step = heads, kv, kv
            candidates = [(p * kv, kv) for p in range(1, group + 1)]
            unit_params = q_params + o_params
        allowed = []
        for num_heads, num_kv in candidates:
            try:
                adapter.structured_config(config, num_heads, num_kv, intermediate)
            except ValueError:
                continue
            allowed.append(num_heads // group if self.gqa == "kv_group" else num_heads)
        if not allowed:
            raise ConfigError(
                f"mask_family.gqa: {self.gqa} leaves no head count that the "
                f"{config.model_type} config accepts"
            )
        target = None
        if self.budget is None:
            raw = self.keep_heads * units
            if round(raw / step) < 1:
                what = "KV groups" if self.gqa == "kv_group" else "query heads per KV group"
                raise ConfigError(
                    f"mask_family.keep_heads: {self.keep_heads} leaves 0 {what} in every layer "
                    f"({units // step} available)"
                )
            target = nearest_allowed(raw, allowed) / units
        return _Kind(units, groups, allowed, unit_params, target)

    def _channel_kind(self, layer, adapter, spec, config) -> _Kind:
        units = adapter.intermediate_size(config)
        multiple = self.channel_multiple
        allowed = list(range(multiple, units + 1, multiple))
        if units not in allowed:
            allowed.append(units)
        in_params = sum(_params(layer.get_submodule(n)) for n in spec.mlp_in) // units
        unit_params = in_params + _weight_params(layer.get_submodule(spec.mlp_out)) // units
        target = None
        if self.budget is None:
            raw = self.keep_channels * units
            if round(raw / multiple) < 1:
                raise ConfigError(
                    f"mask_family.keep_channels: {self.keep_channels} leaves 0 MLP channels in "
                    f"every layer ({units} available, multiple of {multiple})"
                )
            target = nearest_allowed(raw, allowed) / units
        return _Kind(units, 1, allowed, unit_params, target)

    def _init_budget(self, total: int, device: torch.device) -> None:
        variable = {
            k: self.num_layers * info.units * info.unit_params for k, info in self._kinds.items()
        }
        fixed = total - sum(variable.values())
        self._budget_terms = (float(fixed), float(total))
        costs, lower, upper = self._budget_box()
        remaining = self._remaining()
        if remaining < float((costs * lower).sum()):
            most = 1 - (fixed + float((costs * lower).sum())) / total
            raise ConfigError(
                f"mask_family.budget: removing {self.budget:.0%} of the decoder parameters "
                f"would leave zero heads or channels; at most {most:.1%} can be removed here"
            )
        self.learned_targets = nn.Parameter(self._budget_start().to(device))

    def _budget_start(self) -> torch.Tensor:
        """Initial learned targets: the same kept share for every kind, on the budget."""
        costs, lower, upper = self._budget_box()
        remaining = self._remaining()
        start = torch.full((len(self._kinds),), remaining / float(costs.sum()), dtype=STATE_DTYPE)
        return project_to_budget(start, costs, remaining, lower, upper).float()

    @torch.no_grad()
    def reset_state(self) -> None:
        for gates in self._gates.values():
            for gate in gates:
                gate.logits.fill_(self.init_logit)
                gate.y1.zero_()
                gate.y2.zero_()
        if self.learned_targets is not None:
            device = self._gates[self.kinds()[0]][0].logits.device
            self.learned_targets = nn.Parameter(self._budget_start().to(device))
        self._sync_counts()

    def _budget_box(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        costs = torch.tensor(
            [self.num_layers * i.units * i.unit_params for i in self._kinds.values()],
            dtype=torch.float64,
        )
        shares = [min(i.allowed) / i.units for i in self._kinds.values()]
        lower = torch.tensor(shares, dtype=STATE_DTYPE).double()
        return costs, lower, torch.ones(len(self._kinds), dtype=torch.float64)

    def _remaining(self) -> float:
        """Parameters the budget leaves (used under a ``budget`` only)."""
        assert self.budget is not None, "no parameter budget"
        fixed, total = self._budget_terms
        return (1 - self.budget) * total - fixed

    # -- targets ------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(next(iter(self._gates.values()))) if self._gates else 0

    def kinds(self) -> list[str]:
        """The unit types pruned (``heads``, ``channels``)."""
        return list(self._kinds)

    def gates(self, kind: str) -> list[UnitGate]:
        """One gate module per decoder layer."""
        return self._gates[kind]

    def final_target(self, kind: str) -> torch.Tensor:
        """The shared kept fraction of ``kind`` (a parameter when learned under a budget)."""
        if self.learned_targets is not None:
            return self.learned_targets[list(self._kinds).index(kind)]
        return torch.tensor(self._kinds[kind].fixed_target, dtype=STATE_DTYPE)

    def current_target(self, kind: str) -> torch.Tensor:
        """The ramped target used by the Lagrangian at the current step."""
        return ramped_target(self.final_target(kind), self.progress)

    def set_progress(self, progress: float) -> None:
        """Move the target ramp (0: dense, 1: final targets)."""
        self.progress = min(max(float(progress), 0.0), 1.0)
        self._sync_counts()

    def expected_kept(self, kind: str) -> torch.Tensor:
        """Expected kept fraction of every layer, ``[layers]`` (differentiable)."""
        return torch.stack([g.expected_score().mean() for g in self._gates[kind]])

    def multipliers(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Lagrange multipliers ``(y1, y2)`` of every layer, each ``[layers]``."""
        gates = self._gates[kind]
        return torch.stack([g.y1 for g in gates]), torch.stack([g.y2 for g in gates])

    def mask_parameters(self) -> list[nn.Parameter]:
        """Gate logits (minimised)."""
        return [g.logits for gates in self._gates.values() for g in gates]

    def multiplier_parameters(self) -> list[nn.Parameter]:
        """Lagrange multipliers (maximised)."""
        return [p for gates in self._gates.values() for g in gates for p in (g.y1, g.y2)]

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Gate logits and multipliers: tiny, read by the Lagrangian outside the layers."""
        return self.mask_parameters() + self.multiplier_parameters()

    def target_parameters(self) -> list[nn.Parameter]:
        """Learned per-type targets (empty when targets are given per type)."""
        return [] if self.learned_targets is None else [self.learned_targets]

    @torch.no_grad()
    def project_targets(self) -> None:
        """Put learned targets back onto the parameter budget (after each optimizer step)."""
        if self.learned_targets is None:
            return
        costs, lower, upper = self._budget_box()
        projected = project_to_budget(
            self.learned_targets.detach().cpu(), costs, self._remaining(), lower, upper
        )
        self.learned_targets.copy_(projected.to(self.learned_targets))

    def kept_counts(self) -> dict[str, int]:
        """Final kept units per layer and kind (rounded to counts a stock config can hold).

        Under a budget the coarsest kind (heads) is rounded first and channels absorb the
        rounding, so the removed share stays close to the budget.
        """
        counts: dict[str, int] = {}
        if self.learned_targets is None:
            for kind, info in self._kinds.items():
                assert info.fixed_target is not None  # no learned targets: fixed per type
                counts[kind] = round(info.fixed_target * info.units)
            return counts
        values = self.learned_targets.detach().double().cpu()
        remaining = self._remaining()
        for index, (kind, info) in enumerate(self._kinds.items()):
            cost = self.num_layers * info.unit_params
            if index == len(self._kinds) - 1:  # the last kind meets the budget
                counts[kind] = nearest_allowed(remaining / cost, info.allowed)
            else:
                counts[kind] = nearest_allowed(float(values[index]) * info.units, info.allowed)
                remaining -= counts[kind] * cost
        return counts

    def _sync_counts(self) -> None:
        counts = self.kept_counts()
        for kind, info in self._kinds.items():
            ramped = float(torch.as_tensor(self.current_target(kind)).detach()) * info.units
            for gate in self._gates[kind]:
                gate.keep = counts[kind]
                gate.train_keep = nearest_allowed(ramped, info.allowed)

    def set_mode(self, mode: str) -> None:
        self._sync_counts()
        super().set_mode(mode)

    def attached(self) -> tuple[ModelAdapter, StructuredSpec]:
        """The adapter and structured spec set by :meth:`attach`."""
        if self.adapter is None or self.spec is None:
            raise RuntimeError("uniform_structured: the mask family is not attached to a model")
        return self.adapter, self.spec

    # -- final mask ---------------------------------------------------------------------------
    def layer_layouts(self) -> list[dict[str, torch.Tensor]]:
        """Per layer: sorted kept ``heads`` (query), ``kv_heads`` and ``channels`` indices."""
        adapter, _ = self.attached()
        layout = adapter.head_layout(self.config)
        channels = adapter.intermediate_size(self.config)
        layouts = []
        for index in range(self.num_layers):
            heads = torch.arange(layout.num_heads)
            kv = torch.arange(layout.num_kv_heads)
            if "heads" in self._gates:
                unit = self._gates["heads"][index].unit_mask().cpu()
                if self.gqa == "kv_group":
                    kv = unit.nonzero().flatten()
                    heads = kv[:, None] * layout.group_size + torch.arange(layout.group_size)
                    heads = heads.flatten()
                else:
                    heads = unit.nonzero().flatten()
            kept = torch.arange(channels)
            if "channels" in self._gates:
                kept = self._gates["channels"][index].unit_mask().cpu().nonzero().flatten()
            layouts.append({"heads": heads, "kv_heads": kv, "channels": kept})
        return layouts

    def exported_shape(self) -> dict[str, int]:
        """Heads, KV heads and MLP channels per layer of the exported model."""
        adapter, _ = self.attached()
        layout = adapter.head_layout(self.config)
        counts = self.kept_counts()
        heads, kv = layout.num_heads, layout.num_kv_heads
        if "heads" in counts:
            if self.gqa == "kv_group":
                kv, heads = counts["heads"], counts["heads"] * layout.group_size
            else:
                heads = counts["heads"]
        channels = counts.get("channels", adapter.intermediate_size(self.config))
        return {"num_heads": heads, "num_kv_heads": kv, "intermediate_size": channels}

    def verify(self) -> None:
        counts = self.kept_counts()
        for kind, gates in self._gates.items():
            for name, gate in zip(self._names[kind], gates):
                unit = gate.unit_mask()
                per_group = unit.reshape(gate.groups, -1).sum(-1)
                if int(unit.sum()) != counts[kind] or len(set(per_group.tolist())) != 1:
                    raise ConfigError(f"layer '{name}': {kind} mask is not uniform")

    def exported_checker(self) -> Callable[[nn.Module], None]:
        shape = self.exported_shape()
        adapter, _ = self.attached()

        def check(model: nn.Module) -> None:
            config: Any = model.config
            layout = adapter.head_layout(config)
            got = {
                "num_heads": layout.num_heads,
                "num_kv_heads": layout.num_kv_heads,
                "intermediate_size": adapter.intermediate_size(config),
            }
            if got != shape:
                raise ConfigError(f"exported config {got} differs from the mask's {shape}")
            if layout.num_heads % layout.num_kv_heads:
                raise ConfigError(f"exported heads {got} are not a multiple of the KV heads")

        return check

    def describe(self) -> dict[str, Any]:
        adapter, _ = self.attached()
        layout = adapter.head_layout(self.config)
        dense = {
            "num_heads": layout.num_heads,
            "num_kv_heads": layout.num_kv_heads,
            "intermediate_size": adapter.intermediate_size(self.config),
        }
        record: dict[str, Any] = {
            "pattern": "uniform_structured",
            "gqa": self.gqa,
            "gate": self.gate,
            "dense_shape": dense,
            "pruned_shape": self.exported_shape(),
            "targets": {k: float(self.final_target(k).detach()) for k in self.kinds()},
        }
        if self.budget is not None:
            record["budget"] = self.budget
        return record

    def sparsity_report(self) -> dict[str, float]:
        """Share of removed units of every gated projection."""
        return {
            name: 1.0 - gate.unit_mask().float().mean().item()
            for kind in self._gates
            for name, gate in zip(self._names[kind], self._gates[kind])
        }

    # -- baselines and export -----------------------------------------------------------------
    @torch.no_grad()
    def magnitude_masks(self) -> dict[str, torch.Tensor]:
        """Uniform one-shot baseline: keep the units with the largest weight norm in every layer.

        A unit's norm covers every weight that is removed with it (query/KV rows and output
        columns for heads, input rows and output columns for channels).
        """
        counts, (adapter, spec) = self.kept_counts(), self.attached()
        masks = {}
        for kind, gates in self._gates.items():
            if kind == "channels":
                ins = spec.mlp_in
            else:  # heads are gated only where the spec can prune them
                assert spec.query is not None and spec.kv is not None
                ins = spec.query + spec.kv if self.gqa == "kv_group" else spec.query
            for layer, name, gate in zip(self._layers, self._names[kind], gates):
                out = _rows_of(layer.get_submodule(self._out_name(kind)), adapter)
                norms = out.float().pow(2).sum(0).reshape(gate.units, -1).sum(-1)
                for local in ins:
                    rows = _rows_of(layer.get_submodule(local), adapter)
                    norms = norms + rows.float().pow(2).sum(1).reshape(gate.units, -1).sum(-1)
                unit = uniform_topk(norms, counts[kind], gate.groups)
                masks[name] = gate.expand(unit).expand(gate.weight_shape).clone()
        return masks

    def gate_names(self, kind: str) -> list[str]:
        """Qualified names of the gated output projections of ``kind``, one per layer."""
        return list(self._names[kind])

    def out_projection(self, kind: str) -> str:
        """Module name inside a decoder layer whose input columns the ``kind`` gates own."""
        return self._out_name(kind)

    @torch.no_grad()
    def masks_from_scores(
        self, scores: dict[str, list[torch.Tensor] | dict[int, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Uniform hard masks from per-unit scores: in every layer keep the top-scored units.

        ``scores[kind]`` maps a layer index to one score per unit (``gates(kind)[i].units``);
        a list covers every layer in order, a dict only the layers it names (e.g. one layer of
        a layer-by-layer method). The kept count is the family's (:meth:`kept_counts`, the same
        in every layer and, with GQA query pruning, in every KV group). Returns masks in
        storage orientation, by gated module name.
        """
        counts, masks = self.kept_counts(), {}
        for kind, by_layer in scores.items():
            if kind not in self._gates:
                raise ConfigError(f"masks_from_scores: '{kind}' is not pruned ({self.kinds()})")
            gates = self._gates[kind]
            items = enumerate(by_layer) if isinstance(by_layer, list) else by_layer.items()
            for index, score in items:
                if not 0 <= index < len(gates):
                    raise ConfigError(f"masks_from_scores: no layer {index} ({len(gates)} layers)")
                name, gate = self._names[kind][index], gates[index]
                if score.numel() != gate.units:
                    raise ConfigError(
                        f"masks_from_scores: '{name}' has {gate.units} {kind}, got "
                        f"{score.numel()} scores"
                    )
                score = score.detach().float().to(gate.logits.device).flatten()
                unit = uniform_topk(score, counts[kind], gate.groups)
                masks[name] = gate.expand(unit).expand(gate.weight_shape).clone()
        return masks

    @torch.no_grad()
    def apply_initial_masks(self, masks: dict[str, torch.Tensor], logit: float = 3.0) -> None:
        """Warm start: gate logits ``+logit`` for the units a one-shot mask keeps, ``-logit``
        for the ones it removes (``masks`` in storage orientation, by gated module name)."""
        for kind, gates in self._gates.items():
            for name, gate in zip(self._names[kind], gates):
                if name not in masks:
                    continue
                mask = masks[name].to(gate.logits.device)
                columns = mask.any(1) if gate.transposed else mask.any(0)
                kept = columns.reshape(gate.units, gate.unit_size).any(-1)
                gate.logits.copy_(torch.where(kept, logit, -logit).to(gate.logits))

    def _out_name(self, kind: str) -> str:
        _, spec = self.attached()
        if kind == "heads":
            assert spec.attn_out is not None  # heads are gated only where they can be pruned
            return spec.attn_out
        return spec.mlp_out

    def hf_exporter(self) -> Callable[..., Any]:
        from lightning_prune.export.structured import export_structured_hf

        return export_structured_hf


def _weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` (masked when parametrized); torch types module attributes loosely."""
    return cast(torch.Tensor, module.weight)


def _in_features(module: nn.Module, transposed: bool) -> int:
    return _weight(module).shape[0] if transposed else _weight(module).shape[1]


def _weight_params(module: nn.Module) -> int:
    return _weight(module).numel()


def _params(module: nn.Module) -> int:
    bias = getattr(module, "bias", None)
    return _weight(module).numel() + (bias.numel() if bias is not None else 0)


def _rows_of(module: nn.Module, adapter: ModelAdapter) -> torch.Tensor:
    """The module's weight as ``[out, in]`` (originals when parametrized)."""
    weight = _weight(module)
    if parametrize.is_parametrized(module, "weight"):
        parametrizations = cast(nn.ModuleDict, module.parametrizations)
        weight = cast(parametrize.ParametrizationList, parametrizations["weight"]).original
    return weight.t() if adapter.weight_is_transposed(module) else weight
