"""A map-style dataset over items, fed through the model's ``Inputs``, and the collate function of its batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from executor.tuning.data.sources import Item
from executor.tuning.inputs.base import DOCUMENT, QUERY, Batch, Inputs, Transform

UNLABELLED = -1


def column_prompt(item: Item, column: int) -> str | None:
    """The prompt role of a pair's column: an unscored pair, triplet or n-tuple is (query, document, document...),
    as retrieval trains it; a scored pair (STS) is symmetric and takes none."""
    if item.score is not None:
        return None
    return QUERY if column == 0 else DOCUMENT


class ItemDataset(Dataset):
    """``__getitem__(i) -> (sample, label index or -1)``, decoded lazily; ``views=2`` gives a tuple of two samples
    (each its own draw of ``transform``), the positive pair of self-supervised training. A pair or triplet item gives
    a sample per column (behind the model's query and document prompts, ``column_prompt``), and its score (a float)
    instead of a label index when it is scored."""

    def __init__(
        self,
        items: Sequence[Item],
        inputs: Inputs,
        transform: Transform,
        class_names: Sequence[str] | None = None,
        views: int = 1,
    ) -> None:
        inputs.check_items(items, 'training items')
        self.items = list(items)
        self.inputs = inputs
        self.transform = transform
        self.class_index = {c: i for i, c in enumerate(class_names or [])}
        self.views = views

    def __len__(self) -> int:
        return len(self.items)

    def label_index(self, item: Item) -> int:
        if item.label is None or not self.class_index:
            return UNLABELLED
        return self.class_index.get(item.label, UNLABELLED)

    @property
    def labels(self) -> list[int]:
        return [self.label_index(it) for it in self.items]

    def __getitem__(self, index: int) -> tuple[Any, int | float]:
        item = self.items[index]
        if item.columns is not None:
            samples = tuple(
                self.transform(
                    self.inputs.load(self.inputs.prompt(c, column_prompt(item, i)), f'{item.name} column {i + 1}')
                )
                for i, c in enumerate(item.columns)
            )
            return samples, item.score if item.score is not None else UNLABELLED
        loaded = self.inputs.load(self.inputs.content_of(item), item.name)
        if self.views == 1:
            return self.transform(loaded), self.label_index(item)
        return tuple(self.transform(loaded) for _ in range(self.views)), self.label_index(item)


class Collate:
    """``[(sample, label), ...] -> (Batch, labels (B,))``; with views, the batch holds every first view, then every
    second one (``2B`` rows, view-major), so its two halves are the positive pairs (and so for a pair's or a
    triplet's columns)."""

    def __init__(self, inputs: Inputs, views: int = 1) -> None:
        self.inputs = inputs
        self.views = views

    def __call__(self, rows: list[tuple[Any, int]]) -> tuple[Batch, torch.Tensor]:
        if self.views == 1:
            samples = [sample for sample, _ in rows]
        else:
            samples = [views[v] for v in range(self.views) for views, _ in rows]
        labels = [label for _, label in rows]
        dtype = torch.float32 if isinstance(labels[0], float) else torch.long  # the scores of scored pairs
        return self.inputs.collate(samples), torch.tensor(labels, dtype=dtype)
