"""The core's error for bad data, apart from every other module so that any of them can raise it."""

from __future__ import annotations


class DataError(ValueError):
    """An item of the data cannot be used; the message names the item and the fix."""
