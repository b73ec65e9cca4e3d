"""Sentence pairs, triplets, n-tuples and scored pairs (sentence-transformers' training data): each item's columns are
embedded in one batch (every first column, then every second...), and a pair loss compares them; a cached loss
(``CachedMultipleNegativesRankingLoss``) embeds that batch in mini-batches (``pair_losses.cached_loss``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from executor.tuning.config import TrainConfig
from executor.tuning.data.sources import Item
from executor.tuning.errors import DataError
from executor.tuning.inputs import Batch
from executor.tuning.losses import LossSpec, build_loss
from executor.tuning.matryoshka import MatryoshkaLoss, check_width
from executor.tuning.pair_losses import (
    PAIR_LOSSES,
    CosineSimilarityLoss,
    build_pair_loss,
    cached_loss,
    check_pair_data,
    mini_batch_size,
)
from executor.tuning.tasks.base import Task


def pair_shape(items: Sequence[Item]) -> tuple[int, bool] | None:
    """``(columns, scored)`` of pair or triplet items; ``None`` for single items; an error for a mix."""

    def shape(item: Item) -> tuple[int, bool] | None:
        return (len(item.columns), item.score is not None) if item.columns is not None else None

    first = shape(items[0]) if items else None
    odd = next((it for it in items if shape(it) != first), None)
    if odd is not None:
        raise DataError(
            f'{odd.name} is not shaped like {items[0].name}: training data is either single items or pairs/triplets '
            'of one shape (all scored or none), not a mix; split it into separate runs'
        )
    return first


class PairTraining(Task):
    """``MultipleNegativesRankingLoss`` on pairs, triplets and n-tuples (anchor, positive, negative_1..negative_n),
    ``CoSENTLoss`` on scored pairs by default (or any pair loss, or a pytorch-metric-learning loss with each row's
    sentences as one class)."""

    name = 'pairs'
    defaults = {'learning_rate': 2e-5, 'epochs': 1, 'batch_size': 32}

    def __init__(
        self, config: TrainConfig, columns: int, scored: bool, score_range: Sequence[float] = (0.0, 1.0)
    ) -> None:
        default = 'CoSENTLoss' if scored else 'MultipleNegativesRankingLoss'
        super().__init__(config.model_copy(update={'loss': config.loss or default}))
        self.views, self.scored = columns, scored
        self.score_range = tuple(score_range)

    def spec(self) -> dict[str, Any]:
        return {'columns': self.views, 'scored': self.scored, 'score_range': list(self.score_range)}

    def check_data(self, items: Sequence[Item]) -> None:
        """No classes; the score range, which CosineSimilarityLoss's targets are scaled from to [0, 1]."""
        if self.scored and PAIR_LOSSES.get(self.config.loss) is CosineSimilarityLoss:
            low, high = min(it.score for it in items), max(it.score for it in items)
            if high <= low:
                raise DataError(f'every training pair has the score {low}: CosineSimilarityLoss needs varied scores')
            self.score_range = (low, high)
        return None

    def build_loss(self, model: nn.Module, class_names: list[str] | None, world: int) -> LossSpec:
        config = self.config
        pml = None
        if config.loss not in PAIR_LOSSES:
            spec = build_loss(config.loss, config.loss_options, num_classes=None, embedding_size=model.embed_dim)
            if spec.has_parameters:
                raise ValueError(
                    f'{config.loss} learns a weight per class, but sentence pairs have no classes; use '
                    'MultipleNegativesRankingLoss, or a PML loss without parameters (TripletMarginLoss, NTXentLoss...)'
                )
            pml = spec.module
        module = build_pair_loss(config.loss, None if pml is not None else config.loss_options, pml_loss=pml)
        if config.matryoshka_dims is not None:
            check_width(config.matryoshka_dims, model.embed_dim)
            module = MatryoshkaLoss(module, config.matryoshka_dims, config.matryoshka_weights)
        check_pair_data(module, self.views, self.scored)
        return LossSpec(config.loss, module)

    def compute_loss(self, net: nn.Module, model: nn.Module, batch: Batch, labels: torch.Tensor) -> torch.Tensor:
        scores = None
        if self.scored:
            low, high = self.score_range
            scores = (labels.float() - low) / (high - low)  # [0, 1] for CosineSimilarityLoss; CoSENT needs order only
        mini = mini_batch_size(self.loss.module)
        if mini is not None:  # GradCache: the loss embeds the batch mini-batch by mini-batch, here and in backward
            chunks = list(model.inputs.split(batch, mini))
            no_sync = getattr(net, 'no_sync', None)  # a DDP model all-reduces once, after the last mini-batch
            return cached_loss(self.loss.module, lambda chunk: net(chunk).float(), chunks, self.views, scores, no_sync)
        columns = net(batch).float().chunk(self.views)  # each (B, D): the items' first sentences, then second...
        return self.loss.module(columns, scores)
