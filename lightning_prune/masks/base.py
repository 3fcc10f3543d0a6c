"""The mask-family interface."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_prune.adapters.base import ModelAdapter
from lightning_prune.errors import ConfigError

MODES = ("learn", "hard", "off")
#: dtype of every learnable mask tensor (and so of its optimizer state), whatever the LM's dtype:
#: AdamW steps of ~1e-4 on weights of ~0.02 are below bfloat16's resolution and would vanish
STATE_DTYPE = torch.float32


def dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    """``bfloat16``, or ``bfloat16+float32`` for several dtypes (``none`` for none)."""
    return "+".join(sorted({str(d).removeprefix("torch.") for d in dtypes})) or "none"


class ShardView:
    """What this rank holds of the mask state, as the family and the regularizers read it.

    This default holds every tensor whole on every rank (one device, DDP, or a sharded tensor
    gathered for the moment). A sharding backend that leaves tensors sharded outside the
    forward hands the family another view (:meth:`MaskFamily.use_shard_view`), so that mask
    families and regularizers read their state through it and never import sharding code.
    """

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``tensor`` as a plain tensor (a view of its storage)."""
        return tensor

    def holds_whole(self, tensor: torch.Tensor, shape: tuple[int, ...]) -> bool:
        """Whether this rank holds all of ``tensor``, whose whole shape is ``shape`` (a slice
        of a flattened tensor has another shape)."""
        return tuple(tensor.shape) == tuple(shape)

    def sum_over_ranks(self, value: torch.Tensor, of: torch.Tensor) -> torch.Tensor:
        """``value``, a sum over this rank's part of ``of``, summed over every rank that
        holds a part of it (``value`` itself when ``of`` is whole here)."""
        return value


#: the default view: every tensor whole on this rank
WHOLE = ShardView()


@dataclass(frozen=True)
class GroupedTensor:
    """A declaration of a mask family to sharding backends: ``tensor`` (mask state, or a
    weight it masks) has groups of ``size`` consecutive entries along ``dim`` that a shard must
    not cut (e.g. N:M groups along a weight's input dim). ``name`` is the target module;
    ``along`` and ``group`` name the dim and the group in error messages."""

    name: str
    tensor: torch.Tensor
    dim: int
    size: int
    along: str = "entries"
    group: str = "a group"


class Float32State(nn.Module):
    """A module whose own ``float32`` tensors stay ``float32`` when the model is cast.

    ``model.to(dtype)`` (Lightning's ``bf16-true``/``16-true`` precision casts the whole module)
    only moves them to the target device; the frozen LM around them takes the new dtype.
    """

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        def keep_float32(tensor: torch.Tensor) -> torch.Tensor:
            applied = fn(tensor)
            if tensor.dtype == STATE_DTYPE and applied.dtype != STATE_DTYPE:
                return tensor.to(device=applied.device)
            return applied

        return super()._apply(keep_float32, recurse)


class MaskParametrization(Float32State):
    """Base of mask parametrizations: one forward per mode, the hard mask cached once computed.

    Learnable state is created in :data:`STATE_DTYPE`; ``learned_weight`` returns the weight in
    the original weight's dtype, so the LM's matmuls run in the dtype it was loaded in.

    Sharded state: the hard mask is cached (``final_mask``) only while this rank holds its own
    parameters whole (:meth:`is_whole`). Otherwise (an FSDP2 shard, an FSDP1 flat slice outside
    the forward) ``set_mode("hard")`` caches nothing and the forward computes
    ``compute_hard_mask()`` itself, where the sharding backend has gathered the parameters: a
    subclass implements ``compute_hard_mask`` and ``learned_weight`` only.
    """

    #: the masked weight is stored ``[in, out]`` (GPT-2 ``Conv1D``); subclasses set it per target
    transposed: bool = False
    #: what this rank holds of the state (set by :meth:`MaskFamily.use_shard_view`)
    shard_view: ShardView = WHOLE

    def __init__(self) -> None:
        super().__init__()
        self.mode = "learn"
        self.register_buffer("final_mask", torch.empty(0, dtype=torch.bool), persistent=False)

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        """Also records the shape ``param`` is first registered with (the whole shape: sharding
        backends replace parameters later, never through the first registration)."""
        super().register_parameter(name, param)
        if param is not None:
            shapes: dict[str, tuple[int, ...]] = self.__dict__.setdefault("_whole_shapes", {})
            shapes.setdefault(name, tuple(param.shape))

    def is_whole(self) -> bool:
        """Whether this rank holds every parameter of this parametrization whole (per the
        ``shard_view``: neither a shard nor a flat slice of it, as sharding backends leave them
        outside the forward). Parameterless parametrizations are whole."""
        shapes: dict[str, tuple[int, ...]] = self.__dict__.get("_whole_shapes", {})
        tensors = {
            name: (param, shape)
            for name, shape in shapes.items()
            if isinstance(param := getattr(self, name, None), torch.Tensor)
        }
        for name, param in self._parameters.items():  # set without register_parameter
            if param is not None and name not in tensors:
                tensors[name] = (param, tuple(param.shape))
        return all(self.shard_view.holds_whole(t, shape) for t, shape in tensors.values())

    @abstractmethod
    def compute_hard_mask(self) -> torch.Tensor:
        """The final bool mask in weight storage orientation."""

    @abstractmethod
    def learned_weight(self, original: torch.Tensor) -> torch.Tensor:
        """The weight used while learning."""

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """A weight-shaped ``tensor`` viewed as ``[out, in]`` (its own inverse: storage
        orientation back from ``[out, in]``)."""
        return tensor.t() if self.transposed else tensor

    def hard_mask(self) -> torch.Tensor:
        """The final mask (cached while in ``hard`` mode)."""
        return self.final_mask if self.final_mask.numel() else self.compute_hard_mask()

    def set_mode(self, mode: str) -> None:
        """Switch the forward to ``mode``; ``hard`` caches the hard mask when the state is whole
        (:meth:`is_whole`), else leaves ``final_mask`` empty for the forward to compute it (no
        mask of this rank's part only, and no full-size cache per rank)."""
        self.mode = mode
        if mode == "hard" and self.is_whole():
            self.final_mask = self.compute_hard_mask().contiguous()
        else:
            self.final_mask = torch.empty(0, dtype=torch.bool, device=self.final_mask.device)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return original
        if self.mode == "hard":
            # no cached mask: the state is sharded outside the forward, gathered here
            mask = self.final_mask if self.final_mask.numel() else self.compute_hard_mask()
            return original * mask.to(original.dtype)
        return self.learned_weight(original)


class MaskFamily(ABC):
    """Attaches mask state to target modules (as ``torch.nn.utils.parametrize`` parametrizations).

    The mask state lives inside the modules it masks, so strategies that replace module
    parameters (FSDP2) keep training it. Life cycle: ``attach`` → training (soft forward) →
    ``harden`` (the final, verified hard mask) → ``bake`` (weights become ``W0 ⊙ mask``).

    What a sharding backend needs of a family is declared here, never asked of the family's
    own classes: :meth:`replicated_parameters` (state kept whole on every rank),
    :meth:`grouped_tensors` (groups a shard must not cut), and the :class:`ShardView` the
    backend hands back (:meth:`use_shard_view`), through which the family and its regularizers
    read sharded state.

    Args:
        include: fnmatch patterns of module names to target (default: the adapter's Linears).
        exclude: fnmatch patterns of module names to leave dense.
    """

    #: what this rank holds of the state (set by :meth:`use_shard_view`)
    shard_view: ShardView = WHOLE

    def __init__(self, include: list[str] | None = None, exclude: list[str] | None = None):
        self.include = include
        self.exclude = exclude
        self._targets: dict[str, nn.Module] = {}
        self.updated_weights: set[str] = set()  # targets whose W0 was replaced (apply_weights)
        self.updated_biases: set[str] = set()  # targets whose bias was replaced (apply_biases)

    def make_parametrization(
        self, name: str, module: nn.Module, transposed: bool
    ) -> MaskParametrization:
        """Build the parametrization for one target module's ``weight`` (called by the default
        :meth:`attach`; a family that overrides ``attach``, e.g. ``uniform_structured``, need
        not implement it)."""
        raise NotImplementedError(
            f"mask family {type(self).__name__}: implement make_parametrization() or attach()"
        )

    @abstractmethod
    def verify(self) -> None:
        """Raise ``ValueError`` naming the layer if a hard mask breaks the family's pattern."""

    @abstractmethod
    def exported_checker(self) -> Callable[[nn.Module], None]:
        """A check of a reloaded exported model (call before :meth:`bake`): raises on mismatch."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Pattern description written into ``pruning.json``."""

    def hf_exporter(self) -> Callable[..., Any] | None:
        """The function behind ``export --format hf`` for this family; ``None`` (the default)
        means dense weights with exact zeros (``lightning_prune.export.hf.export_hf``).

        Called as ``exporter(module, output_dir, overwrite=..., run_config=...)``.
        """
        return None

    def attach(self, model: nn.Module, adapter: ModelAdapter) -> None:
        """Register one parametrization per target module of ``model``."""
        targets = adapter.target_linears(model, self.include, self.exclude)
        if not targets:
            raise ConfigError(
                f"mask_family.include/exclude ({self.include}/{self.exclude}) select no module"
            )
        for name, module in targets.items():
            transposed = adapter.weight_is_transposed(module)
            parametrization = self.make_parametrization(name, module, transposed)
            parametrize.register_parametrization(module, "weight", parametrization, unsafe=True)
            self._targets[name] = module

    def targets(self) -> dict[str, nn.Module]:
        """Target modules by qualified name (each holds its parametrization)."""
        return self._targets

    def reset_state(self) -> None:
        """Initialise the mask state from the loaded W0 once a model built on the meta device
        has storage (sharded loading); the state attached on meta holds no values. Families
        that do not override it are attached to a whole model loaded on every rank."""
        raise ConfigError(
            f"mask family {type(self).__name__} cannot be attached to a model built on the meta "
            "device (sharded loading)"
        )

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Mask parameters a sharding backend keeps whole on every rank (small state that is
        read outside its layer's forward, e.g. gate logits and Lagrange multipliers); their
        gradients are averaged over ranks after every backward."""
        return []

    def grouped_tensors(self) -> list[GroupedTensor]:
        """Tensors whose groups a sharding backend must keep on one rank (default: none).
        Read after sharding too, so return the tensors the targets hold now."""
        return []

    def use_shard_view(self, view: ShardView) -> None:
        """Read the mask state through ``view`` from now on (the family and every target's
        parametrization; :meth:`subset` views share it). Called by the sharding backend."""
        self.shard_view = view
        for parametrization in self.parametrizations().values():
            parametrization.shard_view = view

    def subset(self, names: list[str]) -> MaskFamily:
        """A shallow copy of this family that sees only the targets ``names`` (e.g. those of
        one gathered unit of a sharded model); the mask state is shared, not copied."""
        view = copy.copy(self)
        view._targets = {name: self._targets[name] for name in names}
        return view

    def parametrizations(self) -> dict[str, MaskParametrization]:
        """The mask parametrization of every target, by module name."""
        return {
            n: cast(MaskParametrization, _weight_parametrizations(m)[0])
            for n, m in self._targets.items()
        }

    def originals(self) -> dict[str, torch.Tensor]:
        """The frozen pretrained weights W0, by module name."""
        return {n: _weight_parametrizations(m).original for n, m in self._targets.items()}

    def set_mode(self, mode: str) -> None:
        """``learn`` (training forward), ``hard`` (final mask) or ``off`` (dense W0)."""
        if mode not in MODES:
            raise ConfigError(f"mask mode: expected one of {MODES}, got '{mode}'")
        for parametrization in self.parametrizations().values():
            parametrization.set_mode(mode)

    @contextmanager
    def mode_while(self, mode: str) -> Iterator[None]:
        """Run every target in ``mode`` inside the block (e.g. ``off``: the stored weights);
        the mode before it is restored afterwards."""
        modes = [p.mode for p in self.parametrizations().values()]
        self.set_mode(mode)
        try:
            yield
        finally:
            self.set_mode(modes[0] if modes else "learn")

    def use_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Forward with the given hard masks (e.g. a one-shot baseline), not the learned ones."""
        for name, parametrization in self.parametrizations().items():
            parametrization.set_mode("hard")
            parametrization.final_mask = masks[name].to(parametrization.final_mask.device)

    def apply_initial_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Warm start the learnable state from one-shot hard masks (storage orientation)."""
        raise ConfigError(f"mask family {type(self).__name__} cannot start from an initial mask")

    def apply_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Replace the pretrained weights W0 of some targets (e.g. SparseGPT's updated weights).

        The hard mask then multiplies these weights, so measuring and exporting ship them;
        the names are kept in ``updated_weights`` so checkpoints save the replaced tensors.
        """
        originals = self.originals()
        for name, weight in weights.items():
            if name not in originals:
                raise ConfigError(f"apply_weights: '{name}' is not a target of this mask family")
            if weight.shape != originals[name].shape:
                raise ConfigError(
                    f"apply_weights: '{name}' has shape {tuple(originals[name].shape)}, "
                    f"got {tuple(weight.shape)}"
                )
            with torch.no_grad():
                originals[name].copy_(weight.to(originals[name]))
            self.updated_weights.add(name)

    def apply_biases(self, biases: dict[str, torch.Tensor]) -> None:
        """Replace the output bias of some targets (e.g. FLAP's bias compensation).

        Only targets that have a bias can take one (the exported config must hold it); the
        names are kept in ``updated_biases`` so checkpoints save the replaced tensors.
        """
        targets = self.targets()
        for name, bias in biases.items():
            if name not in targets:
                raise ConfigError(f"apply_biases: '{name}' is not a target of this mask family")
            stored = getattr(targets[name], "bias", None)
            if stored is None:
                raise ConfigError(
                    f"apply_biases: '{name}' has no bias ({type(targets[name]).__name__} "
                    "without one), so the exported model could not hold a replaced bias"
                )
            if bias.shape != stored.shape:
                raise ConfigError(
                    f"apply_biases: '{name}' has bias shape {tuple(stored.shape)}, "
                    f"got {tuple(bias.shape)}"
                )
            with torch.no_grad():
                stored.copy_(bias.to(stored))
            self.updated_biases.add(name)

    def harden(self) -> None:
        """Switch every target to its final hard mask and verify the pattern."""
        self.set_mode("hard")
        self.verify()

    def bake(self) -> None:
        """Replace every parametrized weight by its hard-masked value, in place."""
        self.harden()
        for module in self._targets.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            module.weight.requires_grad_(False)
        self._targets = {}

    def sparsity_report(self) -> dict[str, float]:
        """Share of zeros in each target's hard mask."""
        report = {}
        for name, parametrization in self.parametrizations().items():
            mask = parametrization.hard_mask()
            report[name] = 1.0 - mask.float().mean().item()
        return report


def _weight_parametrizations(module: nn.Module) -> parametrize.ParametrizationList:
    """The parametrizations of a target's ``weight`` (torch types a module's attributes as
    ``Tensor | Module``)."""
    parametrizations = cast(nn.ModuleDict, module.parametrizations)
    return cast(parametrize.ParametrizationList, parametrizations["weight"])
