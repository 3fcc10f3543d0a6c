"""Hidden states entering one decoder block, cached per calibration sequence, spilled to disk."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import torch


def sequence_key(tokens: torch.Tensor) -> str:
    """A key for one sequence's token ids (its content, so any batching finds it)."""
    data = tokens.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    return hashlib.sha1(data).hexdigest()


class BlockInputCache:
    """One ``[seq_len, hidden]`` tensor per calibration sequence, for one decoder block.

    Entries live in CPU memory until ``memory_bytes`` are held; later ones are written to files
    in a temporary folder (``spill_root`` or the system's) and read back when asked for.
    :meth:`close` deletes the folder.

    Args:
        block: the decoder block whose inputs are cached.
        memory_bytes: bytes held in memory before entries spill to disk (0: every entry).
        spill_root: folder in which the temporary spill folder is made.
    """

    def __init__(self, block: int, memory_bytes: int, spill_root: str | None = None):
        self.block, self.memory_bytes, self.spill_root = block, memory_bytes, spill_root
        self._memory: dict[str, torch.Tensor] = {}
        self._spilled: dict[str, Path] = {}
        self._held = 0
        self._folder: Path | None = None

    def __len__(self) -> int:
        return len(self._memory) + len(self._spilled)

    @property
    def spilled(self) -> int:
        """Entries held on disk."""
        return len(self._spilled)

    def put(self, tokens: torch.Tensor, hidden: torch.Tensor) -> None:
        """Cache ``hidden`` (``[seq_len, hidden]``) for the sequence ``tokens``."""
        key = sequence_key(tokens)
        value = hidden.detach().to("cpu").clone()
        size = value.numel() * value.element_size()
        if key in self._memory or key in self._spilled:
            return
        if self._held + size <= self.memory_bytes:
            self._memory[key] = value
            self._held += size
            return
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="lp-block-inputs-", dir=self.spill_root))
        path = self._folder / f"{key}.pt"
        torch.save(value, path)
        self._spilled[key] = path

    def get(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The cached hidden states of ``tokens`` (on the CPU), or ``None``."""
        key = sequence_key(tokens)
        if key in self._memory:
            return self._memory[key]
        path = self._spilled.get(key)
        return None if path is None else torch.load(path, weights_only=True)

    def close(self) -> None:
        """Drop every entry and delete the spill folder."""
        self._memory.clear()
        self._spilled.clear()
        self._held = 0
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
