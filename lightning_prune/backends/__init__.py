"""Sharding backends: how a run distributes the LM and the mask state over ranks.

:func:`backend_for` chooses one from the trainer's strategy, once, in
``PruningModule.configure_model``; :func:`backend_class` is that choice without building the
backend (before any process starts: resume and block-wise checks). The interface is
:class:`~lightning_prune.backends.base.ShardingBackend`:

=====================================  ==========================  ==========================
strategy                               backend                     implementation
=====================================  ==========================  ==========================
none, ``SingleDeviceStrategy``, DDP    :class:`NoSharding`         (nothing special)
``ModelParallelStrategy`` (a mesh)     :class:`FSDP2Backend`       :mod:`lightning_prune.sharding`
``FSDPStrategy`` and subclasses        :class:`FSDP1Backend`       :mod:`lightning_prune.fsdp1`
=====================================  ==========================  ==========================
"""

from __future__ import annotations

from typing import Any

from lightning_prune.backends.base import NoSharding, ShardingBackend, clean_name
from lightning_prune.backends.fsdp1 import FSDP1Backend
from lightning_prune.backends.fsdp2 import FSDP2Backend
from lightning_prune.fsdp1 import is_fsdp1

__all__ = [
    "FSDP1Backend",
    "FSDP2Backend",
    "NoSharding",
    "ShardingBackend",
    "backend_class",
    "backend_for",
    "clean_name",
]


def backend_class(strategy: Any, device_mesh: Any = None) -> type[ShardingBackend]:
    """The backend kind of a run under ``strategy`` (``None``: no trainer) whose module has
    ``device_mesh`` (set by ``ModelParallelStrategy``): the one place that tells strategies
    apart."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if device_mesh is not None or isinstance(strategy, ModelParallelStrategy):
        return FSDP2Backend
    if is_fsdp1(strategy):
        return FSDP1Backend
    return NoSharding


def backend_for(strategy: Any, device_mesh: Any = None) -> ShardingBackend:
    """The backend of a run under ``strategy`` (``None``: no trainer) whose module has
    ``device_mesh``: FSDP2 when there is a mesh, FSDP1 under ``FSDPStrategy``, else none."""
    return backend_class(strategy, device_mesh).create(strategy, device_mesh)
