"""FinetunerExecutor: fine-tune, serve, evaluate and export embedding models with Jina, on your own machine.

The Jina executors are imported lazily so that `executor.tuning` (plain PyTorch) can be used without loading jina.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    'FinetunerExecutor': 'executor.executor',
    'VectorIndexer': 'executor.indexer',
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
