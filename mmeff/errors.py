"""The errors mmeff reports as one line naming the culprit (the command line prints them without a traceback)."""

from __future__ import annotations


class MmeffError(Exception):
    """Base of mmeff's own errors: the message names the config key, file, shard or sample at fault."""


class ConfigError(MmeffError, ValueError):
    """A config value is unknown, missing or of the wrong type; the message names the key path."""


class DataError(MmeffError):
    """A shard or sample cannot be read (under `data.strict: true`), or no usable sample is left."""


class CheckpointError(MmeffError, ValueError):
    """A checkpoint file or folder is unreadable, hostile or does not match the config."""


class TrainingError(MmeffError):
    """A run cannot go on or must not write its result (non-finite loss or weights, an export in the way)."""
