"""Plugin registry fed by Python entry points.

Every plugin kind has its own entry-point group (``lightning_prune.<kind>``). Built-ins register
through this project's ``pyproject.toml`` exactly like a third-party distribution does. A plugin
that fails to import is recorded as broken (with its error) instead of breaking the CLI, and two
plugins claiming one name are reported as a conflict rather than silently resolved.

A plugin whose import raises ``SystemExit`` is broken too (``KeyboardInterrupt`` still stops the
command). ``lightning-prune plugins`` imports each plugin in a daemon thread and waits at most
a time limit: a plugin whose import has not finished by then is listed as hanging (its thread
is left behind and ends with the process).
"""

from __future__ import annotations

import sys
import threading
import traceback
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from lightning_prune.errors import LightningPruneError

if sys.version_info >= (3, 12):
    from importlib.metadata import EntryPoint, entry_points
else:  # the backport has the same API and fixes selection on 3.10/3.11
    from importlib_metadata import EntryPoint, entry_points

GROUP_PREFIX = "lightning_prune."
KINDS: dict[str, str] = {
    "mask_families": "what may be removed (parametrizations on target weights)",
    "regularizers": "penalties added to the loss or applied by a prox operator",
    "solvers": "optimizers and update rules that learn the masks",
    "adapters": "model architectures: where layers, heads and prunable Linears live",
    "initializers": "one-shot masks used as warm starts",
    "exporters": "export formats (export --format NAME) and the mask families each supports",
}


class PluginError(LightningPruneError, LookupError):
    """A plugin name could not be resolved to exactly one working class."""


@dataclass
class PluginInfo:
    """One entry point of one plugin kind, loaded or not."""

    kind: str
    name: str
    target: str
    distribution: str
    version: str
    entry_point: EntryPoint | None = field(default=None, repr=False)
    error: str | None = None
    loaded: object | None = field(default=None, repr=False)

    @property
    def class_path(self) -> str:
        """Dotted import path as jsonargparse expects it (``module.Class``)."""
        return self.target.replace(":", ".")

    def load(self) -> object:
        """Import the plugin object, remembering the error if it fails."""
        if self.loaded is None and self.error is None and self.entry_point is not None:
            try:
                self.loaded = self.entry_point.load()
            except SystemExit as err:  # a plugin must not end the command
                self.error = f"its import called sys.exit({err.code!r})"
            except Exception as err:  # a broken plugin must not break the CLI
                last = traceback.format_exception_only(type(err), err)[-1].strip()
                self.error = last
        if self.error is not None:
            raise PluginError(f"{self.kind} plugin '{self.name}' is broken: {self.error}")
        return self.loaded


class Registry:
    """All plugins found in the installed distributions, grouped by kind."""

    def __init__(self) -> None:
        self._plugins: dict[str, dict[str, list[PluginInfo]]] = {kind: {} for kind in KINDS}
        for kind in KINDS:
            for ep in entry_points(group=GROUP_PREFIX + kind):
                dist = getattr(ep, "dist", None)
                info = PluginInfo(
                    kind=kind,
                    name=ep.name,
                    target=ep.value,
                    distribution=dist.name if dist else "?",
                    version=dist.version if dist else "?",
                    entry_point=ep,
                )
                claims = self._plugins[kind].setdefault(ep.name, [])
                if not any(c.target == info.target for c in claims):  # same dist seen twice
                    claims.append(info)

    def names(self, kind: str) -> list[str]:
        """Sorted plugin names of one kind."""
        return sorted(self._group(kind))

    def infos(self, kind: str | None = None) -> list[PluginInfo]:
        """Every plugin entry (all claims, conflicting ones included)."""
        kinds = [kind] if kind else list(KINDS)
        return [i for k in kinds for n in sorted(self._plugins[k]) for i in self._plugins[k][n]]

    def conflicts(self) -> dict[tuple[str, str], list[PluginInfo]]:
        """Names claimed by more than one distribution."""
        return {
            (kind, name): claims
            for kind, by_name in self._plugins.items()
            for name, claims in by_name.items()
            if len(claims) > 1
        }

    def info(self, kind: str, name: str) -> PluginInfo:
        """The single entry registered as ``name``; errors list the alternatives."""
        claims = self._group(kind).get(name)
        if not claims:
            known = ", ".join(self.names(kind)) or "none installed"
            raise PluginError(f"unknown {kind} plugin '{name}': expected one of [{known}]")
        if len(claims) > 1:
            who = ", ".join(f"{c.target} ({c.distribution} {c.version})" for c in claims)
            raise PluginError(
                f"{kind} plugin name '{name}' is claimed by several distributions: {who}; "
                "give the full class_path instead"
            )
        return claims[0]

    def get(self, kind: str, name: str) -> Any:
        """Load and return the plugin object registered as ``name``.

        Typed ``Any``: what an entry point loads is only known at run time; callers annotate
        the variable they bind it to with the class the plugin kind promises."""
        return self.info(kind, name).load()

    def load_all(self, timeout: float | None = None) -> None:
        """Import every plugin so broken ones are known (errors are recorded, not raised).

        With ``timeout``, each import runs in a daemon thread that is waited for at most
        ``timeout`` seconds; a plugin still importing then is recorded as hanging.
        """
        for info in self.infos():
            if timeout is None:
                _load_quietly(info)
                continue
            thread = threading.Thread(target=_load_quietly, args=(info,), daemon=True)
            thread.start()
            thread.join(timeout)
            if thread.is_alive():
                info.error = f"its import did not finish within {timeout:g} s (it hangs)"

    def _group(self, kind: str) -> dict[str, list[PluginInfo]]:
        if kind not in self._plugins:
            raise PluginError(f"unknown plugin kind '{kind}': expected one of {list(KINDS)}")
        return self._plugins[kind]


def _load_quietly(info: PluginInfo) -> None:
    """Import one plugin; a failure stays recorded in ``info.error``."""
    try:
        info.load()
    except PluginError:
        pass


@cache
def get_registry() -> Registry:
    """The process-wide registry (entry points are read once)."""
    return Registry()
