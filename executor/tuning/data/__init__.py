"""Data: sources (CSV, folder, in-memory), lazy decoding through the model's inputs, transforms, batch samplers."""

from executor.tuning.data.dataset import Collate, ItemDataset
from executor.tuning.data.images import DataError, load_image
from executor.tuning.data.samplers import BatchSampler, adjust_items_per_class
from executor.tuning.data.sources import Item, check_under_roots, load_items
from executor.tuning.data.transforms import eval_transform, simclr_transform, train_transform

__all__ = [
    'BatchSampler',
    'Collate',
    'DataError',
    'Item',
    'ItemDataset',
    'adjust_items_per_class',
    'check_under_roots',
    'eval_transform',
    'load_image',
    'load_items',
    'simclr_transform',
    'train_transform',
]
