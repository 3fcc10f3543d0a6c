"""Plugin contracts: the protocols of ``lightning_prune.contracts``, the ``requires`` each plugin
declares, and the one check that names both plugins (no model needed: families alone, or a
two-layer toy model)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_prune.adapters.base import ModelAdapter
from lightning_prune.contracts import (
    GatedUnits,
    NMPattern,
    ScoredUnits,
    SurrogateWeights,
    UniformTargets,
    UnitLayouts,
    WeightedTerm,
    check_contracts,
    require,
    surrogates,
)
from lightning_prune.errors import ConfigError
from lightning_prune.export.compressed import CompressedNMExporter, nm_pattern
from lightning_prune.export.hf import HFExporter
from lightning_prune.masks.base import MaskFamily
from lightning_prune.masks.magnitude import MagnitudeInit
from lightning_prune.masks.nm import NMMaskFamily
from lightning_prune.masks.structured import UniformStructuredFamily
from lightning_prune.regularizers.base import Regularizer
from lightning_prune.regularizers.nm_sparsity import NMSparsityRegularizer
from lightning_prune.regularizers.uniform_lagrangian import UniformLagrangian
from lightning_prune.regularizers.weight_anchor import WeightAnchorRegularizer
from lightning_prune.solvers.minimax import MinimaxSolver
from lightning_prune.solvers.proximal import ProximalSolver

FAMILY_PROTOCOLS = (NMPattern, SurrogateWeights, GatedUnits, ScoredUnits, UnitLayouts)


def structured() -> UniformStructuredFamily:
    return UniformStructuredFamily(keep_channels=0.5)


class ToyAdapter(ModelAdapter):
    """Two 'decoder layers' with one Linear each; ``transposed`` marks both [in, out]."""

    layers_path, linear_names = "layers", ("fc",)

    def __init__(self, transposed: bool = False):
        self.transposed = transposed

    def weight_is_transposed(self, module: nn.Module) -> bool:
        return self.transposed


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList()
    for _ in range(2):
        layer = nn.Module()
        layer.fc = nn.Linear(8, 4, bias=False)
        model.layers.append(layer)
    return model.requires_grad_(False)


class ThirdPartyNM:
    """A family of another package: N:M with surrogates, implemented structurally (it imports
    nothing from lightning_prune.contracts)."""

    def __init__(self) -> None:
        self.n, self.m = 2, 4

    def surrogates(self) -> dict:
        return {}


# -- the protocols -------------------------------------------------------------------------------
def test_each_family_provides_its_protocols_and_no_other() -> None:
    nm, gates = NMMaskFamily(2, 4), structured()
    provided = {
        NMPattern: (True, False),
        SurrogateWeights: (True, False),
        GatedUnits: (False, True),
        ScoredUnits: (False, True),
        UnitLayouts: (False, True),
    }
    for protocol, (by_nm, by_structured) in provided.items():
        assert isinstance(nm, protocol) is by_nm, protocol.__name__
        assert isinstance(gates, protocol) is by_structured, protocol.__name__


def test_regularizer_protocols() -> None:
    lagrangian, nm, anchor = UniformLagrangian(), NMSparsityRegularizer(), WeightAnchorRegularizer()
    assert isinstance(lagrangian, UniformTargets)
    assert not isinstance(nm, UniformTargets) and not isinstance(anchor, UniformTargets)
    assert isinstance(nm, WeightedTerm) and isinstance(anchor, WeightedTerm)
    assert not isinstance(lagrangian, WeightedTerm)


def test_declared_requirements() -> None:
    assert NMSparsityRegularizer.requires == (NMPattern, SurrogateWeights)
    assert WeightAnchorRegularizer.requires == (SurrogateWeights,)
    assert UniformLagrangian.requires == (GatedUnits,)
    assert MagnitudeInit.requires == (NMPattern,)
    assert CompressedNMExporter.requires == (NMPattern,)
    assert Regularizer.requires == () and HFExporter.requires == ()


def test_surrogates_are_the_nm_parametrizations_with_their_layout() -> None:
    for transposed in (False, True):
        model = toy_model()
        if transposed:  # store [in, out], as GPT-2's Conv1D does
            for layer in model.layers:
                layer.fc.weight = nn.Parameter(layer.fc.weight.t().contiguous(), False)
        family = NMMaskFamily(2, 4)
        family.attach(model, ToyAdapter(transposed))
        found = surrogates(family)
        assert found == family.parametrizations()
        for name, p in found.items():
            w0 = family.originals()[name]
            assert p.transposed is transposed
            assert torch.equal(p.surrogate.detach(), w0)
            assert p.w0_rms == pytest.approx(float(w0.pow(2).mean().sqrt()))
            assert p.rows(w0).shape == (4, 8)  # [out, in] either way
            assert torch.equal(p.rows(p.rows(w0)), w0)
            assert torch.equal(p.local_rows(), p.rows(p.surrogate.detach()))


# -- one check, both plugins named --------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "regularizer", "message"),
    [
        (
            structured,
            NMSparsityRegularizer,
            r"^regularizer nm_sparsity requires an N:M pattern \(n, m\) from the mask family, "
            r"but mask family uniform_structured provides none; use mask family nm$",
        ),
        (
            structured,
            WeightAnchorRegularizer,
            r"^regularizer weight_anchor requires surrogate weights .* but mask family "
            r"uniform_structured provides none; use mask family nm$",
        ),
        (
            lambda: NMMaskFamily(2, 4),
            UniformLagrangian,
            r"^regularizer uniform_lagrangian requires unit gates .* but mask family nm provides "
            r"none; use mask family uniform_structured$",
        ),
    ],
)
def test_a_regularizer_on_the_wrong_family_names_both(family, regularizer, message) -> None:
    with pytest.raises(ConfigError, match=message):
        check_contracts(family(), [regularizer()], ProximalSolver())
    with pytest.raises(ConfigError, match=message):  # bind, before the check is wired in
        regularizer().bind(family())


def test_matching_plugins_pass() -> None:
    nm, gates = NMMaskFamily(2, 4), structured()
    check_contracts(nm, [NMSparsityRegularizer(), WeightAnchorRegularizer()], ProximalSolver())
    check_contracts(gates, [UniformLagrangian()], MinimaxSolver(), None)
    check_contracts(nm, [], ProximalSolver(), MagnitudeInit)
    for regularizer in (NMSparsityRegularizer(), WeightAnchorRegularizer()):
        regularizer.bind(nm)
    UniformLagrangian().bind(gates)


def test_the_solver_is_checked_against_family_and_regularizers() -> None:
    check_contracts(structured(), [UniformLagrangian()], MinimaxSolver())
    with pytest.raises(
        ConfigError,
        match=r"^solver minimax requires unit gates .* mask family nm provides none; "
        r"use mask family uniform_structured$",
    ):
        check_contracts(NMMaskFamily(2, 4), [], MinimaxSolver())
    without = r"^solver minimax requires a term that carries the multipliers .* regularizers"
    with pytest.raises(ConfigError, match=without + r", but no regularizer is set; add `- "):
        check_contracts(structured(), [], MinimaxSolver())
    named = r"none of them \(nm_sparsity\) does; .*uniform_lagrangian"
    with pytest.raises(ConfigError, match=named):
        require("solver", MinimaxSolver(), structured(), [NMSparsityRegularizer()])
    require("solver", MinimaxSolver(), structured())  # regularizers unknown: family only


def test_the_initializer_is_checked_as_a_class_or_an_instance() -> None:
    message = r"^init_mask magnitude requires an N:M pattern .* mask family uniform_structured"
    for initializer in (MagnitudeInit, MagnitudeInit()):
        with pytest.raises(ConfigError, match=message):
            check_contracts(structured(), [UniformLagrangian()], None, initializer)
    with pytest.raises(ConfigError, match="init_mask 'magnitude' needs an N:M mask family"):
        MagnitudeInit().compute(nn.Module(), structured())  # its own check, unchanged


def test_baseline_initializers_declare_their_family() -> None:
    from lightning_prune.registry import get_registry

    registry = get_registry()
    if "wanda" not in registry.names("initializers"):
        pytest.skip("lightning-prune-baselines is not installed")
    cases = (("wanda", NMMaskFamily(2, 4), structured()), ("flap", structured(), NMMaskFamily()))
    for name, fits, other in cases:
        initializer = registry.get("initializers", name)
        check_contracts(fits, [], None, initializer)
        with pytest.raises(ConfigError, match=f"^init_mask {name} requires .* provides none"):
            check_contracts(other, [], None, initializer)


# -- third-party classes -------------------------------------------------------------------------
def test_a_structural_third_party_family_provides_the_protocols() -> None:
    family = ThirdPartyNM()
    assert isinstance(family, NMPattern) and isinstance(family, SurrogateWeights)
    assert not isinstance(family, GatedUnits)
    check_contracts(family, [NMSparsityRegularizer(), WeightAnchorRegularizer()], ProximalSolver())
    assert CompressedNMExporter().supports(family) and nm_pattern(family) == (2, 4)
    assert not CompressedNMExporter().supports(structured())
    with pytest.raises(ConfigError, match="mask family ThirdPartyNM provides none"):
        check_contracts(family, [UniformLagrangian()])


def test_a_third_party_plugin_declares_its_needs() -> None:
    class OddOnly(Regularizer):  # not registered: named by its class
        requires = (NMPattern,)

    class Sliced:  # a solver of another package that derives from no base
        pass

    with pytest.raises(ConfigError, match=r"^regularizer OddOnly requires an N:M pattern"):
        check_contracts(structured(), [OddOnly()], Sliced())
    check_contracts(ThirdPartyNM(), [OddOnly()], Sliced())  # Sliced declares nothing


def test_a_protocol_of_another_package_is_named_in_the_error() -> None:
    from typing import Protocol, runtime_checkable

    @runtime_checkable
    class Widths(Protocol):
        def widths(self) -> list[int]: ...

    class NeedsWidths(Regularizer):
        requires = (Widths,)

    with pytest.raises(ConfigError, match=r"requires Widths from the mask family, but mask family"):
        check_contracts(NMMaskFamily(2, 4), [NeedsWidths()])


# -- the mask-family base ------------------------------------------------------------------------
def test_a_family_that_attaches_its_own_state_needs_no_make_parametrization() -> None:
    class Minimal(MaskFamily):
        def verify(self) -> None: ...

        def exported_checker(self):
            return lambda model: None

        def describe(self) -> dict:
            return {}

    family = Minimal()  # instantiable: make_parametrization is no longer abstract
    with pytest.raises(NotImplementedError, match="mask family Minimal: implement"):
        family.attach(toy_model(), ToyAdapter())
    assert "make_parametrization" not in UniformStructuredFamily.__dict__
