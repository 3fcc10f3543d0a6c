"""Error types: every message names the field or file at fault and what was expected.

User errors are reported as one line, ``lightning-prune: error: <message>``, with exit status
2 and no traceback; ``lightning-prune --debug ...`` or ``LIGHTNING_PRUNE_DEBUG=1`` prints the
traceback (with the library error that caused it) before that line.
"""

from __future__ import annotations

import os
import sys
import traceback

#: environment variable that turns on tracebacks for user errors (like ``--debug``)
DEBUG_ENV = "LIGHTNING_PRUNE_DEBUG"


class LightningPruneError(Exception):
    """Base of the errors the CLI reports as ``error: <message>`` (no traceback)."""


class ConfigError(LightningPruneError, ValueError):
    """A config value is out of range, contradictory or unusable with the model/data."""


class MissingPathError(ConfigError, FileNotFoundError):
    """A file or folder named in the config does not exist."""


def debug_requested() -> bool:
    """Whether ``LIGHTNING_PRUNE_DEBUG`` asks for tracebacks (any value but empty or 0)."""
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def user_error(err: BaseException | None) -> LightningPruneError | None:
    """``err`` or the error it wraps (jsonargparse wraps errors raised in ``__init__``), if
    that is a user error; ``None`` for a bug (its traceback is shown as is)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, LightningPruneError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def print_error(err: BaseException, debug: bool = False) -> None:
    """Print ``lightning-prune: error: <err>`` to stderr, after the traceback when ``debug``."""
    if debug or debug_requested():
        traceback.print_exception(err, file=sys.stderr)
    print(f"lightning-prune: error: {err}", file=sys.stderr)
