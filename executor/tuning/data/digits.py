"""Real data that ships inside installed packages (scikit-learn's handwritten digits), for the demo and the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from executor.tuning.data.sources import Item


def digits(per_class: int | None = None, offset: int = 0, size: int = 32) -> tuple[list[np.ndarray], list[str]]:
    """scikit-learn's 8x8 digits as ``size`` px uint8 images, ``per_class`` of each digit starting at ``offset``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images, labels = [], []
    for digit in range(10):
        idx = np.flatnonzero(data.target == digit)[offset:]
        idx = idx[:per_class] if per_class is not None else idx
        for i in idx:
            pixels = (data.images[i] * (255.0 / 16.0)).astype(np.uint8)
            images.append(np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)))
            labels.append(str(digit))
    return images, labels


def digits_items(per_class: int | None = None, offset: int = 0, size: int = 32) -> list[Item]:
    images, labels = digits(per_class, offset, size)
    return [
        Item(id=f'digit-{label}-{offset + i}', tensor=img, label=label)
        for i, (img, label) in enumerate(zip(images, labels))
    ]


def write_digits_folder(root: str | Path, per_class: int | None = None, offset: int = 0, size: int = 32) -> Path:
    """Write digits as PNG files in ``root/<digit>/``: an image folder as users have them."""
    root = Path(root)
    images, labels = digits(per_class, offset, size)
    for i, (img, label) in enumerate(zip(images, labels)):
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / label / f'{offset + i:04d}.png')
    return root
