"""``--format hf`` for uniform structured masks: slice into an ordinary, smaller dense HF model.

Bake the hard masks, keep only the kept heads' query/KV rows and output columns and the kept
channels' input rows and output columns in every layer, load the result into a stock config with
fewer heads and a smaller ``intermediate_size`` (``head_dim`` explicit), then verify it in a
separate Python process that never imports lightning_prune: plain ``AutoModelForCausalLM`` loads
it, its logits equal the masked model's within ``LOGITS_ATOL`` plus ``LOGITS_RTOL`` of the
largest |logit| (see :mod:`lightning_prune.export.common`), ``generate`` runs, and its parameter
count equals the one written to ``pruning.json``.

The logits are compared in float32 whatever the model's dtype: in bfloat16 or float16 the sliced
matmuls round differently from the masked ones (on a 30-layer model by up to 15% of the largest
logit), which would hide a wrong slice. The weights are written in the model's dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from lightning_prune.export.atomic import atomic_directory
from lightning_prune.export.common import (
    LOGITS_ATOL,
    LOGITS_RTOL,
    ExportError,
    ExportSource,
    check_logits_error,
    export_record,
    masked_reference,
    source_model,
    verify_in_fresh_process,
    write_export_folder,
)

if TYPE_CHECKING:
    from lightning_prune.adapters.base import ModelAdapter, StructuredSpec


@runtime_checkable
class SlicedFamily(Protocol):
    """What the sliced export reads of its mask family (``uniform_structured`` provides it)."""

    decoder_params: int  # decoder-layer Linear parameters of the dense model

    def attached(self) -> tuple[ModelAdapter, StructuredSpec]: ...
    def layer_layouts(self) -> list[dict[str, torch.Tensor]]: ...
    def exported_shape(self) -> dict[str, int]: ...


def _not_sliceable(family: object) -> ExportError:
    return ExportError(
        f"export: mask family {type(family).__name__} has no per-layer unit layouts to slice "
        "the model by (uniform_structured has)"
    )


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def _select(tensor: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    return tensor.index_select(dim, index.to(tensor.device)).contiguous()


def _unit_index(units: torch.Tensor, size: int) -> torch.Tensor:
    """Column indices of the kept units of ``size`` consecutive columns each."""
    return (units[:, None] * size + torch.arange(size)).flatten()


def slice_state(module: ExportSource, layouts: list[dict[str, torch.Tensor]]) -> dict:
    """The baked model's state dict with every layer cut to its kept heads and channels."""
    family = module.mask_family
    if not isinstance(family, SlicedFamily):
        raise _not_sliceable(family)
    (adapter, spec), model = family.attached(), source_model(module)
    config: Any = model.config  # an HF PretrainedConfig
    layout = adapter.head_layout(config)
    channels_dense = adapter.intermediate_size(config)
    state = dict(model.state_dict())
    layers = adapter.decoder_layers(model)
    for index, kept in enumerate(layouts):
        prefix = f"{adapter.layers_path}.{index}."
        head_rows = _unit_index(kept["heads"], layout.head_dim)
        kv_rows = _unit_index(kept["kv_heads"], layout.head_dim)
        channel_rows = kept["channels"]
        cuts: list[tuple[str, torch.Tensor, str]] = []
        if spec.prunes_heads:
            assert spec.query is not None and spec.kv is not None and spec.attn_out is not None
            cuts += [(n, head_rows, "out") for n in spec.query]
            cuts += [(n, kv_rows, "out") for n in spec.kv]
            cuts.append((spec.attn_out, head_rows, "in"))
        if len(channel_rows) != channels_dense:
            cuts += [(n, channel_rows, "out") for n in spec.mlp_in]
            cuts.append((spec.mlp_out, channel_rows, "in"))
        for local, rows, side in cuts:
            transposed = adapter.weight_is_transposed(layers[index].get_submodule(local))
            out_dim, in_dim = (1, 0) if transposed else (0, 1)
            key = prefix + local
            state[key + ".weight"] = _select(
                state[key + ".weight"], rows, out_dim if side == "out" else in_dim
            )
            if side == "out" and key + ".bias" in state:
                state[key + ".bias"] = _select(state[key + ".bias"], rows, 0)
    return state


def export_structured_hf(
    module: ExportSource,
    output_dir: str | Path,
    overwrite: bool = False,
    run_config: dict[str, Any] | None = None,
) -> Path:
    """Slice the hard-masked model into a smaller stock HF model, verify it, rename into place.

    The module's model is consumed (its parametrizations are removed, and it is verified in
    float32: 4 bytes per weight while exporting a bfloat16 or float16 model).
    """
    from transformers import AutoModelForCausalLM

    model, family = source_model(module), module.mask_family
    if not isinstance(family, SlicedFamily):
        raise _not_sliceable(family)
    adapter, _ = family.attached()
    config: Any = model.config  # an HF PretrainedConfig
    dtype = model.dtype
    model.float()  # holds (b)float16 values exactly, without their matmul rounding
    dense_params = _param_count(model) - sum(
        p.numel() for g in family.parametrizations().values() for p in g.parameters()
    )
    probe, expected = masked_reference(module)
    layouts = family.layer_layouts()
    shape = family.exported_shape()
    record = {
        **export_record(module, run_config),
        "kept_units": {
            kind: [layout[kind].tolist() for layout in layouts]
            for kind in ("heads", "kv_heads", "channels")
        },
    }
    checker = family.exported_checker()
    family.bake()
    try:
        small_config = adapter.structured_config(
            config, shape["num_heads"], shape["num_kv_heads"], shape["intermediate_size"]
        )
    except ValueError as err:
        raise ExportError(f"export: the {config.model_type} config rejects {shape}: {err}") from err
    state = slice_state(module, layouts)
    small = AutoModelForCausalLM.from_config(small_config, dtype=model.dtype)
    small.load_state_dict(state, strict=True)
    small.tie_weights()
    small.eval()
    checker(small)
    tolerance = LOGITS_ATOL + LOGITS_RTOL * expected.abs().max().item()
    with torch.no_grad():
        error = (small(input_ids=probe).logits.float() - expected).abs().max().item()
    check_logits_error("sliced model", error, tolerance)
    pruned_params = _param_count(small)
    record["parameters"] = {
        "dense": dense_params,
        "pruned": pruned_params,
        "removed_share": 1 - pruned_params / dense_params,
        "removed_share_of_decoder_linears": (dense_params - pruned_params) / family.decoder_params,
    }
    record["verification"] = {"logits_max_abs_error": error, "tolerance": tolerance}
    small.to(dtype)  # lossless: every value came from the model in this dtype
    with atomic_directory(output_dir, overwrite) as tmp:
        write_export_folder(tmp, small, module.model_name, record)
        report = verify_in_fresh_process(tmp, probe, expected, tolerance)
        if report["params"] != pruned_params:
            raise ExportError(
                f"export verification: reloaded model has {report['params']} parameters, "
                f"pruning.json says {pruned_params}"
            )
        record["verification"]["reload"] = report
        (tmp / "pruning.json").write_text(json.dumps(record, indent=2))
    return Path(output_dir)
