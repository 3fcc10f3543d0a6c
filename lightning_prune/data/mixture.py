"""Windows of a weighted mixture of streamed sources, packed on the fly, for one rank."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lightning_prune.data.sampling import SkipOnce
from lightning_prune.data.sources import DataSourceError
from lightning_prune.data.streaming import StreamSource, documents, open_source, source_field
from lightning_prune.errors import ConfigError


def pack_stream(texts: Iterable[str], tokenizer: Any, seq_len: int) -> Iterator[list[int]]:
    """Consecutive ``seq_len``-token windows of ``texts`` tokenized one by one and joined with
    the EOS token (as ``data.source`` text is); the tail shorter than a window is dropped."""
    separator = tokenizer.eos_token_id
    buffer: list[int] = []
    for text in texts:
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if separator is not None:
            buffer.append(separator)
        start = 0
        while len(buffer) - start >= seq_len:
            yield buffer[start : start + seq_len]
            start += seq_len
        del buffer[:start]


def interleave(weights: list[float]) -> Iterator[int]:
    """The source of each successive window: the one furthest below its share of the windows
    so far (ties: the first). Every prefix matches the shares to within one window per source,
    and the order is the same on every run."""
    total = sum(weights)
    shares = [weight / total for weight in weights]
    counts = [0] * len(shares)
    for drawn in itertools.count(1):
        index = max(range(len(shares)), key=lambda i: shares[i] * drawn - counts[i])
        counts[index] += 1
        yield index


@dataclass
class Mixture:
    """Opened streaming sources and the tokenizer that packs them into windows."""

    sources: list[StreamSource]
    opened: list[Any]  # one streaming ``datasets.IterableDataset`` per source
    tokenizer: Any
    seq_len: int

    def packers(self, keep: Callable[[str], bool], rank: int, world: int) -> list[Iterator]:
        """One window iterator per source over the documents ``keep`` accepts, reading only
        rank ``rank``'s share of each source (whole files when the files divide evenly over
        the ``world`` ranks, otherwise every ``world``-th row)."""
        from datasets.distributed import split_dataset_by_node

        packers = []
        for index, (source, dataset) in enumerate(zip(self.sources, self.opened)):
            if world > 1:
                dataset = split_dataset_by_node(dataset, rank=rank, world_size=world)
            texts = filter(keep, documents(dataset, source, source_field(index)))
            packers.append(pack_stream(texts, self.tokenizer, self.seq_len))
        return packers


def open_mixture(sources: list[StreamSource], tokenizer: Any, seq_len: int) -> Mixture:
    """``sources`` opened, each checked by reading its first document."""
    opened = [open_source(source, source_field(i)) for i, source in enumerate(sources)]
    for index, (source, dataset) in enumerate(zip(sources, opened)):
        if next(documents(dataset, source, source_field(index)), None) is None:
            raise DataSourceError(f"{source_field(index)}.path: '{source.path}' holds no text")
    return Mixture(sources, opened, tokenizer, seq_len)


class WindowStream:
    """The first ``count`` windows of a mixture on rank ``rank`` of ``world``.

    Each window holds ``seq_len`` tokens of one source; sources take turns by weight
    (:func:`interleave`). Ranks read disjoint shares of every source, so their windows are
    disjoint. Nothing is kept beyond the current window and the tokens of the document being
    packed. ``exact``: a source that runs out before ``count`` windows is an error (every
    rank must see as many batches); otherwise the stream ends there.
    """

    def __init__(
        self,
        mixture: Mixture,
        count: int,
        keep: Callable[[str], bool],
        rank: int = 0,
        world: int = 1,
        exact: bool = True,
    ):
        self.mixture, self.count, self.keep = mixture, count, keep
        self.rank, self.world, self.exact = rank, world, exact

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.windows()

    def windows(self, start: int = 0) -> Iterator[torch.Tensor]:
        """Windows ``start``, ``start + 1``, ...: a stream resumed at window ``start`` yields
        what the whole stream yields from there (the windows before are read, not kept)."""
        packers = self.mixture.packers(self.keep, self.rank, self.world)
        order = interleave([source.weight for source in self.mixture.sources])
        for index in range(self.count):
            source = next(order)
            window = next(packers[source], None)
            if window is None:
                if self.exact:
                    raise self._exhausted(source, index)
                return
            if index >= start:
                yield torch.tensor(window, dtype=torch.long)

    def _exhausted(self, source: int, index: int) -> ConfigError:
        path = self.mixture.sources[source].path
        return ConfigError(
            f"data.streaming.token_budget: {source_field(source)} ('{path}') ran out after "
            f"window {index} of {self.count} on rank {self.rank} of {self.world} (windows of "
            f"{self.mixture.seq_len} tokens); lower the budget or that source's weight"
        )


class StreamLoader:
    """Batches (``input_ids`` = ``labels``) of a :class:`WindowStream` for Lightning.

    A sized iterable rather than a ``DataLoader``: no sampler to inject, no worker copies of
    the stream. Its first iteration can resume in the middle of an epoch: it skips the windows
    of the batches ``resume`` says were trained on (re-reading, not re-training, them).
    """

    def __init__(self, stream: WindowStream, batch_size: int, resume: SkipOnce | None = None):
        self.stream, self.batch_size = stream, batch_size
        self.resume = resume or SkipOnce()

    def __len__(self) -> int:
        return math.ceil(len(self.stream) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        position = self.resume.take()
        start = position[1] * self.batch_size if position else 0
        windows = self.stream.windows(start)
        while batch := list(itertools.islice(windows, self.batch_size)):
            ids = torch.stack(batch)
            yield {"input_ids": ids, "labels": ids}
