"""Training objectives as classes; ``decide_task``, the one place that decides which a run is; and the checks of a
run's data that need no model, which the service runs before it creates a run."""

from __future__ import annotations

from executor.tuning.config import TrainConfig
from executor.tuning.data.sources import Item, load_items
from executor.tuning.errors import DataError
from executor.tuning.inputs import inputs_class
from executor.tuning.losses import CROSS_ENTROPY
from executor.tuning.models.registry import inputs_kind
from executor.tuning.tasks.base import Task
from executor.tuning.tasks.classification import Classification, LinearProbe
from executor.tuning.tasks.metric import MetricLearning
from executor.tuning.tasks.self_supervised import SELF_SUPERVISED_LOSSES, SelfSupervised

__all__ = [
    'Classification',
    'LinearProbe',
    'MetricLearning',
    'SelfSupervised',
    'Task',
    'check_training_data',
    'decide_task',
    'training_items',
]


def decide_task(config: TrainConfig, labelled: bool) -> Task:
    """Cross-entropy is classification (a linear probe with ``freeze=True``); a self-supervised loss on unlabelled
    data is SimCLR; anything else is metric learning on labels (whose data check then asks for the labels)."""
    if config.loss == CROSS_ENTROPY:
        return LinearProbe(config) if config.freeze is True else Classification(config)
    if not labelled and config.loss in SELF_SUPERVISED_LOSSES:
        return SelfSupervised(config)
    return MetricLearning(config)


def check_training_data(config: TrainConfig, decode: bool = False) -> tuple[list[Item], Task]:
    """The training items and the run's task, after every check of the data that needs no model: enough items,
    labels as the task needs them, content the model takes (each item decoded once with ``decode``), evaluation data
    readable and labelled.

    The service calls it before it creates a run, so that bad data is an error of the request, not a FAILED run.
    """
    items, task = training_items(config)
    inputs = inputs_class(inputs_kind(config.model))
    inputs.check_items(items, 'training items')
    if decode:
        for item in items:
            inputs.check_content(item)
    task.check_data(items)
    evaluation = evaluation_items(config)
    if evaluation is not None:
        task.evaluator(*evaluation, config.limit)  # checks that every evaluation item is labelled
    return items, task


def evaluation_items(config: TrainConfig) -> tuple[list[Item], list[Item] | None] | None:
    """The queries and the index (``None``: the queries search each other) evaluated each epoch; ``None`` without
    evaluation data."""
    if not config.has_evaluation:
        return None
    query = load_items(config.query_data if config.query_data is not None else config.eval_data, config.data_roots)
    index = load_items(config.index_data, config.data_roots) if config.index_data is not None else None
    return query, index


def training_items(config: TrainConfig) -> tuple[list[Item], Task]:
    """The training items and the run's task (decided by the loss and whether the items have labels)."""
    if config.train_data is None:
        raise DataError(
            'no training data: send labelled documents with the request, or set train_data to a CSV '
            'file or an image folder under the data roots'
        )
    items = load_items(config.train_data, config.data_roots)
    if len(items) < 2:
        raise DataError(
            f'the training data has {len(items)} item; training needs at least 2 (one batch), and '
            'metric learning at least 2 per class'
        )
    task = decide_task(config, labelled=any(it.label is not None for it in items))
    return items, task
