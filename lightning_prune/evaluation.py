"""Held-out perplexity, plain-text tables and atomic JSON (protocol: ``protocol.py``)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn
from torchmetrics.text import Perplexity
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 1, desc: str = "perplexity"
) -> float:
    """Perplexity of ``model`` on ``[num, seq_len]`` token windows (next-token prediction)."""
    metric = Perplexity()
    device = next(model.parameters()).device
    for batch in tqdm(windows.split(batch_size), desc=desc, leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1]
        metric.update(logits.float().cpu(), batch[:, 1:].cpu())
    return float(metric.compute())


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of ``rows`` (floats with 2 decimals)."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = " | ".join(c.ljust(w) for c, w in zip(columns, widths))
    rule = "-|-".join("-" * w for w in widths)
    body = [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, rule, *body])


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "" if value is None else str(value)


def write_json(path: str | Path, payload: dict) -> None:
    """Write JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(handle, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
