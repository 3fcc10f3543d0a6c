"""Tokenize documents into calibration / held-out token streams, cached on disk."""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lightning_prune.errors import ConfigError
from lightning_prune.paths import default_cache_dir


@dataclass
class TokenSplits:
    """Token ids of the calibration and held-out documents (disjoint by document)."""

    calibration: torch.Tensor
    heldout: torch.Tensor
    fingerprint: str


def split_documents(
    documents: list[str], heldout_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Shuffle documents with ``seed`` and hold out a share of them (at least one)."""
    if not 0 < heldout_fraction < 1:
        raise ConfigError(f"data.heldout_fraction: expected (0, 1), got {heldout_fraction}")
    if len(documents) < 2:
        raise ConfigError(
            f"data.source: need at least 2 documents to hold some out, got {len(documents)}"
        )
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    count = min(max(1, round(heldout_fraction * len(documents))), len(documents) - 1)
    heldout = [documents[i] for i in sorted(order[:count])]
    calibration = [documents[i] for i in sorted(order[count:])]
    return calibration, heldout


def _tokenize(documents: list[str], tokenizer) -> torch.Tensor:
    separator = tokenizer.eos_token_id
    ids: list[int] = []
    for document in documents:
        ids.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
        if separator is not None:
            ids.append(separator)
    return torch.tensor(ids, dtype=torch.int32)


def _read_cached(path: Path) -> dict[str, torch.Tensor] | None:
    """The cached token ids at ``path``; ``None`` when absent or unreadable (then rebuilt)."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError):
        return None
    return tensors if {"calibration", "heldout"} <= set(tensors) else None


def tokenize_splits(
    documents: list[str],
    tokenizer,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: Path | None = None,
) -> TokenSplits:
    """Split by document, tokenize both splits, and cache the ids as safetensors."""
    digest = hashlib.sha256()
    digest.update(f"{heldout_fraction}:{seed}:{tokenizer.name_or_path}:{len(tokenizer)}".encode())
    digest.update(str(tokenizer.eos_token_id).encode())
    for document in documents:
        digest.update(hashlib.sha256(document.encode()).digest())
    fingerprint = digest.hexdigest()[:16]
    path = (cache_dir or default_cache_dir()) / "tokens" / f"{fingerprint}.safetensors"
    cached = _read_cached(path)
    if cached is not None:
        return TokenSplits(cached["calibration"].long(), cached["heldout"].long(), fingerprint)
    calibration, heldout = split_documents(documents, heldout_fraction, seed)
    tensors = {
        "calibration": _tokenize(calibration, tokenizer),
        "heldout": _tokenize(heldout, tokenizer),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return TokenSplits(tensors["calibration"].long(), tensors["heldout"].long(), fingerprint)


def pack(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Cut a token stream into non-overlapping ``[num, seq_len]`` windows."""
    if max_tokens is not None:
        ids = ids[:max_tokens]
    count = ids.numel() // seq_len
    return ids[: count * seq_len].view(count, seq_len)
