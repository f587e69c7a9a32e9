"""Errors the engine raises on bad input.

Every error a user can cause carries two parts: what is wrong, and what to do about it. The CLI prints
``str(error)`` as one line; the workers store it on the run; the dashboard shows it beside the field.
"""

from __future__ import annotations


class CompressionError(Exception):
    """Base class: a user-facing problem with a clear message and a hint."""

    def __init__(self, what: str, hint: str = "") -> None:
        self.what = what
        self.hint = hint
        super().__init__(f"{what} ({hint})" if hint else what)


class ModelError(CompressionError):
    """The model file or architecture cannot be loaded or handled."""


class UnsafeFileError(ModelError):
    """The upload would need unpickling of arbitrary objects (or otherwise executing code); refused."""


class DatasetError(CompressionError):
    """The dataset cannot be read, or does not fit the model."""


class PolicyError(CompressionError):
    """A compression policy is malformed or does not fit the model."""


class TargetError(CompressionError):
    """A hardware target is invalid, unreachable, or failed to measure."""


class SearchError(CompressionError):
    """A search configuration is invalid or a search cannot continue."""
