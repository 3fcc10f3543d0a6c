"""The one guarded writer for every output lightning-prune makes.

Folders (exports, recovered exports) are built in a temporary sibling, verified, then renamed
into place. ``overwrite`` may only replace a folder that lightning-prune itself exported (it
holds a ``pruning.json`` naming ``lightning_prune_version``), and never

- a symbolic link (nor what it points to), a regular file, or an empty path;
- the current folder, the home folder, the lightning-prune or Hugging Face caches;
- a folder holding the model, the checkpoint or another input of the run;
- an ancestor of any of them.

Single files (reports, their figures) are written through a temporary file renamed into place
and only replace files that lightning-prune wrote (see :func:`check_output_file`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning_prune.errors import ConfigError, LightningPruneError
from lightning_prune.paths import cache_dirs

#: the file every export folder holds; with ``lightning_prune_version`` in it, it marks the
#: folder as one that ``overwrite`` may replace
MARKER = "pruning.json"
_MARKER_MAX_BYTES = 64 * 2**20

#: ``(what, path)`` pairs: inputs an output must not replace (nor any folder above them)
Protected = Iterable[tuple[str, str | Path]]


class OutputExistsError(LightningPruneError, FileExistsError):
    """The output folder exists and overwriting was not asked for."""


class ExportWriteError(LightningPruneError, OSError):
    """The export could not be written (disk full, no permission, read-only filesystem)."""


class UnsafeOutputError(ConfigError):
    """The output path names something that lightning-prune must never replace."""


def check_target(
    target: str | Path, overwrite: bool, protected: Protected = (), field: str = "output_dir"
) -> Path:
    """Refuse an output folder that may not be written or replaced; return its absolute path.

    Call before any expensive work. ``protected`` names the run's inputs (model folder,
    checkpoint) besides the folders that are always protected (see the module docstring).
    """
    path = _absolute(target, field)
    _refuse_link(path, target, field)
    if os.path.lexists(path):
        if not overwrite:
            raise OutputExistsError(
                f"{field} '{path}' already exists: set overwrite to replace it"
            )
        _refuse_protected(path, field, protected)
        if not path.is_dir():
            raise UnsafeOutputError(
                f"{field}: '{path}' is a file, not an export folder; overwrite only replaces "
                "folders that lightning-prune exported"
            )
        if not is_export_folder(path):
            raise UnsafeOutputError(
                f"{field}: '{path}' was not written by lightning-prune (no {MARKER} naming "
                "lightning_prune_version); overwrite only replaces lightning-prune exports, so "
                "choose another folder or remove this one yourself"
            )
    _check_parent_writable(path, field)
    return path


def is_export_folder(folder: Path) -> bool:
    """Whether ``folder`` holds the marker that every lightning-prune export writes."""
    marker = folder / MARKER
    if marker.is_symlink() or not marker.is_file():
        return False
    if marker.stat().st_size > _MARKER_MAX_BYTES:
        return False
    try:
        record = json.loads(marker.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "lightning_prune_version" in record


def check_output_file(
    target: str | Path, field: str, is_ours: Callable[[Path], bool], what: str
) -> Path:
    """Refuse an output file path that is empty, a link, a folder or something other than a
    regular file, or an existing file that ``is_ours`` does not recognise as ``what`` written by
    lightning-prune; return its absolute path."""
    path = _absolute(target, field)
    _refuse_link(path, target, field)
    if path.is_dir():
        raise UnsafeOutputError(f"{field}: '{path}' is a folder, expected a file name")
    if os.path.lexists(path):
        if not path.is_file():
            raise UnsafeOutputError(f"{field}: '{path}' exists and is not a regular file")
        if not is_ours(path):
            raise UnsafeOutputError(
                f"{field}: '{path}' exists and is not {what} written by lightning-prune; "
                "choose another name or remove it yourself"
            )
    _check_parent_writable(path, field)
    return path


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _absolute(target: str | Path, field: str) -> Path:
    """``target`` made absolute with its parent folders resolved (the last part is kept, so a
    link there is seen as a link); an empty path is refused."""
    if target is None or str(target).strip() == "":
        raise UnsafeOutputError(
            f"{field}: the path is empty (an unset variable?); expected a folder to write"
        )
    path = Path(os.path.abspath(Path(target).expanduser()))
    return path.parent.resolve() / path.name if path.name else path


def _refuse_link(path: Path, target: str | Path, field: str) -> None:
    if path.is_symlink():
        raise UnsafeOutputError(
            f"{field}: '{target}' is a symbolic link (to '{os.readlink(path)}'); outputs never "
            "replace a link or what it points to, so name a real path"
        )


def _refuse_protected(path: Path, field: str, protected: Protected) -> None:
    """Refuse ``path`` when it is, or lies above, a folder that must survive every run."""
    always = [("the current folder", Path.cwd()), ("the home folder", Path.home())]
    for what, folder in [*always, *cache_dirs(), *protected]:
        for form in {Path(os.path.abspath(folder)), Path(folder).resolve()}:
            if path == form or path in form.parents:
                relation = "" if path == form else "a folder above "
                raise UnsafeOutputError(
                    f"{field}: '{path}' is {relation}{what} ('{folder}'), which lightning-prune "
                    "never replaces; choose another folder"
                )


def _check_parent_writable(path: Path, field: str) -> None:
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ExportWriteError(f"{field} '{path}': '{ancestor}' is a file, expected a folder")
    if not os.access(ancestor, os.W_OK):
        raise ExportWriteError(f"{field} '{path}': '{ancestor}' is not writable")


#: errors that mean "this folder cannot take the export", reported as ExportWriteError
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR}


@contextmanager
def atomic_directory(
    target: str | Path, overwrite: bool = False, protected: Protected = ()
) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``target`` only if the block succeeds.

    ``target`` is checked by :func:`check_target` before and again just before the rename (it
    may have changed during the export); an existing one is kept intact until the new folder is
    complete, and on any error the temporary folder is removed. A full disk or an unwritable
    parent raises :class:`ExportWriteError`.
    """
    protected = list(protected)
    target = check_target(target, overwrite, protected)
    try:
        with _replacing(target, lambda: check_target(target, overwrite, protected)) as tmp:
            yield tmp
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        raise ExportWriteError(
            f"output_dir '{target}': the export could not be written ({os.strerror(err.errno)}); "
            f"{'the previous export is unchanged' if target.exists() else 'nothing was left there'}"
        ) from err


@contextmanager
def _replacing(target: Path, recheck: Callable[[], Path]) -> Iterator[Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        recheck()
        if os.path.lexists(target):
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, backup / target.name)
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
