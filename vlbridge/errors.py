"""Errors meant for the user: what was wrong, the value seen, and how to fix it."""


class VLBridgeError(Exception):
    """Base class of every error vlbridge raises on purpose; the CLI prints these without a traceback."""


class ConfigError(VLBridgeError, ValueError):
    """A recipe, override or config value is invalid."""


class DataError(VLBridgeError, ValueError):
    """A sample, image or dataset file is missing or malformed."""
