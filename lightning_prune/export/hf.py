"""``--format hf``: a dense Hugging Face checkpoint whose pruned weights are exact zeros."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lightning_prune import __version__
from lightning_prune.errors import LightningPruneError
from lightning_prune.export.atomic import atomic_directory

if TYPE_CHECKING:
    from lightning_prune.module import PruningModule

#: tolerance of the reload check (same weights, same kernels: differences are rounding only)
LOGITS_ATOL = 1e-4


class ExportError(LightningPruneError, RuntimeError):
    """An export failed its own verification (nothing was put in place)."""


def probe_tokens(vocab_size: int, length: int = 32) -> torch.Tensor:
    """Fixed random token ids on which an export's logits are compared with the source's."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (2, length), generator=generator)


def masked_reference(module: PruningModule) -> tuple[torch.Tensor, torch.Tensor]:
    """Harden the masks; return fixed probe tokens and the masked model's logits on them."""
    module.mask_family.harden()
    probe = probe_tokens(module.model.config.vocab_size)
    with torch.no_grad():
        expected = module.model(input_ids=probe).logits.float()
    return probe, expected


def export_record(module: PruningModule, run_config: dict[str, Any] | None) -> dict[str, Any]:
    """The fields of ``pruning.json`` that every export format shares."""
    family = module.mask_family
    return {
        "lightning_prune_version": __version__,
        "source_model": module.model_name,
        "method": type(module.solver).__name__,
        "init_mask": module.init_mask,
        "mask_family": type(family).__name__,
        **family.describe(),
        "config": run_config or {},
    }


def write_export_folder(
    folder: Path, model, model_name: str, record: dict[str, Any], weights: bool = True
) -> None:
    """Save weights, the source model's tokenizer and ``pruning.json`` into ``folder``.

    With ``weights=False`` only the config (and generation config) is saved: formats that
    write their own weight file call this for everything else.
    """
    from lightning_prune.models import load_tokenizer

    if weights:
        model.save_pretrained(folder)
    else:
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
    load_tokenizer(model_name).save_pretrained(folder)
    (folder / "pruning.json").write_text(json.dumps(record, indent=2))


def export_hf(
    module: PruningModule,
    output_dir: str | Path,
    overwrite: bool = False,
    run_config: dict[str, Any] | None = None,
) -> Path:
    """Bake the hard masks into the weights, save, reload and verify, then rename into place.

    The module's model is consumed (its parametrizations are removed).
    """
    from transformers import AutoModelForCausalLM

    model, family = module.model, module.mask_family
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
