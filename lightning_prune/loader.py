"""``load_pretrained``: any exported model as an ordinary ``transformers`` model.

A ``compressed-nm`` folder (``model.nm.safetensors``) is decoded into dense tensors, checked
against the folder's config, and handed to the stock model class; any other exported folder is
loaded with ``AutoModelForCausalLM`` from safetensors. Pickle files are never read.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from lightning_prune.errors import ConfigError
from lightning_prune.export.compressed_file import (
    WEIGHTS_NAME,
    CompressedFormatError,
    read_compressed,
)
from lightning_prune.models.loading import ModelLoadError, resolve_model_path

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def load_pretrained(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    semi_structured: bool = False,
    compile: bool = False,
    compile_backend: str = "inductor",
) -> nn.Module:
    """Load an exported model (``compressed-nm``, ``hf`` or structured) for inference.

    Args:
        path: exported folder (or an embedded model name).
        dtype: dtype to run in (default: the dtype stored in the file).
        device: where to put the model.
        semi_structured: convert the 2:4 Linears with ``torch.sparse.to_sparse_semi_structured``
            (CUDA, float16/bfloat16 only; Linears that do not qualify stay dense).
        compile: wrap ``forward`` in ``torch.compile`` (falls back to eager with a warning when
            compilation is unavailable).
        compile_backend: the ``torch.compile`` backend.

    Returns the model in eval mode; ``model.lightning_prune_info`` says what was done.
    """
    from lightning_prune.runtime import compile_model, to_semi_structured

    folder = Path(resolve_model_path(str(path)))
    if isinstance(dtype, str):
        named = getattr(torch, dtype, None)
        if not isinstance(named, torch.dtype):
            raise ConfigError(f"dtype: '{dtype}' is not a torch dtype (e.g. float16, bfloat16)")
        dtype = named
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"'{folder}' is not an exported model folder (no config.json)")
    info: dict[str, Any] = {"path": str(folder)}
    if (folder / WEIGHTS_NAME).is_file():
        model, meta = _load_compressed(folder, dtype)
        info.update(format="compressed-nm", pattern=f"{meta['n']}:{meta['m']}")
        pruned = [name.removesuffix(".weight") for name in meta["compressed"]]
    else:
        model = _load_safetensors_folder(folder, dtype)
        info["format"] = "hf"
        pruned = None
    model.eval().to(device)
    if semi_structured:
        info["semi_structured"] = to_semi_structured(model, pruned)
    if compile:
        info["compile"] = compile_model(model, backend=compile_backend)
    # torch types Module.__setattr__'s value as Tensor | Module, yet any value is accepted
    model.lightning_prune_info = info  # type: ignore[assignment]
    return model


def _load_safetensors_folder(folder: Path, dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.glob("*.bin")) or ["no weight file"]
        raise ModelLoadError(
            f"'{folder}': lightning-prune loads safetensors only (never pickle); found "
            f"{', '.join(pickles)}"
        )
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto", use_safetensors=True)


def _load_compressed(folder: Path, dtype: torch.dtype | None) -> tuple[nn.Module, dict]:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    state, meta = read_compressed(folder / WEIGHTS_NAME)
    config = AutoConfig.from_pretrained(folder)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelLoadError(
            f"'{folder}': config model_type '{config.model_type}' has no causal LM class in "
            "this transformers version"
        )
    # the lazy mapping's stubs type its values as tuples of classes
    model_class = cast("type[PreTrainedModel]", MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])
    check_against_config(state, meta["tied"], config, model_class)
    stored = next(t.dtype for t in state.values() if t.is_floating_point())
    model = model_class.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype or stored
    )
    loaded = model.state_dict()
    for name, source in meta["tied"].items():
        if loaded[name].data_ptr() != loaded[source].data_ptr():
            raise CompressedFormatError(
                f"tensor '{name}' is stored as a tie of '{source}', but the config does not tie "
                "them (tie_word_embeddings?)"
            )
    return model, meta


def check_against_config(
    state: dict[str, torch.Tensor], tied: dict[str, str], config, model_class
) -> None:
    """Raise naming the first tensor that is missing, unexpected or shaped unlike the config."""
    with torch.device("meta"):
        reference = model_class(config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items() if k not in tied}
    for name in sorted(set(expected) | set(state)):
        if name not in state:
            raise CompressedFormatError(f"tensor '{name}' is missing from the file")
        if name not in expected:
            raise CompressedFormatError(f"tensor '{name}' in the file is not part of the model")
        if tuple(state[name].shape) != expected[name]:
            raise CompressedFormatError(
                f"tensor '{name}' has shape {tuple(state[name].shape)} in the file, but the "
                f"config expects {expected[name]}"
            )
