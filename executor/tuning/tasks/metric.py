"""Metric learning on labels: class-balanced batches, any PML loss and miner, gathered over DDP ranks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper
from torch import nn

from executor.tuning.data.sources import Item
from executor.tuning.errors import DataError
from executor.tuning.inputs import Batch
from executor.tuning.losses import LossSpec, build_loss, build_miner
from executor.tuning.matryoshka import matryoshka_sizes, sliced_loss
from executor.tuning.tasks.base import Task


class MetricLearning(Task):
    name = 'metric'
    defaults = {'loss': 'TripletMarginLoss', 'learning_rate': 1e-4, 'epochs': 5, 'batch_size': 64}

    def check_data(self, items: Sequence[Item]) -> list[str]:
        classes = super().check_data(items)
        counts = {c: 0 for c in classes}
        for it in items:
            counts[it.label] += 1
        single = [c for c, n in counts.items() if n < 2]
        if single:
            raise DataError(
                f'classes {single[:5]} have a single item: metric learning needs at least 2 items per '
                'class (a positive pair); add items or drop those classes'
            )
        return classes

    def sampler_mode(self) -> Literal['class', 'random']:
        return 'class' if self.config.sampler in ('auto', 'class') else 'random'

    def batch_multiple(self) -> int:
        return self.config.num_items_per_class

    def build_loss(self, model: nn.Module, class_names: list[str] | None, world: int) -> LossSpec:
        config = self.config
        spec = build_loss(
            config.loss, config.loss_options, num_classes=len(class_names or []) or None, embedding_size=model.embed_dim
        )
        self.miner = build_miner(config.miner, config.miner_options)
        # Under DDP, metric losses and miners see the embeddings of every rank, so negatives come from the global
        # batch; PML's wrapper scales the loss by the world size to undo DDP's gradient averaging.
        self.loss_fn: nn.Module = spec.module
        self.sizes = matryoshka_sizes(config.matryoshka_dims, config.matryoshka_weights, model.embed_dim)
        if self.sizes and spec.has_parameters:
            raise ValueError(
                f'{spec.name} holds weights of the full embedding size, which the narrower Matryoshka slices do not '
                'fit; use a loss without parameters (TripletMarginLoss, MultiSimilarityLoss...) with matryoshka_dims'
            )
        if world > 1 and isinstance(spec.module, BaseMetricLossFunction):
            self.loss_fn = DistributedLossWrapper(spec.module)
            self.miner = DistributedMinerWrapper(self.miner) if self.miner is not None else None
        self._scale = world if isinstance(self.loss_fn, DistributedLossWrapper) else 1
        return spec

    @property
    def loss_scale(self) -> int:
        return self._scale

    def compute_loss(self, net: nn.Module, model: nn.Module, batch: Batch, labels: torch.Tensor) -> torch.Tensor:
        embeddings = net(batch).float()  # (B, D)
        if not self.sizes:
            return self._loss(embeddings, labels)
        return sliced_loss(lambda sliced: self._loss(sliced[0], labels), [embeddings], self.sizes)

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        indices = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss_fn(embeddings, labels, indices)
