"""Classification fine-tuning with a linear head over the embedding (cross-entropy); the linear probe freezes the
backbone and trains the head alone."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from executor.tuning.data.sources import Item
from executor.tuning.evaluation import Evaluator
from executor.tuning.inputs import Batch
from executor.tuning.losses import LossSpec, build_loss
from executor.tuning.tasks.base import Task


class Classification(Task):
    name = 'classification'
    defaults = {'learning_rate': 1e-3, 'epochs': 5, 'batch_size': 64}
    monitor = 'accuracy'
    classifier = True

    def build_loss(self, model: nn.Module, class_names: list[str] | None, world: int) -> LossSpec:
        return build_loss(
            self.config.loss, self.config.loss_options, num_classes=len(class_names), embedding_size=model.embed_dim
        )

    def compute_loss(self, net: nn.Module, model: nn.Module, batch: Batch, labels: torch.Tensor) -> torch.Tensor:
        return self.loss.module(model.classifier(net(batch)), labels)  # logits (B, C)

    def evaluator(self, query: Sequence[Item], index: Sequence[Item] | None, limit: int) -> Evaluator:
        # accuracy on labelled queries; retrieval metrics when an index is given
        return Evaluator(query, index, limit, retrieval=index is not None, accuracy=True)


class LinearProbe(Classification):
    """``freeze=True`` with cross-entropy: only the head learns, so a higher rate and more epochs."""

    name = 'linear_probe'
    defaults = {'learning_rate': 1e-2, 'epochs': 20, 'batch_size': 128}
