"""``--format compressed-nm``: N:M weights as kept values plus packed positions.

Specified in docs/compressed-nm.md.

The masks are baked, the weights optionally cast (``dtype``), negative zeros made positive (the
format stores only kept entries), and the folder (config, generation config, tokenizer,
``pruning.json``, ``model.nm.safetensors``) is written atomically after it decodes back, through
:func:`lightning_prune.load_pretrained`, to the same tensors bit for bit and the same logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_prune.contracts import NMPattern
from lightning_prune.errors import ConfigError
from lightning_prune.export.atomic import atomic_directory
from lightning_prune.export.base import Exporter
from lightning_prune.export.common import (
    LOGITS_ATOL,
    ExportError,
    ExportSource,
    export_record,
    masked_reference,
    source_model,
    write_export_folder,
)
from lightning_prune.export.compressed_file import WEIGHTS_NAME, shared_tensors, write_compressed
from lightning_prune.export.nm_codec import packed_size, position_bits

if TYPE_CHECKING:
    from lightning_prune.masks.base import MaskFamily

FORMAT = "compressed-nm"


class CompressedNMExporter(Exporter):
    """``--format compressed-nm`` (N:M families only; ``--dtype`` casts the weights)."""

    casts_dtype = True
    requires = (NMPattern,)

    def export(
        self,
        module: ExportSource,
        output_dir: str | Path,
        overwrite: bool,
        run_config: dict[str, Any] | None,
        dtype: str | None,
    ) -> Path:
        return export_compressed_nm(module, output_dir, overwrite, run_config, dtype)


def nm_pattern(family: MaskFamily) -> tuple[int, int] | None:
    """``(n, m)`` of an N:M family, else ``None``."""
    return (family.n, family.m) if isinstance(family, NMPattern) else None


def export_compressed_nm(
    module: ExportSource,
    output_dir: str | Path,
    overwrite: bool = False,
    run_config: dict[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Bake the N:M masks and write the compressed folder (the module's model is consumed)."""
    family = module.mask_family
    pattern = nm_pattern(family)
    if pattern is None:
        raise ConfigError(
            f"format: {FORMAT} needs an N:M mask family (mask_family: nm), got "
            f"{type(family).__name__}; use --format hf"
        )
    n, m = pattern
    probe, expected = masked_reference(module)
    record = {**export_record(module, run_config), "sparsity": family.sparsity_report()}
    layout = {f"{name}.weight": p.transposed for name, p in family.parametrizations().items()}
    checker = family.exported_checker()
    family.bake()
    model = source_model(module)
    cast = _dtype(dtype) not in (None, model.dtype)
    if cast:  # parameters only: buffers (rotary frequencies) stay as a fresh load has them
        for param in model.parameters():
            param.data = param.data.to(_dtype(dtype))
        with torch.no_grad():
            expected = model(input_ids=probe).logits.float()
    return write_compressed_folder(
        model,
        output_dir,
        layout,
        n,
        m,
        module.model_name,
        record,
        overwrite,
        check=checker,
        probe=(probe, expected),
    )


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, dtype, None)
    if value not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"dtype: expected float32, float16 or bfloat16, got '{dtype}'")
    return value


def write_compressed_folder(
    model: nn.Module,
    output_dir: str | Path,
    layout: dict[str, bool],
    n: int,
    m: int,
    tokenizer_source: str,
    record: dict[str, Any],
    overwrite: bool = False,
    check=None,
    probe: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` (N:M weights named in ``layout``) as a verified compressed-nm folder.

    ``layout`` maps weight names to whether they are stored ``[in, out]``. ``probe`` is a pair
    (tokens, expected logits) the reloaded model must reproduce; ``check`` a callable on the
    reloaded model. Nothing is left at ``output_dir`` if any step fails.
    """
    from lightning_prune.loader import load_pretrained

    with torch.no_grad():
        for name in layout:
            model.get_parameter(name).add_(0.0)  # -0.0 + 0.0 = +0.0: the format's zeros
    state = model.state_dict()
    with atomic_directory(output_dir, overwrite) as tmp:
        header = write_compressed(tmp / WEIGHTS_NAME, state, layout, n, m)
        record = {**record, "format": FORMAT, "format_version": header["format_version"]}
        record["bytes"] = _sizes(state, layout, n, m, tmp / WEIGHTS_NAME)
        write_export_folder(tmp, model, tokenizer_source, record, weights=False)
        reloaded = load_pretrained(tmp)
        restored = reloaded.state_dict()
        for name, tensor in state.items():
            if not _bit_equal(restored[name], tensor):
                raise ExportError(f"export verification: tensor '{name}' does not decode exactly")
        if check is not None:
            check(reloaded)
        if probe is not None:
            with torch.no_grad():
                got = reloaded(input_ids=probe[0]).logits.float()
            error = (got - probe[1]).abs().max().item()
            if error > LOGITS_ATOL:
                raise ExportError(
                    f"export verification: reloaded logits differ from the masked model's by "
                    f"{error:.2e} (tolerance {LOGITS_ATOL})"
                )
        (tmp / "pruning.json").write_text(json.dumps(record, indent=2))
    return Path(output_dir)


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _sizes(
    state: dict[str, torch.Tensor], layout: dict[str, bool], n: int, m: int, path: Path
) -> dict[str, Any]:
    """File bytes against the dense tensors' bytes, overall and for the N:M tensors alone."""
    tied = shared_tensors(state)
    dense = sum(t.numel() * t.element_size() for k, t in state.items() if k not in tied)
    nm_dense = sum(state[k].numel() * state[k].element_size() for k in layout)
    nm_stored = 0
    for name in layout:
        kept = state[name].numel() // m * n
        nm_stored += kept * state[name].element_size() + packed_size(kept, position_bits(m))
    file_bytes = path.stat().st_size
    return {
        "file": file_bytes,
        "dense_tensors": dense,
        "file_over_dense": file_bytes / dense,
        "nm_tensors_dense": nm_dense,
        "nm_tensors_stored": nm_stored,
        "nm_stored_over_dense": nm_stored / nm_dense,
    }
