"""The core's errors for bad data and failed exports, and the "did you mean" hint of an unknown name, apart from
every other module so that any of them can use them."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Literal


class DataError(ValueError):
    """An item of the data cannot be used; the message names the item and the fix."""


class ExportError(RuntimeError):
    """The export gives no graph that reproduces the torch model within the tolerance."""


def close_names(name: object, choices: Iterable[str], n: int = 1, cutoff: float = 0.6) -> list[str]:
    """At most ``n`` of ``choices`` that read like ``name`` (difflib's ratio >= ``cutoff``), closest first; none for
    a name longer than any choice could be close to (difflib's time grows with the length)."""
    if len(str(name)) > EXCERPT_CHARS:
        return []
    return difflib.get_close_matches(str(name), list(choices), n=n, cutoff=cutoff)


def did_you_mean(
    name: object, choices: Iterable[str], n: int = 1, cutoff: float = 0.6, form: Literal['aside', 'clause'] = 'aside'
) -> str:
    """The hint an unknown-name error carries: `` (did you mean 'x'?)`` (``form='aside'``) or ``; did you mean 'x',
    'y'?`` (``form='clause'``) with the ``close_names`` of ``name``; ``''`` when none is close."""
    close = close_names(name, choices, n, cutoff)
    if not close:
        return ''
    names = ', '.join(repr(c) for c in close)
    return f' (did you mean {names}?)' if form == 'aside' else f'; did you mean {names}?'


EXCERPT_CHARS = 200  # the most of a request's own text (a value, a name, a key) an error message quotes


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, with how many were left out: what an error quotes of a request
    (a 1 MB model name, a list of 10^6 columns) stays that short, and so does the log line of the refusal."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f'{text[:limit]}... ({len(text) - limit} characters more)'
