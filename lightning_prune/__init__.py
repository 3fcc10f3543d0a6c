"""lightning-prune: learn pruning masks for Hugging Face causal LMs with PyTorch Lightning."""

__version__ = "0.1.0"
