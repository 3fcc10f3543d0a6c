"""The exporter interface (plugin kind ``exporters``): one ``export --format`` each.

The entry-point name is the format (``hf``, ``compressed-nm``); :func:`exporter_for` picks the
exporter of a run and refuses a format that is unknown or does not support its mask family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_prune.errors import ConfigError
from lightning_prune.registry import PluginError, get_registry

if TYPE_CHECKING:
    from lightning_prune.export.common import ExportSource
    from lightning_prune.masks.base import MaskFamily

KIND = "exporters"


class Exporter(ABC):
    """Writes the pruned model of a fit checkpoint in one format.

    ``commands.run_export`` loads the checkpoint into the module, then calls :meth:`export`.
    """

    #: ``--dtype`` casts the written weights (otherwise the model's dtype is written)
    casts_dtype: bool = False
    #: what the mask family must provide (protocols of :mod:`lightning_prune.contracts`)
    requires: tuple[type, ...] = ()

    def supports(self, family: MaskFamily) -> bool:
        """Whether this format can write a model pruned by ``family`` (default: the family
        provides every protocol in :attr:`requires`)."""
        return all(isinstance(family, protocol) for protocol in self.requires)

    @abstractmethod
    def export(
        self,
        module: ExportSource,
        output_dir: str | Path,
        overwrite: bool,
        run_config: dict[str, Any] | None,
        dtype: str | None,
    ) -> Path:
        """Write the verified export into ``output_dir`` atomically (the model is consumed)."""


def exporters() -> dict[str, Exporter]:
    """Every registered exporter that loads, by format name (broken or conflicting names are
    left out)."""
    registry, found = get_registry(), dict[str, Exporter]()
    for name in registry.names(KIND):
        try:
            found[name] = registry.get(KIND, name)()
        except PluginError:
            continue
    return found


def exporter_for(export_format: str, family: MaskFamily) -> Exporter:
    """The exporter of ``export_format`` for ``family``; a ``ConfigError`` lists the formats
    that would work when it is unknown or does not support the family."""
    registry, name = get_registry(), type(family).__name__
    if export_format not in registry.names(KIND):
        raise ConfigError(
            f"--format: unknown export format '{export_format}'; formats for mask family "
            f"{name}: {_working(family)}"
        )
    # a broken or claimed-twice name raises
    exporter: Exporter = registry.get(KIND, export_format)()
    if not exporter.supports(family):
        raise ConfigError(
            f"--format {export_format} does not support mask family {name}; formats that do: "
            f"{_working(family)}"
        )
    return exporter


def casting_formats() -> list[str]:
    """The formats that accept ``--dtype``."""
    return [name for name, exporter in exporters().items() if exporter.casts_dtype]


def _working(family: MaskFamily) -> str:
    names = [name for name, exporter in exporters().items() if exporter.supports(family)]
    return f"{', '.join(names) or 'none'} (lightning-prune plugins lists every exporter)"
