"""Load any causal LM by embedded name, local folder or Hugging Face hub id.

A local model folder is checked before transformers reads it, so that a broken file is named
instead of surfacing as a library traceback (or worse, as a silently different model):

- ``config.json`` must be a JSON object that states the model's size fields explicitly
  (transformers would otherwise build the architecture's default size, often billions of
  parameters);
- a folder that ships its own Python code (``auto_map``) is refused unless the caller passes
  ``trust_remote_code=True``; otherwise ``trust_remote_code=False`` is passed to transformers;
- ``tokenizer.json`` / ``tokenizer_config.json`` must parse, and every ``*.safetensors``
  header must be complete.
"""

from __future__ import annotations

import inspect
import json
import pickle
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lightning_prune.errors import LightningPruneError
from lightning_prune.models.embedded import EMBEDDED_MODELS, embedded_model_dir

#: size fields transformers fills with the architecture's (large) defaults when they are absent
SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")


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


def local_folder(name: str) -> Path | None:
    """The local folder of model ``name``, or ``None`` for a hub id; a file is refused."""
    path = Path(resolve_model_path(name)).expanduser()
    if not path.exists():
        return None
    if not path.is_dir():
        raise ModelLoadError(f"model '{name}': '{path}' is a file, expected a model folder")
    return path


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; anything else is a ``ModelLoadError`` naming the file."""
    try:
        value = json.loads(path.read_bytes())
    except UnicodeDecodeError as err:
        raise ModelLoadError(f"'{path}' is not UTF-8 JSON ({err.reason})") from err
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"'{path}' is not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise ModelLoadError(f"'{path}' holds a JSON {type(value).__name__}, expected an object")
    return value


def refuse_custom_code(folder: Path, trust_remote_code: bool) -> None:
    """Refuse a folder whose config or tokenizer config maps to its own Python code."""
    if trust_remote_code:
        return
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        auto_map = read_json_object(path).get("auto_map") if path.is_file() else None
        if auto_map:
            raise ModelLoadError(
                f"'{path}' has auto_map ({', '.join(sorted(auto_map))}): the model ships its own "
                "Python code, and lightning-prune does not run code from a model folder "
                "unless asked; use a model that transformers supports natively, or set "
                "model.trust_remote_code: true if you have read that code and trust it"
            )


def check_size_fields(config_path: Path, config: dict[str, Any]) -> None:
    """Refuse a ``config.json`` that leaves any of the architecture's size fields implicit."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return  # an unknown architecture: transformers names it
    config_class = CONFIG_MAPPING[model_type]
    accepted = inspect.signature(config_class.__init__).parameters
    aliases = getattr(config_class, "attribute_map", {}) or {}
    keys = [aliases.get(field, field) for field in SIZE_FIELDS]
    missing = [key for key in keys if key in accepted and key not in config]
    if missing:
        raise ModelLoadError(
            f"'{config_path}' does not state {', '.join(missing)}: transformers would fill in "
            f"the default {model_type} size (a model of another size, often billions of "
            "parameters); expected every size field of the model explicitly"
        )


def _check_folder(folder: Path, trust_remote_code: bool) -> None:
    """``config.json`` present, a JSON object with explicit sizes, and no custom code."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"model folder '{folder}' has no config.json")
    config = read_json_object(config_path)
    refuse_custom_code(folder, trust_remote_code)
    check_size_fields(config_path, config)


def _check_tokenizer_files(folder: Path, trust_remote_code: bool) -> None:
    """The tokenizer files of ``folder`` parse (``tokenizer.json`` with ``tokenizers``)."""
    for name in ("config.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            read_json_object(folder / name)
    refuse_custom_code(folder, trust_remote_code)
    path = folder / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        read_json_object(path)
        try:
            Tokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises bare Exceptions on bad files
            raise ModelLoadError(
                f"'{path}' is not a valid tokenizers file ({err}); expected the tokenizer.json "
                "that transformers saves"
            ) from err


def _check_weight_headers(folder: Path) -> None:
    """Every ``*.safetensors`` file's header is complete (a truncated file is named)."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError as err:
            raise ModelLoadError(
                f"'{path}' is not a readable safetensors file (truncated or corrupt: {err})"
            ) from err


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """Load the tokenizer of model ``name`` (embedded name, folder or hub id)."""
    from transformers import AutoTokenizer

    folder = local_folder(name)
    if folder is not None:
        _check_tokenizer_files(folder, trust_remote_code)
        if (folder / "config.json").is_file():  # AutoTokenizer reads it: name its faults first
            load_config(name, trust_remote_code)
    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if folder is not None:
            raise ModelLoadError(
                f"model folder '{folder}': the tokenizer could not be loaded ({err})"
            ) from err
        raise ModelLoadError(f"{_hint(name)} ({err})") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(name: str, trust_remote_code: bool = False):
    """The HF config of model ``name``, read without loading weights; unusable ones are errors."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    folder = local_folder(name)
    if folder is not None:
        _check_folder(folder, trust_remote_code)
    path = resolve_model_path(name)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, StrictDataclassError) as err:
        if folder is not None:
            raise ModelLoadError(
                f"model folder '{folder}': config.json is unusable ({_one_line(err)})"
            ) from err
        raise ModelLoadError(f"{_hint(name)} ({err})") from err


def load_causal_lm(
    name: str,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a causal LM through ``AutoModelForCausalLM``; missing weights are an error."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    load_config(name, trust_remote_code)  # clear errors for a bad config before any weights
    folder = local_folder(name)
    if folder is not None:
        _check_weight_headers(folder)
    kwargs = {
        "dtype": dtype,
        "output_loading_info": True,
        "weights_only": True,
        "trust_remote_code": trust_remote_code,
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        # output_loading_info=True returns (model, info); transformers types only the model
        model, info = cast(
            "tuple[nn.Module, dict[str, Any]]", AutoModelForCausalLM.from_pretrained(path, **kwargs)
        )
    except pickle.UnpicklingError as err:
        raise ModelLoadError(
            f"model '{name}' could not be loaded: a weights file holds objects other than "
            "tensors, and weights are never unpickled (Weights only loading refused it)"
        ) from err
    except (OSError, ValueError, SafetensorError) as err:
        if folder is not None:
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


def _one_line(err: BaseException) -> str:
    """A library error's message on one line."""
    return " ".join(str(err).split())
