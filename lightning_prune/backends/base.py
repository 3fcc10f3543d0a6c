"""The sharding backend interface, and the backend of unsharded runs (one device, DDP).

A :class:`ShardingBackend` is chosen once, in ``PruningModule.configure_model``, from the
trainer's strategy (:func:`lightning_prune.backends.backend_for`); the user still picks
``trainer.strategy``. It holds everything that depends on how the model and the mask state
are distributed over ranks, so that the module, the mask families and the regularizers never
branch on the strategy:

- :meth:`~ShardingBackend.prepare`: shard or wrap the LM once the masks are attached, and hand
  the family the :class:`~lightning_prune.masks.base.ShardView` it reads its state through;
- :meth:`~ShardingBackend.whole_group_views` and :meth:`~ShardingBackend.harden`: the family
  with whole groups, for a prox or the hard-mask check;
- :meth:`~ShardingBackend.sum_over_ranks`: a per-rank partial value summed over ranks (the same
  as the family's ``shard_view.sum_over_ranks``, which is how regularizers reach it);
- :meth:`~ShardingBackend.reduce_replicated_grads` and :meth:`~ShardingBackend.clip_gradients`;
- :attr:`~ShardingBackend.layout`, :meth:`~ShardingBackend.layout_flags` and
  :meth:`~ShardingBackend.layout_record`: what checkpoints record and check;
- :meth:`~ShardingBackend.after_checkpoint_load`.

A backend reads the family's declarations only (``MaskFamily.replicated_parameters``,
``grouped_tensors``, ``parametrizations``, ``targets``, ``subset``), never a family's own
classes; families and regularizers never import this package.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from lightning_prune.checkpoint_format import layout_record
from lightning_prune.masks.base import WHOLE, ShardView

if TYPE_CHECKING:
    from lightning_prune.adapters.base import ModelAdapter
    from lightning_prune.masks.base import MaskFamily
    from lightning_prune.regularizers.base import Regularizer

#: prefixes that wrappers (FSDP1 units, activation checkpointing) add to parameter names;
#: state-dict keys lack them
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_name(name: str) -> str:
    """A parameter name as state dicts write it (without wrapper prefixes)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


class BackendHost(Protocol):
    """What a backend reads of the ``LightningModule`` it serves (``PruningModule``): the LM
    is its ``model`` attribute, so its parameter names start with ``model.``."""

    mask_family: MaskFamily
    regularizers: list[Regularizer]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def clip_gradients(
        self, optimizer: Any, gradient_clip_val: Any, gradient_clip_algorithm: Any
    ) -> None: ...


class ShardingBackend:
    """How one run distributes the LM and the mask state; see the module docstring.

    Subclasses implement :meth:`create` and :meth:`prepare`; the other defaults are those of
    an unsharded run: every rank holds the whole model and state, the strategy (DDP or none)
    averages every gradient, and Lightning clips them.
    """

    #: the checkpoint layout this backend saves and resumes (``checkpoints.SAVED_BY`` keys)
    layout: ClassVar[str] = "unsharded"
    #: the LM is sharded over ranks (a block-wise fit refuses it)
    shards_model: ClassVar[bool] = False
    #: the LM may be built on the meta device and each rank read its own shards
    loads_shards: ClassVar[bool] = False
    #: what this rank holds of the mask state, handed to the family by :meth:`prepare`
    shard_view: ShardView = WHOLE

    @classmethod
    def create(cls, strategy: Any, device_mesh: Any) -> ShardingBackend:
        """The backend for a run under ``strategy`` (``None`` without a trainer) whose module
        was given ``device_mesh`` (``None`` but under ``ModelParallelStrategy``)."""
        raise NotImplementedError

    def prepare(self, host: BackendHost, model: nn.Module, adapter: ModelAdapter) -> nn.Module:
        """Shard or wrap ``model`` (the LM of ``host``, masks attached, frozen) and return what
        ``host.model`` must hold from now on. Hands ``host.mask_family`` this backend's
        :attr:`shard_view`."""
        raise NotImplementedError

    @property
    def gathers(self) -> bool:
        """Whether whole groups need collective gathers (never inside the forward or the
        backward: the module then logs the regularizers before the optimizer step)."""
        return False

    def whole_group_views(self, family: MaskFamily, writeback: bool = True) -> Iterator[MaskFamily]:
        """``family`` with whole groups, for a prox or a hard-mask computation: the family
        itself, or views of it (``MaskFamily.subset``) while their state is gathered, with
        in-place changes written back when ``writeback``. Every rank must consume the whole
        iterator (gathers are collective)."""
        yield family

    def harden(self, family: MaskFamily) -> None:
        """``MaskFamily.harden`` (final hard masks, pattern verified) on whole groups."""
        family.harden()

    def sum_over_ranks(self, value: torch.Tensor, of: torch.Tensor) -> torch.Tensor:
        """``value``, a sum over this rank's part of the state tensor ``of``, summed over
        the ranks (``value`` itself when ``of`` is whole on every rank)."""
        return self.shard_view.sum_over_ranks(value, of)

    def reduce_replicated_grads(self, host: BackendHost) -> None:
        """Average over ranks the gradients the strategy does not reduce (after backward)."""

    def clip_gradients(
        self, host: BackendHost, optimizer: Any, clip: float, algorithm: str
    ) -> None:
        """Clip the gradients of ``host``'s trainable parameters to ``clip``."""
        host.clip_gradients(optimizer, clip, algorithm)

    def after_checkpoint_load(self, optimizers: list[Any]) -> None:
        """Fix up state the strategy loaded (collective: every rank calls it)."""

    @classmethod
    def layout_flags(cls) -> dict[str, bool]:
        """``fsdp2`` and ``fsdp1``: the arguments of ``checkpoint_format.layout_record`` and of
        ``checkpoints.check_resume_layout``/``check_sharded_strategy`` for this layout."""
        return {"fsdp2": cls.layout == "fsdp2", "fsdp1": cls.layout == "fsdp1"}

    def layout_record(self, world_size: int) -> dict[str, Any]:
        """The checkpoint's layout entry (``checkpoint_format.LAYOUT_KEY``)."""
        return layout_record(world_size=world_size, **self.layout_flags())

    @torch.no_grad()
    def regularizer_values(
        self, regularizers: list[Regularizer], family: MaskFamily
    ) -> dict[str, float]:
        """Every regularizer's weighted value (``reg/NAME``) and metrics (``reg/KEY``), on
        :meth:`whole_group_views` of ``family``.

        Over several views, values are summed (the terms are sums over layers) and metrics,
        which are shares of groups, are averaged weighted by each view's number of mask
        entries.
        """
        parts: list[tuple[dict[str, float], float]] = []
        for view in self.whole_group_views(family, writeback=False):
            values: dict[str, float] = {}
            for regularizer in regularizers:
                values[f"reg/{type(regularizer).__name__}"] = float(regularizer.penalty(view))
                values.update({f"reg/{k}": v for k, v in regularizer.metrics(view).items()})
            size = sum(w.numel() for w in view.originals().values())
            parts.append((values, float(size)))
        if len(parts) == 1:
            return parts[0][0]
        penalties = {f"reg/{type(r).__name__}" for r in regularizers}
        combined: dict[str, float] = {}
        for key in dict.fromkeys(k for values, _ in parts for k in values):
            present = [(values[key], size) for values, size in parts if key in values]
            if key in penalties:
                combined[key] = math.fsum(value for value, _ in present)
            else:
                total = math.fsum(size for _, size in present)
                combined[key] = math.fsum(value * size for value, size in present) / total
        return combined


class NoSharding(ShardingBackend):
    """One device, or DDP: every rank holds the whole LM and mask state, and DDP averages
    every gradient itself (nothing is replicated outside it), so nothing is special."""

    @classmethod
    def create(cls, strategy: Any, device_mesh: Any) -> NoSharding:
        return cls()

    def prepare(self, host: BackendHost, model: nn.Module, adapter: ModelAdapter) -> nn.Module:
        host.mask_family.use_shard_view(self.shard_view)
        return model
