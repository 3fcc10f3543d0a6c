"""Model loading: embedded default models, local folders and Hugging Face hub ids."""

from lightning_prune.models.loading import ModelLoadError, load_causal_lm, load_tokenizer

__all__ = ["ModelLoadError", "load_causal_lm", "load_tokenizer"]
