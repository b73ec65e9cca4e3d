"""The encoder cache: loaded models for serving, kept while they are used, least recently used dropped first; and
the encoders it holds, of a model file or of a registry model."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from executor.tuning.artifact import Runtime, served_file

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


def file_encoder(path: Path, runtime: Runtime, device: str, tower: str | None = None) -> Any:
    """A model file's encoder; a two-tower model's runs its towers' ONNX exports on 'onnx' where its run wrote them,
    and serves one tower alone when ``tower`` names it ('clip-text' or 'clip-vision'): from that tower's own export
    where ``served_file`` finds one, else from the model."""
    from executor.tuning.inference import create_encoder  # onnxruntime: loaded on first use
    from executor.tuning.two_tower_encoder import TwoTowerEncoder, runtime_for

    served = served_file(path, runtime, tower=tower)
    encoder = create_encoder(served, runtime_for(served, runtime), device=device)
    if tower is not None and served == path:  # the tower is taken from the model
        if not isinstance(encoder, TwoTowerEncoder):
            raise ValueError(
                f'select_model={tower!r} names a tower of a two-tower model, but {str(path)!r} holds a model of '
                'one tower; leave select_model out, or name a model file of the artifact'
            )
        return encoder.tower(tower)
    return encoder


def registry_encoder(name: str, runtime: str, device: str, cache_dir: Path) -> Any:
    """A registry model, pre-trained: on runtime 'onnx' through onnxruntime, exported on first use and cached in
    ``cache_dir`` by name and weights; a model that does not export is served by torch, with a warning."""
    from executor.tuning.export import ExportError
    from executor.tuning.inference import TorchEncoder
    from executor.tuning.models import build_model
    from executor.tuning.onnx_cache import cached_onnx_encoder

    model = build_model(name)
    if runtime == 'onnx':
        try:
            return cached_onnx_encoder(model, name, cache_dir, device=device)
        except (ExportError, OSError, ValueError) as err:  # no export, or an unwritable or broken cache folder
            logger.warning(
                'model %r cannot be served by onnxruntime from %s (%s); serving it with torch', name, cache_dir, err
            )
    return TorchEncoder(model, device=device, copy_model=False)
