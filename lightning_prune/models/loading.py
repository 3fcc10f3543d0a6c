"""Load any causal LM by embedded name, local folder or Hugging Face hub id."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from lightning_prune.errors import LightningPruneError
from lightning_prune.models.embedded import EMBEDDED_MODELS, embedded_model_dir


class ModelLoadError(LightningPruneError, RuntimeError):
    """A model could not be found or loaded completely."""


def resolve_model_path(name: str) -> str:
    """Map an embedded model name to its cached folder; pass folders and hub ids through."""
    if name in EMBEDDED_MODELS:
        return str(embedded_model_dir(name))
    return name


def _hint(name: str) -> str:
    return (
        f"model '{name}' is not an embedded model ({', '.join(EMBEDDED_MODELS)}), not a local "
        "folder, and could not be fetched from the Hugging Face hub (offline or unknown id). "
        f"On a machine with internet run `huggingface-cli download {name} --local-dir DIR` "
        "and set `model: DIR`"
    )


def load_tokenizer(name: str):
    """Load the tokenizer of model ``name`` (embedded name, folder or hub id)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{_hint(name)} ({err})") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(name: str):
    """The HF config of model ``name``, read without loading weights; unusable ones are errors."""
    from transformers import AutoConfig

    path = resolve_model_path(name)
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise ModelLoadError(f"model folder '{path}' has no config.json")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        if local.exists():
            raise ModelLoadError(f"model folder '{path}': config.json is unusable ({err})") from err
        raise ModelLoadError(f"{_hint(name)} ({err})") from err


def load_causal_lm(
    name: str, dtype: str | torch.dtype = "float32", attn_implementation: str | None = "sdpa"
) -> nn.Module:
    """Load a causal LM through ``AutoModelForCausalLM``; missing weights are an error."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    local = Path(path)
    load_config(name)  # clear errors for a missing or unknown config before any weights
    kwargs = {"dtype": dtype, "output_loading_info": True, "weights_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except pickle.UnpicklingError as err:
        raise ModelLoadError(
            f"model '{name}' could not be loaded: a weights file holds objects other than "
            "tensors, and weights are never unpickled (Weights only loading refused it)"
        ) from err
    except (OSError, ValueError) as err:
        if local.exists():
            raise ModelLoadError(f"model folder '{path}' could not be loaded: {err}") from err
        raise ModelLoadError(f"{_hint(name)} ({err})") from err
    missing = info.get("missing_keys") or []
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        raise ModelLoadError(
            f"model '{name}' is missing {len(missing)} weights ({shown}...): refusing to run a "
            "partly random model"
        )
    model.eval()
    return model
