"""The project's error for bad input (a leaf: imports nothing of raysweep)."""


class ConfigError(ValueError):
    """A configuration problem, with the key or file it concerns in the message."""
