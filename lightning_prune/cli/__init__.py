"""``lightning-prune``: the console script (:mod:`.dispatch`) and its commands.

:mod:`.prune` is mask learning's ``LightningCLI`` (fit, validate, export, evaluate),
:mod:`.recover` the ``recover`` command, :mod:`.plugins` the plugin listing, and :mod:`.common`
what the two ``LightningCLI`` commands share. They never import each other.
"""

from lightning_prune.cli.dispatch import main
from lightning_prune.cli.prune import PruningTrainer

__all__ = ["PruningTrainer", "main"]
