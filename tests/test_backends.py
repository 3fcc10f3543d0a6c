"""Sharding backends (lightning_prune/backends): one chosen per run from the strategy, what the
no-sharding backend does on one process, the declarations families make for them, and that
families and regularizers never import sharding code (the multi-rank behaviour is covered by
tests/test_distributed.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import (
    DDPStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from tool_modules import load_tool

from lightning_prune.backends import (
    FSDP1Backend,
    FSDP2Backend,
    NoSharding,
    backend_class,
    backend_for,
    clean_name,
)
from lightning_prune.masks.base import WHOLE
from lightning_prune.masks.nm import NMMaskFamily
from lightning_prune.module import PruningModule
from lightning_prune.regularizers.nm_sparsity import NMSparsityRegularizer
from lightning_prune.sharding import DTensorShards
from lightning_prune.solvers.proximal import ProximalSolver

ROOT = Path(__file__).resolve().parents[1]


def test_the_backend_is_chosen_from_the_strategy() -> None:
    assert type(backend_for(None)) is NoSharding  # no trainer (export, evaluate)
    for strategy in (SingleDeviceStrategy(torch.device("cpu")), DDPStrategy()):
        assert backend_class(strategy) is NoSharding  # DDP averages every gradient itself
        assert type(backend_for(strategy)) is NoSharding
    assert backend_class(ModelParallelStrategy()) is FSDP2Backend
    fsdp = FSDPStrategy()
    assert backend_class(fsdp) is FSDP1Backend
    backend = backend_for(fsdp)
    assert type(backend) is FSDP1Backend and backend.strategy is fsdp
    assert not backend.gathers  # nothing wrapped yet
    assert backend_class(type("CustomFSDP", (FSDPStrategy,), {})()) is FSDP1Backend


def test_what_checkpoints_and_fits_read_of_each_backend() -> None:
    assert NoSharding().layout_record(world_size=3) == {"fsdp2": False, "world_size": 3}
    assert FSDP2Backend.layout_flags() == {"fsdp2": True, "fsdp1": False}
    assert FSDP1Backend(None).layout_record(2) == {"fsdp2": False, "world_size": 2, "fsdp1": True}
    assert [b.shards_model for b in (NoSharding, FSDP2Backend, FSDP1Backend)] == [
        False,
        True,
        True,
    ]
    assert [b.loads_shards for b in (NoSharding, FSDP2Backend, FSDP1Backend)] == [
        False,
        True,
        False,
    ]
    assert clean_name("model._fsdp_wrapped_module.model.layers.0._fsdp_wrapped_module.w") == (
        "model.model.layers.0.w"
    )


def test_no_sharding_on_one_process(tiny_models) -> None:
    """Without a trainer the module gets the no-sharding backend: the family is its own view
    with whole groups, sums over ranks are the values themselves, and the regularizer's logged
    values are those of the family."""
    family = NMMaskFamily(2, 4)
    regularizer = NMSparsityRegularizer(lam=0.5)
    module = PruningModule(family, ProximalSolver(), [regularizer], tiny_models["llama"])
    module.configure_model()
    backend = module.backend
    assert type(backend) is NoSharding and not backend.gathers
    assert family.shard_view is WHOLE
    assert all(p.shard_view is WHOLE for p in family.parametrizations().values())
    assert list(backend.whole_group_views(family)) == [family]
    assert list(module.whole_group_views()) == [family]
    value = torch.tensor(2.5)
    surrogate = next(iter(family.surrogates().values())).surrogate
    assert backend.sum_over_ranks(value, surrogate) is value
    values = backend.regularizer_values([regularizer], family)
    assert values["reg/NMSparsityRegularizer"] == pytest.approx(float(regularizer.penalty(family)))
    assert values.keys() >= {"reg/nm_groups_done", "reg/nm_groups_nnz0"}
    backend.harden(family)
    hardened = family.parametrizations().values()
    assert all(p.mode == "hard" and p.final_mask.numel() for p in hardened)


@pytest.mark.parametrize("arch, dim", [("llama", 1), ("gpt2", 0)])
def test_nm_family_declares_its_groups(tiny_models, arch, dim) -> None:
    """Sharding backends read the family's declarations: N:M groups of m along the input dim
    of every surrogate and W0 (dim 0 of GPT-2's [in, out] Conv1D weights)."""
    family = NMMaskFamily(2, 4)
    module = PruningModule(family, ProximalSolver(), [], tiny_models[arch])
    module.configure_model()
    grouped = family.grouped_tensors()
    surrogates, originals = family.surrogates(), family.originals()
    assert len(grouped) == 2 * len(surrogates)
    assert {id(g.tensor) for g in grouped} == {
        id(t) for n, p in surrogates.items() for t in (p.surrogate, originals[n])
    }
    assert {(g.dim, g.size) for g in grouped} == {(dim, 4)}
    assert family.replicated_parameters() == []


def test_fsdp2_on_one_rank_hands_the_family_its_shard_view(tiny_models, tmp_path) -> None:
    """A module given a device mesh gets the FSDP2 backend: the family reads DTensor shards
    through its view (sharded loading resets the surrogates and W0's RMS from the shards), and
    the regularizer's sums over ranks give the unsharded values."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    def build() -> PruningModule:
        family = NMMaskFamily(2, 4)
        return PruningModule(
            family, ProximalSolver(), [NMSparsityRegularizer()], tiny_models["gpt2"]
        )

    whole = build()
    whole.configure_model()
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    sharded = build()
    sharded._device_mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
    sharded.configure_model()  # sharded loading: built on meta, shards read, state reset
    family, reference = sharded.mask_family, whole.mask_family
    assert type(sharded.backend) is FSDP2Backend
    assert isinstance(family.shard_view, DTensorShards)
    for name, parametrization in family.surrogates().items():
        expected = reference.surrogates()[name]
        assert type(parametrization.surrogate).__name__ == "DTensor"
        assert parametrization.surrogate.placements[0].dim == 1  # GPT-2: [in, out], groups whole
        assert torch.equal(parametrization.local_rows(), expected.local_rows())
        assert parametrization.w0_rms == pytest.approx(expected.w0_rms, rel=1e-6)
    assert list(sharded.backend.whole_group_views(family)) == [family]
    regularizer = sharded.regularizers[0]
    assert float(regularizer.penalty(family)) == pytest.approx(
        float(regularizer.penalty(reference)), rel=1e-6
    )
    assert regularizer.metrics(family) == regularizer.metrics(reference)


def test_dtensor_view_of_whole_tensors_is_the_default() -> None:
    view, tensor = DTensorShards(), torch.ones(4, 8)
    assert view.local(tensor) is tensor
    assert view.holds_whole(tensor, (4, 8)) and not view.holds_whole(tensor.view(-1), (4, 8))
    value = torch.tensor(3.0)
    assert view.sum_over_ranks(value, tensor) is value  # whole here: nothing to sum


def test_families_and_regularizers_import_no_sharding_code() -> None:
    check_imports = load_tool("check_imports")
    sharding = ("lightning_prune.backends", "lightning_prune.sharding", "lightning_prune.fsdp1")
    plugins = ("lightning_prune.masks", "lightning_prune.regularizers")
    edges = check_imports.import_graph(ROOT / "lightning_prune")
    leaks = [
        (e.source, e.target)
        for e in edges
        if e.source.startswith(plugins) and e.target.startswith(sharding)
    ]
    assert leaks == []
