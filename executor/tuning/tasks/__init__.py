"""Training objectives as classes, and ``decide_task``, the one place that decides which a run is."""
from __future__ import annotations

from executor.tuning.config import TrainConfig
from executor.tuning.losses import CROSS_ENTROPY
from executor.tuning.tasks.base import Task
from executor.tuning.tasks.classification import Classification, LinearProbe
from executor.tuning.tasks.metric import MetricLearning
from executor.tuning.tasks.self_supervised import SELF_SUPERVISED_LOSSES, SelfSupervised

__all__ = ['Classification', 'LinearProbe', 'MetricLearning', 'SelfSupervised', 'Task', 'decide_task']


def decide_task(config: TrainConfig, labelled: bool) -> Task:
    """Cross-entropy is classification (a linear probe with ``freeze=True``); a self-supervised loss on unlabelled
    data is SimCLR; anything else is metric learning on labels (whose data check then asks for the labels)."""
    if config.loss == CROSS_ENTROPY:
        return LinearProbe(config) if config.freeze is True else Classification(config)
    if not labelled and config.loss in SELF_SUPERVISED_LOSSES:
        return SelfSupervised(config)
    return MetricLearning(config)
