"""lightning-prune: learn pruning masks for Hugging Face causal LMs with PyTorch Lightning."""

from lightning_prune.version import __version__

__all__ = ["__version__", "load_pretrained"]


def __getattr__(name: str):
    """Import :func:`load_pretrained` lazily (``import lightning_prune`` stays light)."""
    if name == "load_pretrained":
        from lightning_prune.loader import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'lightning_prune' has no attribute '{name}'")
