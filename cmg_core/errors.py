"""Exceptions with messages that name the offending input and what was expected."""


class CMGError(Exception):
    """Base class for every error the library raises on bad input."""


class DataError(CMGError, ValueError):
    """A dataset root, captions file or image is missing or malformed."""


class ConfigError(CMGError, ValueError):
    """A configuration value is unknown or out of range."""
