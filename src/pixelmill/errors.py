"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class PixelmillError(Exception):
    """Base class for every error caused by user input (config, data, files, models).

    The message is always one line: control characters from user input (a value or a file
    name with a newline) are escaped, never printed raw.
    """

    exit_code = 2

    def __init__(self, message: str = ""):
        message = _from_worker(str(message))
        one_line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
        super().__init__(one_line)


def _from_worker(message: str) -> str:
    """The original message of an error a DataLoader worker raised.

    PyTorch raises it again in the training process as ``type("Caught X in DataLoader worker process 0.
    Original Traceback (most recent call last): ...")``, the worker's traceback inside the message; its
    last line is ``pixelmill.errors.X: the message``. (PyTorch keeps no reference to the original.)
    """
    if not (message.startswith("Caught ") and "DataLoader worker" in message and "\nOriginal Traceback" in message):
        return message
    last = message.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


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
