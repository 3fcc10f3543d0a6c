"""Short plugin names in configs: ``solver: proximal`` as well as ``class_path: ...``.

jsonargparse resolves a class path without dots by searching the subclasses of the expected
type by class name. We extend that one resolver so a name registered in the plugin registry
(under the kind that matches the expected base class) resolves to its entry point's class
path; everything else is left to jsonargparse.
"""

from __future__ import annotations

import inspect
from typing import Any

from lightning_prune.masks.base import MaskFamily
from lightning_prune.registry import PluginError, get_registry
from lightning_prune.regularizers.base import Regularizer
from lightning_prune.solvers.base import Solver

PLUGIN_BASES: dict[type, str] = {
    MaskFamily: "mask_families",
    Regularizer: "regularizers",
    Solver: "solvers",
}


def _kinds_for(expected: Any) -> list[str]:
    candidates = expected if isinstance(expected, tuple) else (expected,)
    return [
        kind
        for candidate in candidates
        for base, kind in PLUGIN_BASES.items()
        if inspect.isclass(candidate) and issubclass(candidate, base)
    ]


def resolve_short_name(expected: Any, name: str) -> str | None:
    """The class path registered as ``name`` for the plugin kind of ``expected``, if any."""
    registry = get_registry()
    for kind in _kinds_for(expected):
        if name in registry.names(kind):
            info = registry.info(kind, name)  # raises on conflicting claims
            info.load()  # raises with the plugin's own error if it is broken
            return info.class_path
    return None


def install_short_names() -> None:
    """Teach jsonargparse our registry names (idempotent)."""
    from jsonargparse import _typehints

    original = _typehints.resolve_class_path_by_name
    if getattr(original, "lightning_prune", False):
        return

    def resolve(cls: Any, name: str) -> str:
        if isinstance(name, str) and "." not in name:
            resolved = resolve_short_name(cls, name)
            if resolved:
                return resolved
            kinds = _kinds_for(cls)
            path = original(cls, name)
            if kinds and "." not in path:
                known = sorted({n for k in kinds for n in get_registry().names(k)})
                raise PluginError(f"unknown {kinds[0]} plugin '{name}': expected one of {known}")
            return path
        return original(cls, name)

    resolve.__dict__["lightning_prune"] = True  # the marker read above (a function attribute)
    _typehints.resolve_class_path_by_name = resolve
