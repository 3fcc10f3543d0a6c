"""What plugins provide to each other: typed protocols, declared once and checked once.

A capability that one plugin reads from another (the N:M pattern of a mask family, its
surrogate weights, its unit gates, a regularizer that carries the Lagrange multipliers) is a
``typing.Protocol`` here. Providers implement it structurally: a third-party class with the
same members provides it without importing this module. Consumers declare what they read in a
class attribute ``requires`` (a tuple of these protocols), e.g.
``NMSparsityRegularizer.requires = (NMPattern, SurrogateWeights)``.

:func:`check_contracts` checks every plugin of a run against the others when the run is
assembled; :func:`require` checks one plugin (``Regularizer.bind`` uses it), with the same
message: it names both plugins and the missing capability. Code that only branches on a
capability tests ``isinstance(family, Protocol)``.

The runtime check (``@runtime_checkable``) sees whether the members exist, not their types;
mypy checks the types. Members that ``nn.Module`` keeps in its own tables (parameters,
buffers, submodules) are not seen by ``isinstance`` on Python 3.12+, so the runtime-checked
protocols list methods and plain attributes only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

from lightning_prune.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn


# -- mask families ------------------------------------------------------------------------------
@runtime_checkable
class NMPattern(Protocol):
    """A mask family that keeps ``n`` of every ``m`` consecutive inputs of each output row."""

    n: int
    m: int


class Surrogate(Protocol):
    """One target's parametrization in a :class:`SurrogateWeights` family (static only:
    ``nn.Module`` keeps ``surrogate`` among its parameters)."""

    @property
    def surrogate(self) -> nn.Parameter:
        """The learned float32 copy of W0, in weight storage orientation."""

    @property
    def w0_rms(self) -> float:
        """RMS of the whole pretrained weight W0 (over every rank when sharded)."""

    @property
    def transposed(self) -> bool:
        """The weight is stored ``[in, out]`` (GPT-2 ``Conv1D``)."""

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` viewed as ``[out, in]`` (its own inverse)."""

    def local_rows(self) -> torch.Tensor:
        """This rank's shard of the surrogate as ``[out, in]`` (whole groups)."""


@runtime_checkable
class SurrogateWeights(Protocol):
    """A mask family that learns a surrogate weight per target (ProxSparse's ``nm``)."""

    def surrogates(self) -> Mapping[str, Surrogate]:
        """Every target's parametrization, by module name."""


@runtime_checkable
class GatedUnits(Protocol):
    """Per-layer unit gates held to shared per-type targets by Lagrange multipliers
    (``uniform_structured``): what ``uniform_lagrangian`` and ``minimax`` read."""

    progress: float  # target ramp, 0 (dense) to 1 (final targets)

    def kinds(self) -> list[str]: ...
    def expected_kept(self, kind: str) -> torch.Tensor: ...
    def multipliers(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]: ...
    def current_target(self, kind: str) -> torch.Tensor: ...
    def final_target(self, kind: str) -> torch.Tensor: ...
    def mask_parameters(self) -> list[nn.Parameter]: ...
    def multiplier_parameters(self) -> list[nn.Parameter]: ...
    def target_parameters(self) -> list[nn.Parameter]: ...
    def set_progress(self, progress: float) -> None: ...
    def project_targets(self) -> None: ...
    def kept_counts(self) -> dict[str, int]: ...


@runtime_checkable
class ScoredUnits(Protocol):
    """A structured family whose kept units can be chosen from per-unit scores (the
    structured one-shot baselines)."""

    def kinds(self) -> list[str]: ...
    def gates(self, kind: str) -> Sequence[Any]: ...
    def gate_names(self, kind: str) -> list[str]: ...
    def out_projection(self, kind: str) -> str: ...
    def masks_from_scores(self, scores: dict[str, Any]) -> dict[str, torch.Tensor]: ...
    def magnitude_masks(self) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class UnitLayouts(Protocol):
    """A structured family that can list the units each layer keeps (the report)."""

    def layer_layouts(self) -> list[dict[str, torch.Tensor]]: ...


# -- regularizers -------------------------------------------------------------------------------
@runtime_checkable
class UniformTargets(Protocol):
    """A regularizer that carries the Lagrange multipliers holding every layer to the shared
    targets (``uniform_lagrangian``); the attribute's presence declares it."""

    enforces_uniform_targets: bool


@runtime_checkable
class WeightedTerm(Protocol):
    """A regularizer with a strength λ (logged as ``reg/<class>_lambda``)."""

    lam: float


# -- checks -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Capability:
    """How a protocol is named in errors: ``what`` it is, who provides it, the usual fix."""

    what: str
    provider: str  # "mask family" or "regularizers"
    fix: str


CAPABILITIES: dict[type, Capability] = {
    NMPattern: Capability("an N:M pattern (n, m)", "mask family", "use mask family nm"),
    SurrogateWeights: Capability(
        "surrogate weights (surrogates())", "mask family", "use mask family nm"
    ),
    GatedUnits: Capability(
        "unit gates with Lagrange multipliers (expected_kept, multipliers)",
        "mask family",
        "use mask family uniform_structured",
    ),
    ScoredUnits: Capability(
        "units chosen from scores (masks_from_scores)",
        "mask family",
        "use mask family uniform_structured",
    ),
    UnitLayouts: Capability(
        "per-layer unit layouts (layer_layouts)",
        "mask family",
        "use mask family uniform_structured",
    ),
    UniformTargets: Capability(
        "a term that carries the multipliers (enforces_uniform_targets)",
        "regularizers",
        "add `- class_path: uniform_lagrangian` to model.regularizers",
    ),
}


def capability(protocol: type) -> Capability:
    """How ``protocol`` is named in errors (a protocol of another package: by its name, from
    the mask family)."""
    return CAPABILITIES.get(protocol) or Capability(protocol.__name__, "mask family", "")


def requirements(plugin: object) -> tuple[type, ...]:
    """The protocols ``plugin`` (an instance or a class) declares in ``requires``; none for a
    plugin that declares nothing (third-party classes that do not derive from a base)."""
    return tuple(getattr(plugin, "requires", ()))


def plugin_name(plugin: object) -> str:
    """The entry-point name of ``plugin``'s class (``nm``, ``nm_sparsity``), else its class name."""
    from lightning_prune.registry import get_registry

    cls = plugin if isinstance(plugin, type) else type(plugin)
    path = f"{cls.__module__}.{cls.__qualname__}"
    for info in get_registry().infos():
        if info.class_path == path:
            return info.name
    return cls.__name__


def missing(
    plugin: object, family: object, regularizers: Iterable[object] | None = None
) -> list[type]:
    """The protocols ``plugin`` requires that neither ``family`` nor (for capabilities
    regularizers provide) any of ``regularizers`` provides; with ``regularizers=None`` only the
    family's are checked."""
    terms = None if regularizers is None else list(regularizers)
    absent = []
    for protocol in requirements(plugin):
        if capability(protocol).provider == "regularizers":
            if terms is not None and not any(isinstance(r, protocol) for r in terms):
                absent.append(protocol)
        elif not isinstance(family, protocol):
            absent.append(protocol)
    return absent


def require(
    kind: str, plugin: object, family: object, regularizers: Iterable[object] | None = None
) -> None:
    """Raise ``ConfigError`` if ``plugin`` (a ``kind``: ``regularizer``, ``solver``,
    ``init_mask``) requires a capability that ``family`` (or ``regularizers``) lacks."""
    terms = None if regularizers is None else list(regularizers)
    absent = missing(plugin, family, terms)
    if not absent:
        return
    cap = capability(absent[0])
    if cap.provider == "regularizers":
        names = ", ".join(plugin_name(r) for r in terms or ())
        found = f"none of them ({names}) does" if names else "no regularizer is set"
    else:
        found = f"mask family {plugin_name(family)} provides none"
    fix = f"; {cap.fix}" if cap.fix else ""
    raise ConfigError(
        f"{kind} {plugin_name(plugin)} requires {cap.what} from the {cap.provider}, but "
        f"{found}{fix}"
    )


def check_contracts(
    family: object,
    regularizers: Iterable[object] = (),
    solver: object | None = None,
    initializer: object | None = None,
) -> None:
    """Check, once when a run is assembled, that every plugin gets what it ``requires``: the
    regularizers, the solver and the ``init_mask`` initializer (an instance or its class)
    from the mask family and the regularizers. Raises ``ConfigError`` naming both plugins."""
    terms = list(regularizers)
    for term in terms:
        require("regularizer", term, family, terms)
    if solver is not None:
        require("solver", solver, family, terms)
    if initializer is not None:
        require("init_mask", initializer, family, terms)


def surrogates(family: object) -> Mapping[str, Surrogate]:
    """The surrogate parametrizations of a :class:`SurrogateWeights` family (for plugins whose
    ``requires`` names it, so the family was checked when the run was assembled)."""
    return cast(SurrogateWeights, family).surrogates()
