"""Where lightning-prune keeps its caches (converted models, cleaned corpora, token ids), and
which folders hold caches that no output may ever replace."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$LIGHTNING_PRUNE_CACHE`` if set, else ``~/.cache/lightning_prune``."""
    root = os.environ.get("LIGHTNING_PRUNE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lightning_prune"


def cache_dirs() -> list[tuple[str, Path]]:
    """``(what, folder)`` of every cache an output must never replace: lightning-prune's own and
    the Hugging Face caches (``HF_HOME``, the hub cache, the datasets cache), read at call time
    so a changed environment counts."""
    from huggingface_hub import constants

    found = [("the lightning-prune cache", default_cache_dir())]
    hf_homes = {os.environ.get("HF_HOME"), constants.HF_HOME}
    hub_caches = {os.environ.get("HF_HUB_CACHE"), constants.HF_HUB_CACHE}
    datasets_caches = {os.environ.get("HF_DATASETS_CACHE")}
    for what, folders in (
        ("the Hugging Face cache (HF_HOME)", hf_homes),
        ("the Hugging Face hub cache", hub_caches),
        ("the Hugging Face datasets cache", datasets_caches),
    ):
        found += [(what, Path(folder).expanduser()) for folder in folders if folder]
    return found
