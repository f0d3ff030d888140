"""Errors of the export and serving stages (all :class:`kmedtl.errors.KmedtlError`).

Each message names the file or argument at fault and what to do about it.
"""

from __future__ import annotations

from kmedtl.errors import KmedtlError, ServingError

__all__ = ["ExportError", "ParityError", "PushError", "ServingError"]


class ExportError(KmedtlError):
    """A run folder cannot be exported as asked (missing file, converter failure, ...)."""


class ParityError(ExportError):
    """An exported format disagrees with the Keras model beyond its bound (``--verify``)."""


class PushError(ExportError):
    """A model cannot be pushed to ``saved_models/<name>/<version>/``."""
