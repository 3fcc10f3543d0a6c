"""``--format hf``: a dense Hugging Face checkpoint whose pruned weights are exact zeros."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

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

if TYPE_CHECKING:
    from lightning_prune.masks.base import MaskFamily


def export_hf(
    module: ExportSource,
    output_dir: str | Path,
    overwrite: bool = False,
    run_config: dict[str, Any] | None = None,
) -> Path:
    """Bake the hard masks into the weights, save, reload and verify, then rename into place.

    The module's model is consumed (its parametrizations are removed).
    """
    from transformers import AutoModelForCausalLM

    model, family = source_model(module), module.mask_family
    probe, expected = masked_reference(module)
    record = {**export_record(module, run_config), "sparsity": family.sparsity_report()}
    checker = family.exported_checker()
    family.bake()
    with atomic_directory(output_dir, overwrite) as tmp:
        write_export_folder(tmp, model, module.model_name, record)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=model.dtype).eval()
        checker(reloaded)
        with torch.no_grad():
            got = reloaded(input_ids=probe).logits.float()
        error = (got - expected).abs().max().item()
        if error > LOGITS_ATOL:
            raise ExportError(
                f"export verification: reloaded logits differ from the masked model's by "
                f"{error:.2e}"
                f" (tolerance {LOGITS_ATOL})"
            )
    return Path(output_dir)


class HFExporter(Exporter):
    """``--format hf``: a dense HF checkpoint. Every family bakes ``W0 ⊙ mask``; one that has
    its own dense writer (``MaskFamily.hf_exporter``, structured: a smaller model) uses it."""

    def supports(self, family: MaskFamily) -> bool:
        return True

    def export(
        self,
        module: ExportSource,
        output_dir: str | Path,
        overwrite: bool,
        run_config: dict[str, Any] | None,
        dtype: str | None,
    ) -> Path:
        write = module.mask_family.hf_exporter() or export_hf
        return write(module, output_dir, overwrite=overwrite, run_config=run_config)
