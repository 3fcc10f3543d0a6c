"""What the bad-input tests compare before and after every case: the files below some folders."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def snapshot(*folders: Path) -> dict[str, str]:
    """Every regular file (by content) and link (by target) below ``folders``, links not
    followed."""
    found = {}
    for folder in folders:
        for parent, dirs, files in os.walk(folder):
            for name in dirs + files:
                path = Path(parent) / name
                if path.is_symlink():
                    found[str(path)] = "link to " + os.readlink(path)
                elif path.is_file():
                    found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found
