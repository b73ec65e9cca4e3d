"""Data: sources (CSV, folder, in-memory) as items, the dataset fed through the model's inputs, batch samplers."""

from executor.tuning.data.dataset import Collate, ItemDataset
from executor.tuning.data.samplers import BatchSampler, adjust_items_per_class
from executor.tuning.data.sources import Item, check_under_roots, load_items
from executor.tuning.errors import DataError

__all__ = [
    'BatchSampler',
    'Collate',
    'DataError',
    'Item',
    'ItemDataset',
    'adjust_items_per_class',
    'check_under_roots',
    'load_items',
]
