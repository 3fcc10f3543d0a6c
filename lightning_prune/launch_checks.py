"""Checks of the trainer's strategy, precision, devices and nodes, before any process starts.

Every message names the ``trainer`` field at fault and what to use instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from lightning_prune.errors import ConfigError
from lightning_prune.fsdp1 import check_strategy, check_world_size, is_fsdp1

#: strategies that need CUDA GPUs (Lightning refuses them on CPU, or NCCL cannot start)
GPU_ONLY = ("fsdp", "fsdpstrategy", "deepspeed", "deepspeedstrategy", "xla", "xlastrategy")
#: Lightning's FSDPStrategy (FSDP1): registered names and the class name
FSDP1 = ("fsdp", "fsdp_cpu_offload", "fsdpstrategy")
FSDP2 = "modelparallelstrategy"
#: Lightning's short ``trainer.precision`` values and what they stand for
PRECISION_ALIASES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}
#: precisions that keep the mask state float32 while the LM computes in (b)float16 or float32
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true")
#: precisions Lightning does not honour on CPU (it silently runs ``bf16-mixed`` instead)
GPU_PRECISIONS = ("16-mixed",)


def strategy_name(strategy: Any) -> str:
    """Lower-case name of a strategy given as a string, a class path or an instance."""
    if isinstance(strategy, str):
        return strategy.rsplit(".", 1)[-1].lower()
    return type(strategy).__name__.lower()


def check_trainer_config(config: Mapping[str, Any], env: Mapping[str, str] | None = None) -> None:
    """Raise ``ConfigError`` when the strategy, precision, devices or nodes cannot work here."""
    env = os.environ if env is None else env
    strategy = config.get("strategy", "auto")
    name = strategy_name(strategy)
    accelerator = str(config.get("accelerator", "auto")).lower()
    has_gpu = torch.cuda.is_available()
    if not has_gpu and accelerator in ("gpu", "cuda"):
        raise ConfigError(
            f"trainer.accelerator: '{accelerator}' but this machine has no CUDA GPU; use "
            "accelerator: cpu"
        )
    on_cpu = not has_gpu or accelerator == "cpu"
    if name in FSDP1 and on_cpu:
        raise ConfigError(
            f"trainer.strategy: '{name}' needs CUDA GPUs (Lightning's FSDPStrategy, FSDP1) and "
            "this run is on CPU; use configs/fsdp2.yaml (ModelParallelStrategy: FSDP2, the same "
            "sharding over gloo on CPU) or strategy: ddp"
        )
    if name.startswith(GPU_ONLY) and on_cpu:
        raise ConfigError(
            f"trainer.strategy: '{name}' needs CUDA GPUs and this run is on CPU; use "
            "configs/fsdp2.yaml (ModelParallelStrategy: FSDP2 over gloo on CPU) or "
            "strategy: ddp"
        )
    check_precision(config.get("precision"), name in FSDP1 or is_fsdp1(strategy), on_cpu)
    devices, nodes = config.get("devices", "auto"), config.get("num_nodes", 1)
    if name in FSDP1 or is_fsdp1(strategy):
        world = devices * nodes if isinstance(devices, int) and isinstance(nodes, int) else None
        check_world_size(world)
        if not isinstance(strategy, str):
            check_strategy(strategy)
    check_launcher(devices, nodes, env)
    if name == FSDP2 and not isinstance(strategy, str):
        check_model_parallel(strategy, devices, nodes)


def precision_name(precision: Any) -> str:
    """Lightning's full name of a ``trainer.precision`` value (``bf16`` -> ``bf16-mixed``)."""
    value = "32-true" if precision is None else str(precision)
    return PRECISION_ALIASES.get(value, value)


def check_precision(precision: Any, fsdp1: bool, on_cpu: bool) -> None:
    """``trainer.precision`` must keep the mask state float32 and be honoured where it runs."""
    name = precision_name(precision)
    if name not in PRECISIONS:
        raise ConfigError(
            f"trainer.precision: '{precision}' is not supported; lightning-prune keeps the mask "
            "state and its optimizer in float32 and the LM in model.dtype, expected one of "
            f"{', '.join(PRECISIONS)}"
        )
    if name in GPU_PRECISIONS and on_cpu:
        raise ConfigError(
            f"trainer.precision: '{precision}' needs a CUDA GPU (float16 autocast) and this run "
            "is on CPU, where Lightning would run bf16-mixed instead; use bf16-mixed"
        )
    if name.endswith("-true") and name != "32-true" and fsdp1:
        raise ConfigError(
            f"trainer.precision: '{precision}' with FSDPStrategy (FSDP1) would cast the float32 "
            "mask state flattened with the LM; use bf16-mixed (FSDP1 computes in bfloat16 and "
            "keeps float32 shards)"
        )


def check_launcher(devices: Any, nodes: Any, env: Mapping[str, str]) -> None:
    """``devices``/``num_nodes`` must match the processes torchrun or SLURM started."""
    if "TORCHELASTIC_RUN_ID" in env and "LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env:
        per_node, world = int(env["LOCAL_WORLD_SIZE"]), int(env["WORLD_SIZE"])
        launcher = f"torchrun started {world} processes, {per_node} per node"
        _match(devices, per_node, nodes, world // max(per_node, 1), launcher)
    elif "SLURM_NTASKS_PER_NODE" in env and "SLURM_NNODES" in env and "SLURM_JOB_ID" in env:
        if env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
            return  # interactive allocation: Lightning launches the processes itself
        per_node = int(env["SLURM_NTASKS_PER_NODE"].split("(")[0])
        count = int(env["SLURM_NNODES"])
        launcher = f"SLURM runs {per_node} tasks per node on {count} nodes"
        _match(devices, per_node, nodes, count, launcher)


def _match(devices: Any, per_node: int, nodes: Any, node_count: int, launcher: str) -> None:
    if isinstance(devices, int) and devices != per_node:
        raise ConfigError(f"trainer.devices: {devices}, but {launcher}; set devices: {per_node}")
    if isinstance(nodes, int) and nodes != node_count:
        raise ConfigError(
            f"trainer.num_nodes: {nodes}, but {launcher}; set num_nodes: {node_count}"
        )


def check_model_parallel(strategy: Any, devices: Any, nodes: Any) -> None:
    """FSDP2 only: ``tensor_parallel_size`` 1 and ``data_parallel_size`` = devices x nodes."""
    tp = getattr(strategy, "_tensor_parallel_size", "auto")
    dp = getattr(strategy, "_data_parallel_size", "auto")
    world = devices * nodes if isinstance(devices, int) and isinstance(nodes, int) else None
    if tp != 1 and not (tp == "auto" and devices == 1):
        raise ConfigError(
            f"trainer.strategy.init_args.tensor_parallel_size: {tp!r}; lightning-prune shards "
            "with FSDP2 only, set tensor_parallel_size: 1 (and data_parallel_size: devices x "
            "num_nodes)"
        )
    if world is not None and dp != world and not (dp == "auto" and nodes == world):
        raise ConfigError(
            f"trainer.strategy.init_args.data_parallel_size: {dp!r}, expected devices x "
            f"num_nodes = {world} (every rank holds a shard and its own batches)"
        )
