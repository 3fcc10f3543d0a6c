"""Write a folder atomically: build it in a temporary sibling, verify, then rename into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning_prune.errors import LightningPruneError


class OutputExistsError(LightningPruneError, FileExistsError):
    """The output folder exists and overwriting was not asked for."""


def check_target(target: str | Path, overwrite: bool) -> Path:
    """Refuse an existing ``target`` unless ``overwrite`` (call before any expensive work)."""
    target = Path(target).resolve()
    if target.exists() and not overwrite:
        raise OutputExistsError(
            f"output_dir '{target}' already exists: set overwrite to replace it"
        )
    return target


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``target`` only if the block succeeds.

    An existing ``target`` is refused unless ``overwrite``; it is kept intact until the new
    folder is complete, and on any error the temporary folder is removed.
    """
    target = check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if target.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, backup / target.name)
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
