"""FSDP1 (Lightning's ``FSDPStrategy``, GPUs): wrap per decoder layer, prox on whole groups.
The implementation of :class:`lightning_prune.backends.fsdp1.FSDP1Backend`; nothing else but
the launch checks (:mod:`lightning_prune.launch_checks`) imports it.

The backend's ``prepare`` (from ``PruningModule.configure_model``) wraps the LM in
``FullyShardedDataParallel`` (FSDP1): every decoder layer is one FSDP unit, the rest of the LM
(embeddings, norm, head) the root unit.
``use_orig_params=True`` keeps the surrogate weights as parameters of their own, so AdamW and
its moments work on each rank's flat shard: the learnable copy and the optimizer state stay
sharded. Small mask state read outside the layers' forward (structured gates, Lagrange
multipliers: ``MaskFamily.replicated_parameters()``) is left out of sharding
(``ignored_states``) and its gradients are averaged over ranks after every backward.

FSDP1 flattens every unit's parameters into one vector and cuts it into equal pieces, so
outside the forward a rank holds a 1-D slice of a surrogate that may start or end inside an
N:M group. Whatever needs whole groups (the prox, the regularizer's logged value and metrics,
the check of the hard mask) runs one FSDP unit at a time inside
``FullyShardedDataParallel.summon_full_params(unit, recurse=False)``: that unit's parameters
are whole on every rank, about one decoder layer of memory, and the prox writes its result
back into the shards (:func:`whole_group_views`). The forward sees whole parameters anyway.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_prune.errors import ConfigError
from lightning_prune.masks.base import STATE_DTYPE, dtype_names

if TYPE_CHECKING:
    from lightning_prune.adapters.base import ModelAdapter
    from lightning_prune.masks.base import MaskFamily
    from lightning_prune.regularizers.base import Regularizer


def is_fsdp1(strategy: Any) -> bool:
    """Whether ``strategy`` is Lightning's ``FSDPStrategy`` (or a subclass of it)."""
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


@dataclass
class FSDP1Layout:
    """What :func:`wrap_model` built: the root FSDP unit, the units holding mask targets (with
    the targets' names) and the trainable parameters FSDP does not manage."""

    root: nn.Module
    units: list[tuple[nn.Module, list[str]]] = field(default_factory=list)
    replicated: list[nn.Parameter] = field(default_factory=list)
    #: the mask state is sharded, so whole groups need a gathered unit
    gathers: bool = False


def check_strategy(strategy: Any) -> None:
    """Raise ``ConfigError`` for ``FSDPStrategy`` settings lightning-prune cannot train with.

    FSDP1 without sharding (``NO_SHARD``, which it also falls back to on one rank) fails in
    torch on a unit whose weights are all frozen and tied (the root unit of an LM with tied
    embeddings), from the second forward on.
    """
    from torch.distributed.fsdp import ShardingStrategy

    if not strategy.kwargs.get("use_orig_params", True):
        raise ConfigError(
            "trainer.strategy.init_args.use_orig_params: false; lightning-prune needs true "
            "(the optimizer and the prox work on the surrogate weights themselves)"
        )
    if strategy.sharding_strategy == ShardingStrategy.NO_SHARD:
        raise ConfigError(
            "trainer.strategy.init_args.sharding_strategy: NO_SHARD replicates the model "
            "(FSDP1 then fails on frozen tied weights); use strategy: ddp"
        )


def check_world_size(world_size: int | None) -> None:
    """FSDP1 on one rank falls back to ``NO_SHARD`` (see :func:`check_strategy`)."""
    if world_size == 1:
        raise ConfigError(
            "trainer.devices x trainer.num_nodes: 1 with FSDPStrategy, where FSDP1 falls back "
            "to NO_SHARD and fails on frozen tied weights; shard over 2 or more GPUs, or drop "
            "trainer.strategy to train on one device"
        )


def fsdp_kwargs(strategy: Any) -> dict[str, Any]:
    """The ``FullyShardedDataParallel`` arguments of Lightning's ``strategy``, checked."""
    check_strategy(strategy)
    kwargs = dict(strategy.kwargs)
    kwargs.pop("auto_wrap_policy", None)  # lightning-prune wraps per decoder layer itself
    kwargs.pop("use_orig_params", None)
    return {
        **kwargs,
        "use_orig_params": True,
        "cpu_offload": strategy.cpu_offload,
        "mixed_precision": strategy.mixed_precision_config,
        "sharding_strategy": strategy.sharding_strategy,
        "device_id": strategy.root_device,
    }


def wrap_model(
    model: nn.Module, adapter: ModelAdapter, family: MaskFamily, strategy: Any
) -> FSDP1Layout:
    """Wrap ``model`` in FSDP1: one unit per decoder layer, the rest of the LM as the root."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    check_strategy(strategy)
    check_world_size(strategy.world_size)
    layers = {id(layer) for layer in adapter.decoder_layers(model)}
    policy = partial(lambda_auto_wrap_policy, lambda_fn=lambda module: id(module) in layers)
    ignored = list(family.replicated_parameters())
    root = FSDP(
        model, auto_wrap_policy=policy, ignored_states=ignored or None, **fsdp_kwargs(strategy)
    )
    ignored_ids = {id(p) for p in ignored}
    gathers = any(
        p.requires_grad and id(p) not in ignored_ids
        for parametrization in family.parametrizations().values()
        for p in parametrization.parameters()
    )
    return FSDP1Layout(root, _units_of_targets(root, family.targets()), ignored, gathers)


def _units_of_targets(
    root: nn.Module, targets: dict[str, nn.Module]
) -> list[tuple[nn.Module, list[str]]]:
    """The FSDP units that hold mask targets, each with its targets' names, in model order."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    owner: dict[int, nn.Module] = {}

    def visit(module: nn.Module, unit: nn.Module) -> None:
        owner[id(module)] = unit
        for child in module.children():
            visit(child, child if isinstance(child, FSDP) else unit)

    visit(root, root)
    units: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, module in targets.items():
        unit = owner[id(module)]
        units.setdefault(id(unit), (unit, []))[1].append(name)
    return list(units.values())


def whole_group_views(
    family: MaskFamily, layout: FSDP1Layout | None, writeback: bool
) -> Iterator[MaskFamily]:
    """``family`` with whole N:M groups: itself when nothing is FSDP1-sharded, else one view per
    FSDP unit (:meth:`MaskFamily.subset`), yielded while that unit's parameters are gathered
    on every rank. ``writeback=True`` writes in-place changes back into the shards. Every rank
    must consume the whole iterator (the gathers are collective)."""
    if layout is None or not layout.gathers:
        yield family
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for unit, names in layout.units:
        with FSDP.summon_full_params(unit, recurse=False, writeback=writeback):
            yield family.subset(names)


def harden(family: MaskFamily, layout: FSDP1Layout | None) -> None:
    """``MaskFamily.harden`` on whole groups: the hard masks of FSDP1-sharded surrogates are
    computed in every forward (no full-size cache per rank) and checked one unit at a time."""
    if layout is None or not layout.gathers:
        family.harden()
        return
    family.set_mode("hard")
    for view in whole_group_views(family, layout, writeback=False):
        view.verify()


def check_regularizers(regularizers: list[Regularizer], layout: FSDP1Layout) -> None:
    """Smooth terms read the surrogates in ``training_step``, where FSDP1 holds flat slices."""
    if not layout.gathers:
        return
    smooth = [type(r).__name__ for r in regularizers if not r.has_prox]
    if smooth:
        raise ConfigError(
            f"model.regularizers: {', '.join(smooth)} add(s) a smooth term of the surrogate "
            "weights to the loss, which FSDPStrategy (FSDP1) holds as flat slices outside the "
            "forward; use configs/fsdp2.yaml (ModelParallelStrategy) or strategy: ddp"
        )


def check_dtypes(family: MaskFamily) -> None:
    """FSDP1 flattens each unit's frozen weights and its sharded mask state (surrogates) into
    one tensor of one dtype: refuse an LM whose dtype is not the mask state's (float32)."""
    replicated = {id(p) for p in family.replicated_parameters()}
    sharded = [
        p
        for parametrization in family.parametrizations().values()
        for p in parametrization.parameters()
        if id(p) not in replicated
    ]
    dtypes = {w.dtype for w in family.originals().values()}
    if sharded and dtypes != {STATE_DTYPE}:
        raise ConfigError(
            f"model.dtype: {dtype_names(dtypes)} with FSDPStrategy (FSDP1), which flattens "
            "every decoder layer's frozen weights and its float32 surrogate weights into one "
            "tensor of a single dtype; set model.dtype: float32 and trainer.precision: "
            "bf16-mixed (FSDP1 computes in bfloat16 and keeps float32 shards), or shard with "
            "configs/fsdp2.yaml"
        )


def clip_grad_norm_(module: nn.Module, layout: FSDP1Layout, max_norm: float) -> torch.Tensor:
    """Clip the gradient norm of every trainable parameter of ``module`` to ``max_norm``.

    FSDP's ``clip_grad_norm_`` on the root gives the norm over sharded and ignored parameters
    of the LM; parameters outside the LM (e.g. learned per-type targets) are added once, since
    their gradients are the same on every rank.
    """
    root: Any = layout.root  # a FullyShardedDataParallel
    total = root.clip_grad_norm_(math.inf)  # the norm only: the factor is 1
    inside = {id(p) for p in layout.root.parameters()}
    outside = [p.grad for p in module.parameters() if p.grad is not None and id(p) not in inside]
    if outside:
        norms = [total.float(), *(g.detach().float().norm().to(total.device) for g in outside)]
        total = torch.linalg.vector_norm(torch.stack(norms))
    factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for param in module.parameters():
        if param.grad is not None:
            param.grad.detach().mul_(factor.to(param.grad.device, param.grad.dtype))
    return total


def unshard_optimizer_states(optimizers: list[Any]) -> None:
    """Make whole tensors of the ``ShardedTensor`` s that loading a sharded FSDP1 checkpoint
    leaves in the optimizer state of parameters FSDP does not manage (replicated mask state):
    every rank fills in its shards and the ranks sum them. Collective: call on every rank."""
    import torch.distributed as dist
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    for optimizer in optimizers:
        for param, state in optimizer.state.items():
            for key, value in state.items():
                if not isinstance(value, ShardedTensor):
                    continue
                whole = torch.zeros(value.size(), dtype=value.dtype, device=param.device)
                for shard in value.local_shards():
                    meta = shard.metadata
                    where = tuple(
                        slice(start, start + size)
                        for start, size in zip(meta.shard_offsets, meta.shard_sizes)
                    )
                    whole[where] = shard.tensor.to(whole.device)
                dist.all_reduce(whole)
                state[key] = whole
