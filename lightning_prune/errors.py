"""Error types: every message names the field or file at fault and what was expected."""


class LightningPruneError(Exception):
    """Base of the errors the CLI reports as ``error: <message>`` (no traceback)."""


class ConfigError(LightningPruneError, ValueError):
    """A config value is out of range, contradictory or unusable with the model/data."""


class MissingPathError(ConfigError, FileNotFoundError):
    """A file or folder named in the config does not exist."""
