"""Write a folder atomically: build it in a temporary sibling, verify, then rename into place."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning_prune.errors import LightningPruneError


class OutputExistsError(LightningPruneError, FileExistsError):
    """The output folder exists and overwriting was not asked for."""


class ExportWriteError(LightningPruneError, OSError):
    """The export could not be written (disk full, no permission, read-only filesystem)."""


def check_target(target: str | Path, overwrite: bool) -> Path:
    """Refuse an existing ``target`` unless ``overwrite`` (call before any expensive work)."""
    target = Path(target).resolve()
    if target.exists() and not overwrite:
        raise OutputExistsError(
            f"output_dir '{target}' already exists: set overwrite to replace it"
        )
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ExportWriteError(f"output_dir '{target}': '{ancestor}' is a file, expected a folder")
    if not os.access(ancestor, os.W_OK):
        raise ExportWriteError(f"output_dir '{target}': '{ancestor}' is not writable")
    return target


#: errors that mean "this folder cannot take the export", reported as ExportWriteError
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR}


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``target`` only if the block succeeds.

    An existing ``target`` is refused unless ``overwrite``; it is kept intact until the new
    folder is complete, and on any error the temporary folder is removed. A full disk or an
    unwritable parent raises :class:`ExportWriteError`.
    """
    target = check_target(target, overwrite)
    try:
        with _replacing(target) as tmp:
            yield tmp
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        raise ExportWriteError(
            f"output_dir '{target}': the export could not be written ({os.strerror(err.errno)}); "
            f"{'the previous export is unchanged' if target.exists() else 'nothing was left there'}"
        ) from err


@contextmanager
def _replacing(target: Path) -> Iterator[Path]:
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
