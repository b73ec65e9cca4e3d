"""Self-supervised SimCLR (Chen et al., 2020) on unlabelled items: two augmented views of each, a projection head,
NT-Xent (or another PML loss) between the views."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from executor.tuning.data.sources import Item
from executor.tuning.inputs import Batch, Inputs
from executor.tuning.inputs.base import Transform
from executor.tuning.losses import LossSpec, build_loss
from executor.tuning.models import ProjectionHead
from executor.tuning.tasks.base import Task

PROJECTION_DIM = 128
SELF_SUPERVISED_LOSSES = frozenset({'NTXentLoss', 'SupConLoss'})  # losses that can take two views as their pairs


class SelfSupervised(Task):
    name = 'self_supervised'
    defaults = {'learning_rate': 3e-4, 'epochs': 10, 'batch_size': 64}
    views = 2

    def check_data(self, items: Sequence[Item]) -> None:
        return None  # no labels needed: the two views of an item are its positive pair

    def train_transform(self, inputs: Inputs) -> Transform:
        return inputs.contrastive_transform()

    def build_heads(self, model: nn.Module) -> dict[str, nn.Module]:
        return {'ssl_head': ProjectionHead(model.embed_dim, PROJECTION_DIM, self.config.projection_layers)}

    def build_loss(self, model: nn.Module, class_names: list[str] | None, world: int) -> LossSpec:
        return build_loss(
            self.config.loss, self.config.loss_options, embedding_size=model.embed_dim, self_supervised=True
        )

    def compute_loss(self, net: nn.Module, model: nn.Module, batch: Batch, labels: torch.Tensor) -> torch.Tensor:
        projected = self.heads['ssl_head'](net(batch))  # (2B, P): every first view, then every second one
        first, second = projected.chunk(2)
        return self.loss.module(first, second)
