"""The evaluation protocol: what a perplexity number was measured on, and whether two compare.

``evaluate`` writes one protocol entry per text source into its JSON record (see
``docs/report.md``). Two records compare on a source only when the fields of
:data:`KEY_FIELDS` agree: the same token ids (by hash), window length, stride, token count and
metric. Package versions and the date are recorded for reproduction but do not block a
comparison.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from lightning_prune.errors import LightningPruneError

#: marks a JSON file as an ``evaluate`` record
RECORD_KIND = "lightning_prune.evaluate"
#: protocol fields that must agree for two numbers on one source to be compared
KEY_FIELDS = ("source", "token_sha256", "seq_len", "stride", "tokens", "metric")
#: distributions whose versions go into every record
PACKAGES = (
    "lightning-prune",
    "torch",
    "transformers",
    "lightning",
    "torchmetrics",
    "tokenizers",
    "datasets",
)


class ProtocolMismatchError(LightningPruneError):
    """Records measured with different protocols were about to be compared."""


@dataclass
class Protocol:
    """How the perplexity on one source was measured (non-overlapping windows: stride = seq_len).

    ``token_sha256`` hashes the exact token ids evaluated; ``token_fingerprint`` names the
    tokenized split in the token cache (documents, tokenizer, split seed).
    """

    source: str
    seq_len: int
    stride: int
    tokens: int
    token_fingerprint: str
    token_sha256: str = ""
    windows: int = 0
    metric: str = "perplexity"
    tokenizer: str = ""
    heldout_fraction: float | None = None
    split_seed: int | None = None
    eval_tokens: int | None = None
    text_column: str | None = None
    dataset_config: str | None = None
    split: str | None = None
    batch_size: int = 1


def token_hash(windows: torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of ``windows`` as int64 token ids, shape included."""
    ids = windows.detach().to("cpu", torch.int64).contiguous()
    digest = hashlib.sha256(str(tuple(ids.shape)).encode())
    digest.update(ids.numpy().tobytes())
    return digest.hexdigest()[:16]


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages that can change a perplexity number."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def protocol_dict(protocol: Protocol) -> dict[str, Any]:
    """The protocol as a JSON-ready dict."""
    return asdict(protocol)


def protocol_key(entry: dict[str, Any]) -> tuple:
    """What must agree between two protocol entries for their numbers to compare."""
    return tuple(entry.get(name) for name in KEY_FIELDS)


def load_record(path: str | Path) -> dict[str, Any]:
    """Read an ``evaluate`` JSON record; a clear error when the file is something else."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise LightningPruneError(f"evaluation record '{path}': not readable JSON ({err})") from err
    if not is_record(record):
        raise LightningPruneError(
            f"evaluation record '{path}': expected the JSON written by `evaluate --output` "
            "(keys 'rows' and 'protocol')"
        )
    return record


def is_record(payload: Any) -> bool:
    """Whether ``payload`` looks like an ``evaluate`` record (new or older format)."""
    return (
        isinstance(payload, dict)
        and isinstance(payload.get("rows"), list)
        and isinstance(payload.get("protocol"), list)
    )


def check_comparable(records: dict[str, dict[str, Any]], allow_mixed: bool = False) -> list[str]:
    """Refuse to compare records whose protocols differ on a shared source.

    Args:
        records: evaluate records by a label (e.g. the file they came from).
        allow_mixed: report the differences instead of raising.

    Returns:
        One line per difference (empty when every shared source agrees).

    Raises:
        ProtocolMismatchError: protocols differ and ``allow_mixed`` is false.
    """
    first: dict[str, tuple[str, dict[str, Any]]] = {}
    problems = []
    for label, record in records.items():
        for entry in record["protocol"]:
            source = entry.get("source")
            if source not in first:
                first[source] = (label, entry)
                continue
            other_label, other = first[source]
            if protocol_key(entry) != protocol_key(other):
                fields = [k for k in KEY_FIELDS if entry.get(k) != other.get(k)]
                detail = ", ".join(f"{k} {other.get(k)!r} vs {entry.get(k)!r}" for k in fields)
                problems.append(f"source '{source}': {other_label} and {label} differ ({detail})")
    if problems and not allow_mixed:
        raise ProtocolMismatchError(
            "evaluation records were measured with different protocols, so their perplexities "
            "do not compare: " + "; ".join(problems) + ". Re-evaluate with one protocol, or pass "
            "--allow_mixed_protocols to show them side by side anyway"
        )
    return problems


def heldout_protocol(
    datamodule: Any, source: str, windows: torch.Tensor, fingerprint: str
) -> Protocol:
    """The protocol of the held-out windows of one source."""
    return Protocol(
        source=source,
        seq_len=datamodule.seq_len,
        stride=datamodule.seq_len,
        tokens=windows.numel(),
        token_fingerprint=fingerprint,
        token_sha256=token_hash(windows),
        windows=windows.shape[0],
        tokenizer=datamodule.tokenizer_name,
        heldout_fraction=datamodule.heldout_fraction,
        split_seed=datamodule.seed,
        eval_tokens=datamodule.eval_tokens,
        text_column=datamodule.text_column,
        dataset_config=datamodule.dataset_config,
        split=datamodule.split,
    )


def evaluation_record(
    module: Any,
    datamodule: Any,
    rows: list[dict[str, Any]],
    protocols: list[Protocol],
    ckpt_path: str | None,
    exported: list[str],
    baselines: list[str],
) -> dict[str, Any]:
    """The JSON record of one ``evaluate`` call: numbers plus what reproduces them."""
    record: dict[str, Any] = {
        "kind": RECORD_KIND,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
        "protocol": [protocol_dict(p) for p in protocols],
        "model": {
            "model": module.model_name,
            "dtype": module.dtype_name,
            "checkpoint": ckpt_path,
            "exported": exported,
        },
        "seed": int(os.environ["PL_GLOBAL_SEED"]) if "PL_GLOBAL_SEED" in os.environ else None,
        "versions": package_versions(),
    }
    if baselines:  # one-shot baselines calibrate on the data module's calibration split
        record["calibration"] = {
            "source": datamodule.source,
            "num_samples": datamodule.num_samples,
            "seq_len": datamodule.seq_len,
            "seed": datamodule.seed,
        }
    return record


def joint_rows(records: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of several records in one table (``record`` column first), and its columns."""
    sources: list[str] = []
    rows: list[dict[str, Any]] = []
    for label, record in records.items():
        for entry in record["protocol"]:
            if entry.get("source") not in sources:
                sources.append(entry.get("source"))
        rows.extend({"record": label, **row} for row in record["rows"])
    return rows, ["record", "model", *sources]
