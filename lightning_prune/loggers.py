"""The default fit logger: Lightning's CSV logger with an atomic claim of its version folder.

Lightning picks ``lightning_logs/version_N`` by listing the folder, so two fits started at once
in one ``default_root_dir`` both take ``version_0`` and the second overwrites the first's
``config.yaml`` and ``metrics.csv``. Here the version is claimed by creating its folder with
``os.mkdir``, which fails for all but one process; a loser tries the next number.
"""

from __future__ import annotations

import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only


class ClaimedVersionCSVLogger(CSVLogger):
    """``CSVLogger`` whose automatic version is claimed atomically on the global rank zero.

    Other ranks only read the number (Lightning broadcasts rank zero's log folder), so they
    create no folders. A remote filesystem (``s3://...``) keeps Lightning's own choice.
    """

    def _get_next_version(self) -> int:
        """The next free version number, claimed by creating its folder (rank zero, local)."""
        version = super()._get_next_version()
        # ``rank`` is set on the function by Lightning at import; its stubs do not declare it
        if rank_zero_only.rank != 0 or "://" in str(self._root_dir):  # type: ignore[attr-defined]
            return version
        versions_root = os.path.join(self._root_dir, self.name)
        os.makedirs(versions_root, exist_ok=True)
        while True:
            try:
                os.mkdir(os.path.join(versions_root, f"version_{version}"))
                return version
            except FileExistsError:
                version += 1
