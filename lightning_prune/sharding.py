"""FSDP2 sharding of the pruned LM (``fully_shard`` per decoder layer) and its layout checks.

Lightning's ``ModelParallelStrategy`` calls ``PruningModule.configure_model`` with a device mesh;
this module shards the frozen LM there. FSDP2 shards every parameter along dim 0 unless told
otherwise. N:M groups run along the *input* dim, so:

- ``nn.Linear`` weights (``[out, in]``) are sharded by rows: every rank holds whole groups;
- transposed weights (GPT-2 ``Conv1D``, ``[in, out]``) would be cut along the group dim, so
  their W0 and surrogate are sharded along dim 1 (output features) instead;
- :func:`check_whole_groups` asserts the result and refuses a layout where a group straddles
  two shards.

Mask state that is small and read outside the layer's forward (structured gates, Lagrange
multipliers) is not sharded: the family lists it in ``replicated_parameters()``, and
:func:`all_reduce_replicated_grads` averages its gradients over ranks after every backward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from lightning_prune.contracts import NMPattern, SurrogateWeights
from lightning_prune.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from lightning_prune.adapters.base import ModelAdapter
    from lightning_prune.masks.base import MaskFamily


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2-sharded parameter)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (a view of its storage), else ``tensor`` itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def shard_bounds(size: int, world: int) -> list[tuple[int, int]]:
    """``[start, end)`` of every rank's shard of a dim of ``size`` (FSDP2's ``torch.chunk``)."""
    chunk = -(-size // world)
    return [(min(r * chunk, size), min((r + 1) * chunk, size)) for r in range(world)]


def straddling_rank(size: int, world: int, m: int) -> int | None:
    """The first rank whose shard of a group dim of ``size`` cuts a group of ``m``, or ``None``."""
    for rank, (start, end) in enumerate(shard_bounds(size, world)):
        if start % m or (end - start) % m:
            return rank
    return None


def fsdp_mesh(device_mesh: DeviceMesh | None) -> DeviceMesh | None:
    """The 1-D data-parallel mesh FSDP2 shards over, or ``None`` when not model-parallel.

    Tensor parallelism is not supported: ``ModelParallelStrategy`` must be configured with
    ``tensor_parallel_size: 1`` and ``data_parallel_size`` = devices x nodes.
    """
    if device_mesh is None:
        return None
    if "tensor_parallel" in (device_mesh.mesh_dim_names or ()):
        tp = device_mesh["tensor_parallel"].size()
        if tp > 1:
            world = device_mesh.size()
            raise ConfigError(
                f"trainer.strategy: ModelParallelStrategy has tensor_parallel_size={tp}, but "
                "lightning-prune shards with FSDP2 only; set tensor_parallel_size: 1 and "
                f"data_parallel_size: {world} (devices x num_nodes)"
            )
        return device_mesh["data_parallel"]
    return device_mesh


def shard_model(
    model: nn.Module, adapter: ModelAdapter, family: MaskFamily, mesh: DeviceMesh
) -> None:
    """``fully_shard`` every decoder layer, then the whole LM (embeddings, norm, head)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    ignored = set(family.replicated_parameters())
    along_out = set()  # weights stored [in, out]: shard dim 1 so N:M groups stay whole
    if isinstance(family, SurrogateWeights):
        originals = family.originals()
        for name, parametrization in family.surrogates().items():
            if parametrization.transposed:
                along_out |= {id(parametrization.surrogate), id(originals[name])}

    def placement(param: nn.Parameter) -> Shard | None:
        return Shard(1) if id(param) in along_out else None

    for layer in adapter.decoder_layers(model):
        fully_shard(layer, mesh=mesh, shard_placement_fn=placement, ignored_params=ignored)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement, ignored_params=ignored)
    check_whole_groups(family)


def check_whole_groups(family: MaskFamily) -> None:
    """Raise ``ConfigError`` if any rank's shard of an N:M surrogate cuts a group."""
    if not (isinstance(family, NMPattern) and isinstance(family, SurrogateWeights)):
        return
    for name, parametrization in family.surrogates().items():
        surrogate = parametrization.surrogate
        if not is_sharded(surrogate):
            continue
        group_dim = 0 if parametrization.transposed else 1
        size, m = surrogate.shape[group_dim], family.m
        for mesh_dim, placement in enumerate(surrogate.placements):
            if not (placement.is_shard() and placement.dim == group_dim):
                continue
            world = surrogate.device_mesh.size(mesh_dim)
            rank = straddling_rank(size, world, m)
            if rank is not None:
                raise ConfigError(
                    f"layer '{name}': sharding its {size} input features over {world} ranks "
                    f"cuts an N:M group of {m} on rank {rank} (shards "
                    f"{shard_bounds(size, world)}); use a world size that splits them in "
                    f"multiples of {m}, or exclude the layer with mask_family.exclude"
                )


def all_reduce_replicated_grads(
    module: nn.Module, params: list[nn.Parameter] | None = None
) -> None:
    """Average the gradients of trainable, unsharded parameters over all ranks (FSDP2 only
    reduces the parameters it shards). ``params`` names them where sharded parameters are
    not DTensors (FSDP1: its ignored states and what lies outside the wrapped LM)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return
    candidates = module.parameters() if params is None else params
    grads = [
        p.grad for p in candidates if p.requires_grad and p.grad is not None and not is_sharded(p)
    ]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
