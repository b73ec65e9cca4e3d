"""A map-style dataset over items: decodes lazily, applies a transform, returns ``(image, label_index)``."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from executor.tuning.data.images import DataError, load_image
from executor.tuning.data.sources import Item

UNLABELLED = -1


class ImageDataset(Dataset):
    """``__getitem__(i) -> (tensor (3, H, W), label index or -1)``; ``views=2`` returns two augmented views."""

    def __init__(self, items: Sequence[Item], transform: Callable, class_names: Sequence[str] | None = None,
                 views: int = 1) -> None:
        text = [it.id for it in items if it.kind == 'text']
        if text:
            raise DataError(f'{len(text)} items are text ({text[:3]}...), but the models here embed images; '
                            'send images (uri, blob or tensor)')
        self.items = list(items)
        self.transform = transform
        self.class_names = list(class_names) if class_names is not None else None
        self.class_index = {c: i for i, c in enumerate(self.class_names or [])}
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

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.items[index]
        image = load_image(item.content, name=item.name)
        if self.views == 1:
            return self.transform(image), self.label_index(item)
        return torch.stack([self.transform(image) for _ in range(self.views)]), self.label_index(item)
