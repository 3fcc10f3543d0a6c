"""What every export writer shares: the error, the logits tolerances, the probe and reference
logits, the ``pruning.json`` record, the folder contents and the fresh-process reload check.

Used by the ``hf`` (:mod:`.hf`), structured (:mod:`.structured`) and ``compressed-nm``
(:mod:`.compressed`) exports and by ``recover`` (:mod:`lightning_prune.recovery`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from lightning_prune.errors import LightningPruneError
from lightning_prune.version import __version__

if TYPE_CHECKING:
    from lightning_prune.masks.base import MaskFamily

#: max |logit difference| between a model and its reload from the folder written from it
#: (``hf``, ``compressed-nm``, ``recover``: the same weights run by the same kernels, so the
#: differences are rounding only); also the absolute floor of the structured export's
#: tolerance, to which that adds :data:`LOGITS_RTOL`
LOGITS_ATOL = 1e-4
#: the structured export's tolerance grows by this share of the largest |logit| (fp32:
#: dropping zero columns only reorders sums, so differences are rounding)
LOGITS_RTOL = 1e-4

_VERIFY = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
folder, probe_file, out_file, dtype = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
probe = torch.load(probe_file)
with torch.no_grad():
    logits = model(input_ids=probe).logits.float()
    generated = model.generate(probe[:1, :8], max_new_tokens=4, do_sample=False)
torch.save(logits, out_file)
print(json.dumps({
    "lightning_prune_imported": "lightning_prune" in sys.modules,
    "params": sum(p.numel() for p in model.parameters()),
    "generated": generated.shape[-1] - 8,
    "config": {k: getattr(model.config, k, None) for k in (
        "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "n_inner")},
}))
"""


class ExportError(LightningPruneError, RuntimeError):
    """An export failed its own verification (nothing was put in place)."""


class ExportSource(Protocol):
    """What an exporter reads of the ``PruningModule`` it writes out."""

    @property
    def model(self) -> nn.Module | None:
        """The model (``None`` until ``configure_model`` has built it)."""

    model_name: str
    mask_family: MaskFamily
    solver: Any
    init_mask: str | dict[str, Any] | None


def source_model(module: ExportSource) -> nn.Module:
    """The model of ``module``, which an export needs built (by loading the checkpoint)."""
    if module.model is None:
        raise ExportError("export: the module's model has not been built (configure_model)")
    return module.model


def probe_tokens(vocab_size: int, length: int = 32) -> torch.Tensor:
    """Fixed random token ids on which an export's logits are compared with the source's."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (2, length), generator=generator)


def masked_reference(module: ExportSource) -> tuple[torch.Tensor, torch.Tensor]:
    """Harden the masks; return fixed probe tokens and the masked model's logits on them."""
    module.mask_family.harden()
    model = source_model(module)
    config: Any = model.config  # an HF PretrainedConfig
    probe = probe_tokens(config.vocab_size)
    with torch.no_grad():
        expected = model(input_ids=probe).logits.float()
    return probe, expected


def export_record(module: ExportSource, run_config: dict[str, Any] | None) -> dict[str, Any]:
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


def check_logits_error(what: str, error: float, tolerance: float) -> None:
    """Raise ``ExportError`` unless ``what``'s max |logit difference| is within ``tolerance``."""
    if not error <= tolerance:
        raise ExportError(
            f"export verification: {what}'s logits differ from the masked model's by "
            f"{error:.2e} (tolerance {tolerance:.2e})"
        )


def verify_in_fresh_process(
    folder: Path,
    probe: torch.Tensor,
    expected: torch.Tensor,
    tolerance: float,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Reload ``folder`` with plain transformers in a new interpreter and compare logits."""
    with tempfile.TemporaryDirectory() as scratch:
        probe_file, out_file = Path(scratch) / "probe.pt", Path(scratch) / "logits.pt"
        torch.save(probe, probe_file)
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                _VERIFY,
                str(folder),
                str(probe_file),
                str(out_file),
                str(dtype).removeprefix("torch."),
            ],
            capture_output=True,
            text=True,
            env=_clean_env(),
        )
        if result.returncode != 0:
            tail = result.stderr.strip().splitlines()[-3:]
            raise ExportError(f"export verification: plain transformers failed to load: {tail}")
        report = json.loads(result.stdout.strip().splitlines()[-1])
        logits = torch.load(out_file, weights_only=True)
    if report["lightning_prune_imported"]:
        raise ExportError("export verification: the reload process imported lightning_prune")
    if report["generated"] < 1:
        raise ExportError("export verification: generate produced no tokens")
    error = (logits - expected).abs().max().item()
    check_logits_error("reloaded model", error, tolerance)
    report["logits_max_abs_error"] = error
    return report


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env
