"""The core's errors for bad data and failed exports, apart from every other module so that any of them can raise
them."""

from __future__ import annotations


class DataError(ValueError):
    """An item of the data cannot be used; the message names the item and the fix."""


class ExportError(RuntimeError):
    """The export gives no graph that reproduces the torch model within the tolerance."""
