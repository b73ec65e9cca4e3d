"""Training objectives as classes, by name (``TASKS``), and ``decide_task``, the one place that decides which a run
is (``plan.plan_run`` calls it once per run)."""

from __future__ import annotations

from collections.abc import Sequence

from executor.tuning.config import TrainConfig
from executor.tuning.data.sources import Item
from executor.tuning.errors import DataError
from executor.tuning.losses import CROSS_ENTROPY
from executor.tuning.pair_losses import PAIR_LOSSES
from executor.tuning.tasks.base import Task
from executor.tuning.tasks.classification import Classification, LinearProbe
from executor.tuning.tasks.metric import MetricLearning
from executor.tuning.tasks.pairs import PairTraining, pair_shape
from executor.tuning.tasks.self_supervised import SELF_SUPERVISED_LOSSES, SelfSupervised
from executor.tuning.tasks.text_to_image import TextToImage

__all__ = [
    'Classification',
    'LinearProbe',
    'MetricLearning',
    'PairTraining',
    'SelfSupervised',
    'Task',
    'TASKS',
    'TextToImage',
    'decide_task',
]

TASKS: dict[str, type[Task]] = {
    task.name: task for task in (MetricLearning, Classification, LinearProbe, SelfSupervised, PairTraining, TextToImage)
}


def decide_task(config: TrainConfig, items: Sequence[Item]) -> Task:
    """A ``text_model`` beside the model is text-to-image training; sentence pairs, triplets or scored pairs are pair
    training; cross-entropy is classification (a linear probe
    with ``freeze=True``); a self-supervised loss on unlabelled data is SimCLR (SimCSE for text); anything else is
    metric learning on labels (whose data check then asks for the labels)."""
    if config.two_tower:
        return TextToImage(config)
    shape = pair_shape(items)
    if shape is not None:
        return PairTraining(config, *shape)
    if config.loss in PAIR_LOSSES:
        raise DataError(
            f'{config.loss} trains on sentence pairs (an anchor,positive[,negative] or a sentence1,sentence2,score '
            f'CSV), but {items[0].name} is a single item; for labelled items use a metric loss such as '
            'TripletMarginLoss'
        )
    labelled = any(it.label is not None for it in items)
    if config.loss == CROSS_ENTROPY:
        return LinearProbe(config) if config.freeze is True else Classification(config)
    if not labelled and config.loss in SELF_SUPERVISED_LOSSES:
        return SelfSupervised(config)
    return MetricLearning(config)
