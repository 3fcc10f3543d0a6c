"""FSDP2 sharding of the pruned LM (``fully_shard`` per decoder layer) and its layout checks:
the implementation of :class:`lightning_prune.backends.fsdp2.FSDP2Backend`.

Lightning's ``ModelParallelStrategy`` calls ``PruningModule.configure_model`` with a device mesh;
the FSDP2 backend shards the frozen LM there. FSDP2 shards every parameter along dim 0 unless
told otherwise. What must stay whole is read from the mask family's declarations, never from
its own classes:

- ``MaskFamily.grouped_tensors()``: tensors with groups of consecutive entries along a dim
  (N:M groups along a weight's input dim). A tensor grouped along dim 0 (GPT-2 ``Conv1D``
  weights, ``[in, out]``) is sharded along dim 1 instead; one grouped along dim 1
  (``nn.Linear``, ``[out, in]``) is sharded by rows, so every rank holds whole groups;
  :func:`check_whole_groups` asserts the result and refuses a layout where a group straddles
  two shards.
- ``MaskFamily.replicated_parameters()``: small state read outside the layer's forward
  (structured gates, Lagrange multipliers) is not sharded, and
  :func:`all_reduce_replicated_grads` averages its gradients over ranks after every backward.

The family then reads its sharded state through :class:`DTensorShards` (its
``MaskFamily.shard_view``): ``DTensor`` local shards, sums over ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from lightning_prune.errors import ConfigError
from lightning_prune.masks.base import ShardView

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
    return cast(Any, tensor).to_local() if is_sharded(tensor) else tensor


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


class DTensorShards(ShardView):
    """The mask state as FSDP2 leaves it outside the forward: ``DTensor`` shards."""

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        return local(tensor)

    def holds_whole(self, tensor: torch.Tensor, shape: tuple[int, ...]) -> bool:
        return not is_sharded(tensor) and super().holds_whole(tensor, shape)

    def sum_over_ranks(self, value: torch.Tensor, of: torch.Tensor) -> torch.Tensor:
        """All-reduce ``value`` (on ``of``'s device: NCCL reduces device tensors only) when
        ``of`` is sharded; the result is on the CPU."""
        if not is_sharded(of):
            return value
        import torch.distributed as dist

        value = value.to(of.device, copy=True)
        dist.all_reduce(value)
        return value.cpu()


def shard_model(
    model: nn.Module, adapter: ModelAdapter, family: MaskFamily, mesh: DeviceMesh
) -> None:
    """``fully_shard`` every decoder layer, then the whole LM (embeddings, norm, head)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    ignored = set(family.replicated_parameters())
    # tensors grouped along dim 0 (weights stored [in, out]): shard dim 1, groups stay whole
    along_1 = {id(grouped.tensor) for grouped in family.grouped_tensors() if grouped.dim == 0}

    def placement(param: nn.Parameter) -> Shard | None:
        return Shard(1) if id(param) in along_1 else None

    for layer in adapter.decoder_layers(model):
        fully_shard(layer, mesh=mesh, shard_placement_fn=placement, ignored_params=ignored)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement, ignored_params=ignored)
    check_whole_groups(family)


def check_whole_groups(family: MaskFamily) -> None:
    """Raise ``ConfigError`` if any rank's shard of a grouped tensor of ``family`` cuts a
    group (``MaskFamily.grouped_tensors``)."""
    for grouped in family.grouped_tensors():
        tensor: Any = grouped.tensor
        if not is_sharded(tensor):
            continue
        size, m = tensor.shape[grouped.dim], grouped.size
        for mesh_dim, placement in enumerate(tensor.placements):
            if not (placement.is_shard() and placement.dim == grouped.dim):
                continue
            world = tensor.device_mesh.size(mesh_dim)
            rank = straddling_rank(size, world, m)
            if rank is not None:
                raise ConfigError(
                    f"layer '{grouped.name}': sharding its {size} {grouped.along} over {world} "
                    f"ranks cuts {grouped.group} of {m} on rank {rank} (shards "
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
