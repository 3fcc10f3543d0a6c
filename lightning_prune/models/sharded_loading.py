"""Build a causal LM on the meta device and load each rank's shards straight from safetensors.

Under FSDP2 the whole model never exists in one process: the LM is built without storage,
sharded (``fully_shard``), given storage for this rank's shards only (``to_empty``), and every
shard is read from the checkpoint files as a slice (``safe_open(...).get_slice``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from lightning_prune.models.loading import ModelLoadError, load_config, resolve_model_path
from lightning_prune.sharding import is_sharded, local

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

PARAMETRIZED = ".parametrizations.weight.original"


def safetensors_files(name: str) -> dict[str, Path] | None:
    """Checkpoint key -> file for a local folder of safetensors weights, else ``None``."""
    folder = Path(resolve_model_path(name))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: folder / file for key, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as handle:
        return {key: single for key in handle.keys()}


def build_on_meta(
    name: str, dtype: str, attn_implementation: str | None, trust_remote_code: bool = False
) -> nn.Module:
    """The LM's modules with parameters on the meta device (buffers, e.g. RoPE, are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = load_config(name, trust_remote_code)  # checked like every other load
    kwargs = {"dtype": getattr(torch, dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.tie_weights()  # e.g. lm_head = embed_tokens: one parameter, stored once
    model.eval()
    return model


def materialize_shards(model: nn.Module, name: str, device: torch.device) -> None:
    """Give every (sharded) parameter storage on ``device`` and read its frozen shards.

    Trainable parameters (mask state) are left for the mask family to initialise.
    """
    files = safetensors_files(name)
    if files is None:
        raise ModelLoadError(f"model '{name}': no safetensors files to load shards from")
    buffers = {  # real buffers (RoPE tables) survive; meta ones held no data anyway
        key: value.detach().clone() for key, value in model.named_buffers() if not value.is_meta
    }
    model.to_empty(device=device)
    with torch.no_grad():
        for key, value in model.named_buffers():
            if key in buffers:
                value.copy_(buffers[key])
        by_file: dict[Path, list[tuple[str, nn.Parameter]]] = {}
        for fqn, param in model.named_parameters():
            if param.requires_grad:
                continue
            key = fqn.replace(PARAMETRIZED, ".weight")
            if key not in files:
                raise ModelLoadError(
                    f"model '{name}': weight '{key}' is not in its safetensors files; "
                    "refusing to run a partly random model"
                )
            by_file.setdefault(files[key], []).append((key, param))
        for file, params in by_file.items():
            for _key, param, shard in _read_shards(file, params):
                local(param).copy_(shard.to(param.dtype))


def _read_shards(
    file: Path, params: list[tuple[str, nn.Parameter]]
) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
    """This rank's slice of every parameter stored in ``file``."""
    from safetensors import safe_open
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    with safe_open(str(file), framework="pt") as handle:
        for key, param in params:
            stored = handle.get_slice(key)
            if tuple(stored.get_shape()) != tuple(param.shape):
                raise ModelLoadError(
                    f"weight '{key}' has shape {tuple(stored.get_shape())} in '{file}', the "
                    f"model expects {tuple(param.shape)}"
                )
            if is_sharded(param):
                sharded = cast("DTensor", param)
                shape, offset = compute_local_shape_and_global_offset(
                    sharded.shape, sharded.device_mesh, sharded.placements
                )
                index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
                yield key, param, stored[index]
            else:
                yield key, param, stored[:]
