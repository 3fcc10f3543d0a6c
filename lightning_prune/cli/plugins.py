"""``lightning-prune plugins``: list every installed plugin and its status."""

from __future__ import annotations

import argparse

from lightning_prune.registry import get_registry

#: seconds ``lightning-prune plugins`` waits for one plugin's import by default
PLUGIN_IMPORT_TIMEOUT = 30.0


def print_plugins(argv: list[str]) -> int:
    """Print every plugin found: kind, name, class, distribution, version, status.

    Each plugin is imported with a time limit (``--timeout``): one whose import does not finish
    in time is listed as hanging rather than hanging the listing.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-prune plugins", description="List every installed plugin."
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=PLUGIN_IMPORT_TIMEOUT,
        help="seconds to wait for each plugin's import (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if not args.timeout > 0:
        parser.error(f"--timeout: expected a positive number of seconds, got {args.timeout}")
    registry = get_registry()
    registry.load_all(timeout=args.timeout)
    conflicts = registry.conflicts()
    rows = [("kind", "name", "class", "distribution", "version", "status")]
    for info in registry.infos():
        if info.error:
            status = f"BROKEN: {info.error}"
        elif (info.kind, info.name) in conflicts:
            status = "CONFLICT: name claimed by several distributions"
        else:
            status = "ok"
        rows.append(
            (info.kind, info.name, info.class_path, info.distribution, info.version, status)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[5], flush=True)
    return 0
