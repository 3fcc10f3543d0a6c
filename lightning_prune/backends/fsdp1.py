"""The FSDP1 backend (Lightning's ``FSDPStrategy``, GPUs): one FSDP unit per decoder layer.

FSDP1 lives entirely behind this backend; its implementation is :mod:`lightning_prune.fsdp1`.
Outside the forward a rank holds flat 1-D slices of the sharded mask state, which the default
:class:`~lightning_prune.masks.base.ShardView` tells apart by their shape; whole groups exist
only inside ``summon_full_params`` on one unit at a time (:meth:`whole_group_views`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, cast

from torch import nn

from lightning_prune import fsdp1
from lightning_prune.backends.base import BackendHost, ShardingBackend
from lightning_prune.sharding import all_reduce_replicated_grads

if TYPE_CHECKING:
    from lightning_prune.adapters.base import ModelAdapter
    from lightning_prune.masks.base import MaskFamily


class FSDP1Backend(ShardingBackend):
    """FSDP1 with the settings of Lightning's ``strategy`` (checked when wrapping)."""

    layout: ClassVar[str] = "fsdp1"
    shards_model: ClassVar[bool] = True

    def __init__(self, strategy: Any):
        self.strategy = strategy
        self.wrapped: fsdp1.FSDP1Layout | None = None  # set by prepare

    @classmethod
    def create(cls, strategy: Any, device_mesh: Any) -> FSDP1Backend:
        return cls(strategy)

    def prepare(self, host: BackendHost, model: nn.Module, adapter: ModelAdapter) -> nn.Module:
        family = host.mask_family
        family.use_shard_view(self.shard_view)
        fsdp1.check_dtypes(family)
        self.wrapped = fsdp1.wrap_model(model, adapter, family, self.strategy)
        fsdp1.check_regularizers(host.regularizers, self.wrapped)
        for param in self.replicated(host):  # FSDP moves only what it manages
            param.data = param.data.to(self.strategy.root_device)
        return self.wrapped.root

    def replicated(self, host: BackendHost) -> list[nn.Parameter]:
        """What FSDP1 leaves whole: its ignored states and the trainable parameters outside
        the LM (e.g. the family's learned per-type targets)."""
        assert self.wrapped is not None
        params = {id(p): p for p in self.wrapped.replicated}
        for name, param in host.named_parameters():
            if param.requires_grad and name.split(".")[0] != "model":
                params.setdefault(id(param), param)
        return list(params.values())

    @property
    def gathers(self) -> bool:
        return self.wrapped is not None and self.wrapped.gathers

    def whole_group_views(self, family: MaskFamily, writeback: bool = True) -> Iterator[MaskFamily]:
        return fsdp1.whole_group_views(family, self.wrapped, writeback)

    def harden(self, family: MaskFamily) -> None:
        fsdp1.harden(family, self.wrapped)

    def reduce_replicated_grads(self, host: BackendHost) -> None:
        """FSDP1 ignores the replicated mask state."""
        if self.wrapped is not None:
            all_reduce_replicated_grads(cast(nn.Module, host), self.replicated(host))

    def clip_gradients(
        self, host: BackendHost, optimizer: Any, clip: float, algorithm: str
    ) -> None:
        if self.wrapped is not None and algorithm == "norm":
            fsdp1.clip_grad_norm_(cast(nn.Module, host), self.wrapped, clip)
            return  # Lightning refuses to clip by norm under FSDP1
        super().clip_gradients(host, optimizer, clip, algorithm)

    def after_checkpoint_load(self, optimizers: list[Any]) -> None:
        """Whole optimizer state of the replicated parameters after a sharded load."""
        if self.wrapped is not None:
            fsdp1.unshard_optimizer_states(optimizers)
