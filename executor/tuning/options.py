"""A library constructor's options as a request sends them (JSON: numbers, strings, booleans, lists), checked against
the constructor's signature before anything is built: each option's kind is told from its default, so that a string
where an object or a number is expected (``distance='os.system'``, ``margin='nan'``), an object where JSON can carry
none, or a boolean where a number is expected is refused naming the option, and whole floats (what gRPC's ``Struct``
and jina's HTTP carry for ``5``) become the integers the constructor takes.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any

from executor.tuning.errors import excerpt

# Options with no default (or a None one) that are counts: whole floats become ints (PML's ArcFaceLoss(num_classes,
# embedding_size) fails on floats with "new() received an invalid combination of arguments - got (float, float)").
COUNTS = {'num_classes', 'embedding_size', 'centers_per_class', 'sub_centers', 'descriptors_dim'}


def signature_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword parameters ``cls`` takes, through its MRO while each ``__init__`` forwards ``**kwargs`` (a
    subclass's own wins over its base's)."""
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if klass is object or '__init__' not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        for name, param in params.items():
            if name != 'self' and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                found.setdefault(name, param)
        if not any(v.kind == v.VAR_KEYWORD for v in params.values()):
            break
    return found


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_options(kind: str, cls: type, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` checked against ``cls``'s signature (``kind`` names it in messages: ``'loss'``, ``'optimizer'``),
    whole floats turned into ints where the default is an int (or the option is a count), lists into tuples where
    the default is a tuple. ``ValueError`` names the first option that does not fit, what it takes and what it got."""
    params = signature_parameters(cls)
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f'{kind} {cls.__name__} has no option {excerpt(unknown)}; it takes {sorted(params)}')
    checked = {}
    for name, value in options.items():
        default = params[name].default
        checked[name] = _checked(f'{kind} {cls.__name__} option {name!r}', name, value, default)
    return checked


def _checked(where: str, name: str, value: Any, default: Any) -> Any:
    absent = default is inspect.Parameter.empty
    like = 'a value' if absent else f'a value like its default {default!r}'
    if default is None and name not in COUNTS:
        like = 'a Python object (its default is None), which JSON cannot carry'
    got = f'got {excerpt(value)}'
    if isinstance(value, dict):
        raise ValueError(f'{where} takes {like}, not a JSON object; {got}')
    if value is None:
        if absent or default is None:
            return None
        raise ValueError(f'{where} takes {like}, not null; {got}')
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f'{where} takes true or false; {got}')
        return value
    if isinstance(value, bool):
        if absent or default is None:
            return value
        raise ValueError(f'{where} takes {like}, not a boolean; {got}')
    if isinstance(value, (list, tuple)):
        if not isinstance(default, (list, tuple)) or len(value) != len(default):
            raise ValueError(f'{where} takes {like}, not this list; {got}')
        return tuple(_checked(f'{where}[{i}]', name, v, d) for i, (v, d) in enumerate(zip(value, default)))
    if isinstance(value, str):
        if isinstance(default, str):
            return value
        wanted = 'a number' if absent or name in COUNTS else like
        raise ValueError(f'{where} takes {wanted}, not a string; {got}')
    if not _is_number(value) or isinstance(default, (list, tuple)):
        raise ValueError(f'{where} takes {like}; {got}')
    if not math.isfinite(value):
        raise ValueError(f'{where} takes a finite number; {got}')
    if default is None and name not in COUNTS:
        raise ValueError(f'{where} takes {like}, not a number; {got}')
    # a string default (PML's triplets_per_anchor='all') stands for a count when a number is given instead
    takes_int = name in COUNTS if absent or default is None else isinstance(default, (int, str))
    if isinstance(value, float) and value.is_integer() and takes_int:
        return int(value)
    return value
