"""The FSDP2 backend (Lightning's ``ModelParallelStrategy``): ``fully_shard`` per decoder layer.

The implementation is :mod:`lightning_prune.sharding`. Every rank holds whole groups of its
shards (the family's ``grouped_tensors`` decide the shard dim), so the family itself is the
view with whole groups; the family reads its ``DTensor`` shards through
:class:`~lightning_prune.sharding.DTensorShards`, which sums partial values over ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, cast

from torch import nn

from lightning_prune.backends.base import BackendHost, ShardingBackend
from lightning_prune.masks.base import ShardView
from lightning_prune.sharding import (
    DTensorShards,
    all_reduce_replicated_grads,
    fsdp_mesh,
    shard_model,
)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from lightning_prune.adapters.base import ModelAdapter


class FSDP2Backend(ShardingBackend):
    """FSDP2 over the data-parallel ``mesh`` (tensor parallelism is refused)."""

    layout: ClassVar[str] = "fsdp2"
    shards_model: ClassVar[bool] = True
    loads_shards: ClassVar[bool] = True
    shard_view: ShardView = DTensorShards()

    def __init__(self, mesh: DeviceMesh):
        self.mesh = mesh

    @classmethod
    def create(cls, strategy: Any, device_mesh: Any) -> FSDP2Backend:
        mesh = fsdp_mesh(device_mesh if device_mesh is not None else strategy.device_mesh)
        assert mesh is not None
        return cls(mesh)

    def prepare(self, host: BackendHost, model: nn.Module, adapter: ModelAdapter) -> nn.Module:
        host.mask_family.use_shard_view(self.shard_view)
        shard_model(model, adapter, host.mask_family, self.mesh)
        return model

    def reduce_replicated_grads(self, host: BackendHost) -> None:
        """FSDP2 reduces only the parameters it shards."""
        all_reduce_replicated_grads(cast(nn.Module, host))
