"""The calibration ``LightningDataModule``."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_prune.data.mixture import Mixture, StreamLoader, WindowStream, open_mixture
from lightning_prune.data.sampling import EpochShuffleSampler, ResumableDataLoader, SkipOnce
from lightning_prune.data.sources import MAX_SOURCE_BYTES, read_documents
from lightning_prune.data.streaming import StreamingConfig, check_streaming, is_heldout
from lightning_prune.data.tokens import TokenSplits, pack, tokenize_splits
from lightning_prune.errors import ConfigError


class TokenWindows(Dataset):
    """Fixed-length token windows as causal-LM batches (labels = inputs)."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.windows[index]
        return {"input_ids": ids, "labels": ids}


class CalibrationDataModule(LightningDataModule):
    """Calibration text for mask learning and a held-out split (by document) for validation.

    Args:
        source: embedded corpus (``wikipedia``, ``shakespeare``), local ``.txt``/``.jsonl``/
            ``.parquet`` file or folder, or a ``datasets`` name/path.
        tokenizer: model name whose tokenizer is used (linked to ``model.model`` by the CLI).
        seq_len: tokens per calibration sequence.
        num_samples: calibration sequences drawn (with ``seed``) from the packed stream.
        batch_size: sequences per step.
        heldout_fraction: share of documents held out for validation.
        eval_tokens: held-out tokens used for validation perplexity.
        seed: sampling and split seed.
        text_column: text field of ``.jsonl``/``.parquet``/``datasets`` sources.
        dataset_config: ``datasets`` configuration name.
        split: ``datasets`` split.
        max_source_bytes: most bytes read from a local source (a file, or a folder's files
            together); local files must be regular files (no FIFOs or devices).
        trust_remote_code: load a tokenizer that ships its own Python code (``auto_map``);
            off by default, when such a tokenizer is refused.
        streaming: stream the calibration and held-out text from ``datasets`` sources mixed
            by weight, up to a token budget, instead of reading ``source`` whole
            (docs/data.md); ``num_samples`` and ``source`` are then not used by ``fit``.
    """

    def __init__(
        self,
        source: str = "wikipedia",
        tokenizer: str = "smollm2-135m",
        seq_len: int = 512,
        num_samples: int = 64,
        batch_size: int = 1,
        heldout_fraction: float = 0.1,
        eval_tokens: int = 16384,
        seed: int = 0,
        text_column: str = "text",
        dataset_config: str | None = None,
        split: str = "train",
        max_source_bytes: int = MAX_SOURCE_BYTES,
        trust_remote_code: bool = False,
        streaming: StreamingConfig | None = None,
    ):
        super().__init__()
        for field, value in (
            ("seq_len", seq_len),
            ("num_samples", num_samples),
            ("batch_size", batch_size),
            ("eval_tokens", eval_tokens),
            ("max_source_bytes", max_source_bytes),
        ):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{field}: expected a positive integer, got {value!r}")
        self.source, self.tokenizer_name = source, tokenizer
        self.seq_len, self.num_samples, self.batch_size = seq_len, num_samples, batch_size
        self.heldout_fraction, self.eval_tokens, self.seed = heldout_fraction, eval_tokens, seed
        self.text_column, self.dataset_config, self.split = text_column, dataset_config, split
        self.max_source_bytes, self.trust_remote_code = max_source_bytes, trust_remote_code
        self.splits: TokenSplits | None = None
        self.streaming = None if streaming is None else check_streaming(streaming, seq_len)
        if self.streaming is not None and not 0 < heldout_fraction < 1:
            raise ConfigError(f"data.heldout_fraction: expected (0, 1), got {heldout_fraction}")
        self.mixture: Mixture | None = None
        self._resume = SkipOnce()  # batches of the current epoch a resumed fit already saw

    def load_splits(self, source: str | None = None) -> TokenSplits:
        """Tokenized calibration / held-out splits of ``source`` (default: this module's)."""
        from lightning_prune.models import load_tokenizer

        documents = read_documents(
            source or self.source,
            self.text_column,
            self.dataset_config,
            self.split,
            self.max_source_bytes,
        )
        tokenizer = load_tokenizer(self.tokenizer_name, self.trust_remote_code)
        return tokenize_splits(documents, tokenizer, self.heldout_fraction, self.seed)

    def setup(self, stage: str | None = None) -> None:
        if self.streaming is not None:
            self.mixture = self.mixture or self.open_mixture()
        elif self.splits is None:
            self.splits = self.load_splits()

    def open_mixture(self) -> Mixture:
        """The streamed sources, opened and checked, with this module's tokenizer."""
        from lightning_prune.models import load_tokenizer

        tokenizer = load_tokenizer(self.tokenizer_name, self.trust_remote_code)
        return open_mixture(self._streaming().sources, tokenizer, self.seq_len)

    def _streaming(self) -> StreamingConfig:
        assert self.streaming is not None, "the data module does not stream"
        return self.streaming

    def _opened_mixture(self) -> Mixture:
        """The streamed sources, opened by :meth:`setup`."""
        self.setup()
        assert self.mixture is not None, "the data module does not stream"
        return self.mixture

    def _token_splits(self) -> TokenSplits:
        """The tokenized source, loaded by :meth:`setup`."""
        self.setup()
        assert self.splits is not None, "the data module streams (no token splits)"
        return self.splits

    def stream(self, world: int = 1, rank: int = 0) -> WindowStream:
        """Rank ``rank``'s calibration windows: its share of ``token_budget`` tokens over
        ``world`` ranks, from the documents that are not held out."""
        mixture, budget = self._opened_mixture(), self._streaming().token_budget
        count = budget // (self.seq_len * world)
        if count == 0:
            raise ConfigError(
                f"data.streaming.token_budget: {budget} tokens over {world} "
                f"ranks give no window of data.seq_len {self.seq_len} per rank; need at least "
                f"{self.seq_len * world}"
            )
        return WindowStream(mixture, count, self._not_heldout, rank, world)

    def _streamed_heldout(self) -> torch.Tensor:
        """Held-out windows of the streamed sources (at most ``eval_tokens`` tokens)."""
        mixture = self._opened_mixture()
        count = self.eval_tokens // self.seq_len
        windows = list(WindowStream(mixture, count, self._heldout, exact=False))
        if not windows:
            raise ConfigError(
                f"data.streaming: the held-out documents give no window of data.seq_len "
                f"{self.seq_len} within data.eval_tokens {self.eval_tokens}"
            )
        return torch.stack(windows)

    def _heldout(self, text: str) -> bool:
        return is_heldout(text, self.seed, self.heldout_fraction)

    def _not_heldout(self, text: str) -> bool:
        return not self._heldout(text)

    def calibration_windows(self) -> torch.Tensor:
        """``num_samples`` calibration windows drawn with ``seed``."""
        windows = pack(self._token_splits().calibration, self.seq_len)
        if windows.shape[0] < self.num_samples:
            raise ConfigError(
                f"data.num_samples: source '{self.source}' gives only {windows.shape[0]} "
                f"calibration sequences of seq_len {self.seq_len}, asked for {self.num_samples}"
            )
        generator = torch.Generator().manual_seed(self.seed)
        chosen = torch.randperm(windows.shape[0], generator=generator)[: self.num_samples]
        return windows[chosen.sort().values]

    def heldout_windows(self, splits: TokenSplits | None = None) -> torch.Tensor:
        """Non-overlapping held-out windows (at most ``eval_tokens`` tokens)."""
        if splits is None and self.streaming is not None:
            return self._streamed_heldout()
        self.setup()
        windows = pack((splits or self._token_splits()).heldout, self.seq_len, self.eval_tokens)
        if windows.shape[0] == 0:
            raise ConfigError(
                f"data.source: held-out split of '{self.source}' is shorter than seq_len "
                f"{self.seq_len}"
            )
        return windows

    def train_dataloader(self) -> DataLoader | StreamLoader:
        trainer = self.trainer  # data parallel: this rank's share of every global batch
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        if self.streaming is not None:
            return StreamLoader(self.stream(world, rank), self.batch_size, self._resume)
        dataset = TokenWindows(self.calibration_windows())
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(dataset, self.seed, world, rank),
            resume=self._resume,
        )

    def calibration_dataloader(self) -> DataLoader | StreamLoader:
        """Every calibration window in order, on every rank (one-shot calibration gives the
        same masks on all ranks)."""
        if self.streaming is not None:
            return StreamLoader(self.stream(), self.batch_size)
        return DataLoader(TokenWindows(self.calibration_windows()), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TokenWindows(self.heldout_windows()), batch_size=self.batch_size)

    # -- exact resume: where in the epoch a checkpoint was taken ---------------------------
    def state_dict(self) -> dict[str, int]:
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        # a _ProcessedTracker at run time; Lightning declares the base tracker's type
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed  # type: ignore[attr-defined]
        finished = done >= trainer.num_training_batches
        return {"epoch": trainer.current_epoch, "batches_done": 0 if finished else done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = SkipOnce(
            int(state_dict.get("epoch", 0)), int(state_dict.get("batches_done", 0))
        )
