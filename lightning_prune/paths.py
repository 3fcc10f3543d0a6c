"""Where lightning-prune keeps its caches (converted models, cleaned corpora, token ids)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$LIGHTNING_PRUNE_CACHE`` if set, else ``~/.cache/lightning_prune``."""
    root = os.environ.get("LIGHTNING_PRUNE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lightning_prune"
