"""Recovery fine-tuning of an exported pruned model, with its pruning kept exact.

``lightning-prune recover`` loads an ``hf`` export (a smaller dense model from the minimax
solver, or a dense model with N:M zeros), fine-tunes it on calibration text with a Lightning fit,
merges what was learned into the weights and writes a new export, atomically and verified.

- ``method: lora``: LoRA adapters from ``peft`` (the ``recovery`` extra) on every linear layer,
  merged before export. For structured exports only: on an N:M export the dense low-rank update
  would fill the pruned zeros.
- ``method: full``: every decoder linear weight is trained. On an N:M export the gradient of each
  zero weight is masked out, so with AdamW (no weight decay) zeros stay exactly zero.

The command itself (its LightningCLI) is :mod:`lightning_prune.cli.recover`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from lightning.pytorch import LightningModule
from torch.optim.lr_scheduler import LambdaLR

from lightning_prune.errors import ConfigError
from lightning_prune.export.atomic import atomic_directory, check_target
from lightning_prune.export.common import (
    LOGITS_ATOL,
    ExportError,
    probe_tokens,
    verify_in_fresh_process,
)
from lightning_prune.models import load_causal_lm, load_tokenizer
from lightning_prune.solvers.base import warmup_linear_decay

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


class RecoveryModule(LightningModule):
    """Fine-tunes an exported pruned model; :meth:`write_export` writes the recovered one.

    Args:
        export_dir: folder written by ``lightning-prune export --format hf``.
        output_dir: folder for the recovered export (refused if it exists unless overwrite).
        method: ``lora`` (structured exports) or ``full`` (any export; N:M zeros kept).
        lr: peak learning rate (linear warm-up, then linear decay to zero).
        warmup_ratio: share of the steps spent warming up.
        lora_rank: rank of the LoRA adapters.
        lora_alpha: LoRA scaling numerator (the update is scaled by ``alpha / rank``).
        overwrite: replace an existing ``output_dir``.
    """

    def __init__(
        self,
        export_dir: str,
        output_dir: str,
        method: Literal["lora", "full"] = "lora",
        lr: float = 2e-4,
        warmup_ratio: float = 0.1,
        lora_rank: int = 16,
        lora_alpha: float = 32.0,
        overwrite: bool = False,
    ):
        super().__init__()
        self.record = read_pruning_record(export_dir)
        if method not in ("lora", "full"):
            raise ConfigError(f"model.method: expected 'lora' or 'full', got {method!r}")
        if method == "lora" and self.is_nm:
            raise ConfigError(
                f"model.method: lora would fill the {self.record['pattern']} zeros of "
                f"'{export_dir}' with a dense update; use method: full (zeros are kept)"
            )
        if not lr > 0 or not 0 <= warmup_ratio < 1:
            raise ConfigError(
                f"model.lr > 0 and model.warmup_ratio in [0, 1) expected, got {lr}, {warmup_ratio}"
            )
        if not (isinstance(lora_rank, int) and lora_rank > 0) or not lora_alpha > 0:
            raise ConfigError(
                f"model.lora_rank (a positive integer) and model.lora_alpha (> 0) expected, got "
                f"{lora_rank!r}, {lora_alpha!r}"
            )
        self.protected = [("the export being recovered (model.export_dir)", Path(export_dir))]
        check_target(output_dir, overwrite, self.protected)
        self.export_dir, self.output_dir, self.overwrite = export_dir, output_dir, overwrite
        self.method, self.lr, self.warmup_ratio = method, lr, warmup_ratio
        self.lora_rank, self.lora_alpha = lora_rank, lora_alpha
        self.model: torch.nn.Module | None = None
        self._zeros: dict[str, torch.Tensor] = {}

    @property
    def is_nm(self) -> bool:
        return self.record.get("mask_family") == "NMMaskFamily"

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = load_causal_lm(self.export_dir)
        model.requires_grad_(False)
        if self.method == "lora":
            model = _with_lora(model, self.lora_rank, self.lora_alpha)
        else:
            for name, weight in decoder_linear_weights(model).items():
                weight.requires_grad_(True)
                if self.is_nm:
                    keep = weight.detach() != 0
                    self._zeros[name] = ~keep
                    weight.register_hook(lambda grad, keep=keep: grad * keep)
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        return self._loaded()(input_ids=input_ids, labels=labels)

    def _loaded(self) -> torch.nn.Module:
        """The model that :meth:`configure_model` loaded."""
        assert self.model is not None, "configure_model() loads the model"
        return self.model

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch["input_ids"], batch["labels"]).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch["input_ids"], batch["labels"]).loss
        self.log("val/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = warmup_linear_decay(total, int(self.warmup_ratio * total))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedule), "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k in trainable
        }

    def write_export(self, steps: int) -> Path:
        """Merge what was learned, write ``output_dir`` atomically and verify it."""
        trained = self._loaded()
        if self.method == "lora":
            trained = cast("PeftModel", trained).merge_and_unload()
        model = cast("PreTrainedModel", trained)  # the HF model (LoRA merged into it)
        model.requires_grad_(False).eval()
        self._check_zeros_kept(model)
        config: Any = model.config
        probe = probe_tokens(config.vocab_size)
        with torch.no_grad():
            expected = model(input_ids=probe).logits.float()
        record = {
            **self.record,
            "recovery": {
                "method": self.method,
                "from_export": str(self.export_dir),
                "steps": steps,
                "lr": self.lr,
                **({"lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha}
                   if self.method == "lora" else {}),
            },
        }
        with atomic_directory(self.output_dir, self.overwrite, self.protected) as tmp:
            model.save_pretrained(tmp)
            load_tokenizer(self.export_dir).save_pretrained(tmp)
            (tmp / "pruning.json").write_text(json.dumps(record, indent=2))
            report = verify_in_fresh_process(tmp, probe, expected, LOGITS_ATOL, model.dtype)
            record["recovery"]["verification"] = report
            (tmp / "pruning.json").write_text(json.dumps(record, indent=2))
        return Path(self.output_dir)

    def _check_zeros_kept(self, model: torch.nn.Module) -> None:
        weights = decoder_linear_weights(model)
        for name, zeros in self._zeros.items():
            filled = int((weights[name][zeros] != 0).sum())
            if filled:
                raise ExportError(f"recovery: {filled} pruned zeros of {name} became nonzero")


def read_pruning_record(export_dir: str) -> dict[str, Any]:
    """``pruning.json`` of an export folder (a clear error when it is not one)."""
    record = Path(export_dir) / "pruning.json"
    if not record.is_file():
        raise ConfigError(
            f"model.export_dir: '{export_dir}' is not a lightning-prune export (no pruning.json)"
        )
    try:
        value = json.loads(record.read_bytes())
    except ValueError as err:
        raise ConfigError(f"model.export_dir: '{record}' is not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise ConfigError(f"model.export_dir: '{record}' holds no JSON object")
    return value


def decoder_linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights of the linear layers (``Linear`` and GPT-2's ``Conv1D``) outside the LM head."""
    from transformers.pytorch_utils import Conv1D

    hf = cast("PreTrainedModel", model)  # an HF causal LM
    embeddings = {id(hf.get_output_embeddings()), id(hf.get_input_embeddings())}
    return {
        f"{name}.weight": module.weight
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | Conv1D) and id(module) not in embeddings
    }


def _with_lora(model: torch.nn.Module, rank: int, alpha: float) -> torch.nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ConfigError(
            "model.method: lora needs peft: pip install 'lightning-prune[recovery]'"
        ) from err
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft types it int; any float scales
        lora_dropout=0.0,
        target_modules="all-linear",
        bias="none",
    )
    return get_peft_model(model, config)
