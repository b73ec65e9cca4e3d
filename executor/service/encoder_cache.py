"""The encoder cache: loaded models for serving, kept while they are used, least recently used dropped first."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


class EncoderCache:
    """Loaded encoders, least recently used dropped first once more than ``size`` are held.

    ``get(key, build)`` returns the cached encoder for ``key`` or builds it with ``build()``; a key should change
    when the model behind it does (the file's modification time is part of the keys the service uses).
    """

    def __init__(self, size: int = 4) -> None:
        if size < 1:
            raise ValueError(f'the encoder cache needs room for at least 1 model, got size={size}')
        self.size = size
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[tuple, threading.Lock] = {}

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            building = self._building.setdefault(key, threading.Lock())
        with building:  # one build per key, however many requests ask for it at once
            with self._lock:
                if key in self._items:
                    return self._items[key]
            encoder = build()
            with self._lock:
                self._items[key] = encoder
                self._building.pop(key, None)
                while len(self._items) > self.size:
                    dropped, _ = self._items.popitem(last=False)
                    logger.info('dropped %s from the model cache (size %d)', dropped, self.size)
        return encoder

    def drop(self, match: Callable[[tuple], bool]) -> None:
        with self._lock:
            for key in [k for k in self._items if match(k)]:
                del self._items[key]

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[tuple]:
        with self._lock:
            return list(self._items)
