"""Convert and cache the embedded default model and corpora (run once by tools/install.sh)."""

from __future__ import annotations

from lightning_prune.data.corpora import available_corpora, load_embedded_corpus
from lightning_prune.models.embedded import EMBEDDED_MODELS, embedded_model_dir


def main() -> None:
    """Prepare every embedded model and corpus, printing where each one lives."""
    for name in EMBEDDED_MODELS:
        print(f"model  {name}: {embedded_model_dir(name)}")
    for name in available_corpora():
        print(f"corpus {name}: {len(load_embedded_corpus(name))} documents")


if __name__ == "__main__":
    main()
