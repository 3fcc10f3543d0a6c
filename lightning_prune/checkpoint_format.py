"""What lightning-prune stores in a fit checkpoint, and the checks a checkpoint must pass, on
plain data (dicts and tensors: no module, file or strategy).

Besides Lightning's entries (``state_dict`` holds the learned state only), a fit checkpoint
holds:

- :data:`RECORD_KEY`: the fingerprint of what it was made for (:func:`fingerprint_record`): the
  model's name and shapes, its content (config record and weights digest, see
  :mod:`lightning_prune.identity`), the mask family's class name, the lightning-prune version
  and :data:`CHECKPOINT_FORMAT`;
- :data:`LAYOUT_KEY`: how the run that saved it was sharded (:func:`layout_record`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lightning_prune.errors import ConfigError
from lightning_prune.identity import config_differences
from lightning_prune.version import __version__

#: layout of the ``lightning_prune`` checkpoint record and learned state; bump on changes
CHECKPOINT_FORMAT = 1
#: the checkpoint entry holding the fingerprint
RECORD_KEY = "lightning_prune"
#: the checkpoint entry holding the sharding of the run that saved it
LAYOUT_KEY = "lightning_prune_layout"
#: fingerprint fields that must equal the running model's (shapes and mask family)
MATCHED_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size", "mask_family")


def fingerprint_record(
    model_name: str, config: Any, content: dict[str, Any], mask_family: str
) -> dict[str, Any]:
    """The :data:`RECORD_KEY` entry for ``model_name`` (HF ``config``), its ``content``
    identity (``config`` record and ``weights_sha256``) and the mask family's class name."""
    return {
        "model": model_name,
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        **content,
        "mask_family": mask_family,
        "version": __version__,
        "format": CHECKPOINT_FORMAT,
    }


def layout_record(fsdp2: bool, world_size: int, fsdp1: bool) -> dict[str, Any]:
    """The :data:`LAYOUT_KEY` entry: FSDP2 or not, the world size, and ``fsdp1`` when set."""
    layout: dict[str, Any] = {"fsdp2": fsdp2, "world_size": world_size}
    if fsdp1:
        layout["fsdp1"] = True
    return layout


def saved_record(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's fingerprint; ``ConfigError`` when it is not a lightning-prune one."""
    saved = checkpoint.get(RECORD_KEY)
    if not isinstance(saved, dict):
        raise ConfigError("ckpt_path: not a lightning-prune checkpoint (no 'lightning_prune' key)")
    return saved


def check_identity(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise ``ConfigError`` unless the ``saved`` fingerprint was written in this format for
    the model and mask of the ``current`` one (shapes, config fields, weights digest)."""
    if saved.get("format", 1) != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"ckpt_path: checkpoint format {saved.get('format')} written by lightning-prune "
            f"{saved.get('version')}; this lightning-prune {__version__} reads format "
            f"{CHECKPOINT_FORMAT}: export it with the version that wrote it"
        )
    wrong = {k: (saved.get(k), current[k]) for k in MATCHED_FIELDS if saved.get(k) != current[k]}
    wrong.update(_content_mismatch(saved, current))
    if wrong:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in wrong.items())
        raise ConfigError(
            f"ckpt_path: checkpoint was made for another model or mask ({detail}); "
            f"it was saved for model '{saved.get('model')}'"
        )


def _content_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple]:
    """Config fields and the weights digest that differ (``{field: (checkpoint, model)}``).

    Checkpoints written before content fingerprints (no ``config`` record) pass with a
    warning: their model is checked by shapes only. A digest is compared where both sides
    have one (models without local safetensors files have none).
    """
    if not isinstance(saved.get("config"), str):
        warnings.warn(
            f"ckpt_path: this checkpoint (lightning-prune {saved.get('version')}) records no "
            "config or weights digest of its model; only the model's shapes were checked",
            stacklevel=4,
        )
        return {}
    try:
        differences = config_differences(saved["config"], current["config"])
    except ValueError as err:
        raise ConfigError(
            f"ckpt_path: the checkpoint's config record is unreadable ({err})"
        ) from err
    wrong = {f"config.{key}": values for key, values in differences.items()}
    digests = saved.get("weights_sha256"), current["weights_sha256"]
    if None not in digests and digests[0] != digests[1]:
        wrong["weights_sha256"] = (str(digests[0])[:16], digests[1][:16])
    return wrong


def check_learned_state(state: dict[str, Any], expected: set[str]) -> None:
    """Raise ``ConfigError`` when ``state`` lacks one of the ``expected`` learnable tensors or
    holds a non-finite learned value."""
    missing = expected - set(state)
    if missing:
        raise ConfigError(
            f"ckpt_path: checkpoint lacks {len(missing)} learnable tensors "
            f"(e.g. {sorted(missing)[0]})"
        )
    check_finite_state(state)


def check_finite_state(state: dict[str, Any]) -> None:
    """Refuse learned state holding NaN or infinity, naming the first such tensor."""
    for name, tensor in state.items():
        if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
            continue
        bad = ~torch.isfinite(tensor)
        if bad.any():
            kinds = [k for k, f in (("nan", torch.isnan), ("inf", torch.isinf)) if f(tensor).any()]
            raise ConfigError(
                f"ckpt_path: learned tensor '{name}' holds {int(bad.sum())} non-finite values "
                f"({', '.join(kinds)}) of {tensor.numel()}; the checkpoint is unusable"
            )
