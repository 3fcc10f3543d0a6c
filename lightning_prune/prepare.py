"""Convert and cache the embedded default model and corpora (run once by tools/install.sh)."""

from __future__ import annotations

from lightning_prune.data.corpora import available_corpora, load_embedded_corpus
from lightning_prune.models.embedded import EMBEDDED_MODELS, embedded_model_dir


def main() -> None:
    """Prepare the default embedded models and every corpus, printing where each one lives
    (optional models such as ``gemma3-270m`` are converted on first use)."""
    for name, model in EMBEDDED_MODELS.items():
        if not model.optional:
            print(f"model  {name}: {embedded_model_dir(name)}")
    for name in available_corpora():
        print(f"corpus {name}: {len(load_embedded_corpus(name))} documents")


if __name__ == "__main__":
    main()
