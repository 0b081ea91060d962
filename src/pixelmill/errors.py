"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class PixelmillError(Exception):
    """Base class for every error caused by user input (config, data, files, models).

    The message is always one line: control characters from user input (a value or a file
    name with a newline) are escaped, never printed raw.
    """

    exit_code = 2

    def __init__(self, message: str = ""):
        one_line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))
        super().__init__(one_line)


class ConfigError(PixelmillError):
    """A config key, value or file is wrong."""


class DataError(PixelmillError):
    """A data path, image folder or CSV cannot be used."""


class ModelError(PixelmillError):
    """A model name, weight file or checkpoint cannot be used."""


class BundleError(PixelmillError):
    """An exported bundle is missing, tampered with or disagrees with its source."""


class RunError(PixelmillError):
    """A run directory is missing or incomplete."""
