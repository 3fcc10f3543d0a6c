"""The package version, in a module of its own: modules of the package read it from here, never
from ``lightning_prune/__init__.py`` (which imports the loader, lazily)."""

__version__ = "0.1.0"
