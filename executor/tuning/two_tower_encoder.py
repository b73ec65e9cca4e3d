"""Serving a two-tower model: each item to the encoder of its tower, both in one call (``TwoTowerEncoder``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from executor.tuning import artifact
from executor.tuning.data.sources import Item
from executor.tuning.evaluation.evaluator import ItemEmbedder
from executor.tuning.inputs.base import item_names
from executor.tuning.inputs.two_tower import Text, TwoTowerInputs
from executor.tuning.models import TOWERS


class TwoTowerEncoder:
    """A two-tower model's encoder: each item goes to the encoder of its tower (sentences, marked ``Text``, to the
    text tower; images to the image tower), both in one call, the embeddings in the items' order.

    ``towers`` maps ``'clip-vision'`` and ``'clip-text'`` to an ``inference.Encoder`` each (torch or onnxruntime,
    each with its own preprocessing); ``tower(name)`` serves one alone.
    """

    shares_batches = False  # each tower batches its own items
    class_names = None
    has_classifier = False

    def __init__(self, towers: dict[str, Any], inputs: TwoTowerInputs) -> None:
        self.towers = dict(towers)
        self.inputs = inputs
        self.embed_dim = next(iter(self.towers.values())).embed_dim
        self.runtime = next(iter(self.towers.values())).runtime
        self.device = next(iter(self.towers.values())).device

    def tower(self, name: str) -> Any:
        if name not in self.towers:
            raise ValueError(f'unknown tower {name!r}; this two-tower model has {sorted(self.towers)}')
        return self.towers[name]

    def items(
        self, items: Sequence[Item], what: str = 'documents', prompt_name: str | None = None
    ) -> tuple[list[Any], list[str]]:
        self.inputs.check_items(items, what)
        captioned = next((it for it in items if it.kind == 'image' and it.text is not None), None)
        if captioned is not None:
            raise ValueError(
                f'{captioned.name} holds both an image and a text: a two-tower model embeds each on its own; send the '
                'image and its caption as two documents'
            )
        return [self.inputs.content_of(it, prompt_name) for it in items], [it.name for it in items]

    def encode(self, contents: Sequence[Any], batch_size: int = 32, names: Sequence[str] | None = None) -> np.ndarray:
        """``(N, D)``: sentences (``Text``) through the text tower, the rest through the image tower."""
        names = item_names(len(contents), names, 'item')
        out = np.zeros((len(contents), self.embed_dim), np.float32)
        for tower, is_text in (('clip-vision', False), ('clip-text', True)):
            rows = [i for i, c in enumerate(contents) if isinstance(c, Text) == is_text]
            if rows:
                got = self.towers[tower].encode([contents[i] for i in rows], batch_size, [names[i] for i in rows])
                out[rows] = got
        return out

    def classify(self, contents: Sequence[Any], batch_size: int = 32, names: Sequence[str] | None = None):
        raise ValueError('a two-tower model has no classifier head; it embeds images and texts into one space')

    def embedder(self, batch_size: int = 32) -> ItemEmbedder:
        return ItemEmbedder(self, batch_size)

    def __repr__(self) -> str:
        return f'TwoTowerEncoder({self.towers!r})'


def runtime_for(path: Path, runtime: artifact.Runtime) -> artifact.Runtime:
    """The runtime a served model file runs on: an ``.onnx`` file on onnxruntime; a ``model.pt`` on torch, except a
    two-tower model's on ``runtime`` 'onnx' when ``artifact.served_file`` serves both towers from their exports."""
    if path.suffix == '.onnx':
        return 'onnx'
    exported = all(artifact.served_file(path, runtime, tower=name).suffix == '.onnx' for name in TOWERS)
    return 'onnx' if exported else 'torch'
