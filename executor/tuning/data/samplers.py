"""Batch samplers: class-balanced (``num_items_per_class``) or random, deterministic per (seed, epoch), DDP-aware.

Written here rather than taken from pytorch-metric-learning's ``MPerClassSampler`` because that one draws from a
process-global numpy RNG and knows nothing of ranks: resuming a run exactly and splitting one global batch across
DDP ranks both need a sampler whose order is a pure function of (seed, epoch).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)


def adjust_items_per_class(batch_size: int, num_items_per_class: int, num_classes: int) -> int:
    """The nearest ``m`` that fits: ``batch_size % m == 0`` and ``batch_size // m <= num_classes``.

    Finetuner crashed when these did not hold (its issues #652, #614); here the value is adjusted with a warning.
    """
    divisors = [d for d in range(1, batch_size + 1) if batch_size % d == 0 and batch_size // d <= num_classes]
    if not divisors:
        raise ValueError(f'batch_size={batch_size} cannot be split into classes')
    best = min(divisors, key=lambda d: (abs(d - num_items_per_class), -d))
    if best != num_items_per_class:
        logger.warning(
            'num_items_per_class=%d does not fit batch_size=%d with %d classes; using %d',
            num_items_per_class,
            batch_size,
            num_classes,
            best,
        )
    return best


class BatchSampler(Sampler[list[int]]):
    """Yields this rank's share of each global batch of ``batch_size * num_replicas`` indices.

    ``mode='class'``: each global batch holds ``global_batch / m`` distinct classes with ``m`` items each, so every
    rank's share is class-balanced too (classes smaller than ``m`` repeat items). ``mode='random'``: a shuffle.
    One epoch has ``len(labels) // global_batch`` batches (the remainder is dropped so every batch is full).
    """

    def __init__(
        self,
        labels: Sequence[int],
        batch_size: int,
        mode: Literal['class', 'random'] = 'class',
        num_items_per_class: int = 4,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.labels = torch.as_tensor(list(labels))
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.global_batch = batch_size * num_replicas
        self.mode = mode
        self.seed = seed
        self.epoch = 0
        if len(self.labels) < self.global_batch:
            raise ValueError(
                f'{len(self.labels)} training items are fewer than one batch of {self.global_batch}; '
                'lower batch_size or add data'
            )
        if mode == 'class':
            classes = torch.unique(self.labels[self.labels >= 0])
            if len(classes) < 2:
                raise ValueError(
                    'class-balanced batches need at least 2 labelled classes; label the data or use '
                    "sampler='random' with a self-supervised loss"
                )
            self.by_class = [torch.nonzero(self.labels == c).flatten() for c in classes]
            self.m = adjust_items_per_class(self.global_batch, num_items_per_class, len(classes))
            if batch_size % self.m:
                self.m = math.gcd(batch_size, self.m)
        self.num_batches = len(self.labels) // self.global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def global_batches(self) -> list[torch.Tensor]:
        """Every global batch of this epoch, the same on every rank."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.mode == 'random':
            order = torch.randperm(len(self.labels), generator=gen)
            return list(order[: self.num_batches * self.global_batch].view(self.num_batches, self.global_batch))
        pools = [idx[torch.randperm(len(idx), generator=gen)] for idx in self.by_class]
        cursor = [0] * len(pools)
        per_batch = self.global_batch // self.m
        batches = []
        for _ in range(self.num_batches):
            chosen = torch.randperm(len(pools), generator=gen)[:per_batch]
            batch = []
            for c in chosen.tolist():
                pool = pools[c]
                take = [(cursor[c] + j) % len(pool) for j in range(self.m)]
                cursor[c] += self.m
                if cursor[c] >= len(pool):
                    pools[c] = pool[torch.randperm(len(pool), generator=gen)]
                    cursor[c] = 0
                batch.append(pool[take])
            batches.append(torch.cat(batch))
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for batch in self.global_batches():
            yield batch[lo:hi].tolist()
