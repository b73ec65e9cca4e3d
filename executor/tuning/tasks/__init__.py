"""Training objectives as classes; ``decide_task``, the one place that decides which a run is; and the checks of a
run's data that need no model, which the service runs before it creates a run."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

from executor.tuning.config import TrainConfig
from executor.tuning.data.sources import Item, load_items
from executor.tuning.errors import DataError
from executor.tuning.inputs import inputs_class
from executor.tuning.losses import CROSS_ENTROPY
from executor.tuning.models.registry import inputs_kind
from executor.tuning.models.weights import read_state_dict
from executor.tuning.optim import build_optimizer
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
    'TextToImage',
    'check_training_data',
    'decide_task',
    'training_items',
]


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


def check_training_data(config: TrainConfig, decode: bool = False) -> tuple[list[Item], Task]:
    """The training items and the run's task, after every check that needs no model built: enough items, labels as
    the task needs them, content the model takes (each item decoded once with ``decode``), evaluation data readable
    and labelled, a model file and a weights file that load, a loss, miner and optimizer that take their options.

    The service calls it before it creates a run, so that bad input is an error of the request, not a FAILED run.
    """
    items, task = training_items(config)
    inputs = inputs_class('image-text' if config.two_tower else inputs_kind(config.model))
    inputs.check_items(items, 'training items')
    if decode:
        for item in items:
            inputs.check_content(item)
    classes = task.check_data(items)
    check_objective(task.config, task, classes)
    if config.weights is not None:
        read_state_dict(config.weights)
    evaluation = evaluation_items(config)
    if evaluation is not None:
        task.evaluator(*evaluation, config.limit)  # checks that every evaluation item is labelled
    return items, task


def evaluation_items(config: TrainConfig) -> tuple[list[Item], list[Item] | None] | None:
    """The queries and the index (``None``: the queries search each other) evaluated each epoch; ``None`` without
    evaluation data."""
    if not config.has_evaluation:
        return None
    if config.eval_data is None and config.query_data is None:  # val_split: the held-out share of train_data
        return holdout(load_items(config.train_data, config.data_roots, config.csv_options), config)[1], None
    query_source = config.query_data if config.query_data is not None else config.eval_data
    query = load_items(query_source, config.data_roots, config.csv_options)
    index = None if config.index_data is None else load_items(config.index_data, config.data_roots, config.csv_options)
    return query, index


def training_items(config: TrainConfig) -> tuple[list[Item], Task]:
    """The training items and the run's task (decided by the loss and whether the items have labels)."""
    if config.train_data is None:
        raise DataError(
            'no training data: send labelled documents with the request, or set train_data to a CSV '
            'file or an image folder under the data roots'
        )
    items = load_items(config.train_data, config.data_roots, config.csv_options)
    if config.val_split > 0 and config.eval_data is None and config.query_data is None:
        items = holdout(items, config)[0]
    if len(items) < 2:
        raise DataError(
            f'the training data has {len(items)} item; training needs at least 2 (one batch), and '
            'metric learning at least 2 per class'
        )
    task = decide_task(config, items)
    return task.prepare(items), task


def holdout(items: list[Item], config: TrainConfig) -> tuple[list[Item], list[Item]]:
    """``items`` split into training and held-out evaluation items by ``val_split``, the same way every time (by
    ``seed``): labelled items class by class, so each class keeps items on both sides (a class held out needs two,
    one to search for the other); unlabelled ones (pairs) row by row."""
    import random

    rng = random.Random(config.seed)
    groups: dict[str | None, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.label, []).append(i)
    held: set[int] = set()
    for label, members in groups.items():
        count = round(len(members) * config.val_split)
        if label is not None and count == 1:
            count = 2 if len(members) >= 4 else 0
        held.update(rng.sample(members, count))
    if not held:
        raise DataError(
            f'val_split={config.val_split} holds out no item of the {len(items)} training items (a labelled class '
            'needs 4 items to give 2 to the evaluation); raise val_split, or give eval_data'
        )
    return [it for i, it in enumerate(items) if i not in held], [it for i, it in enumerate(items) if i in held]


def check_objective(config: TrainConfig, task: Task, classes: list[str] | None) -> None:
    """The loss, the miner and the optimizer built once with their options (on a stand-in embedding size), so that a
    misspelt or invalid option is refused now."""
    import torch

    stand_in = SimpleNamespace(embed_dim=config.output_dim or max(config.matryoshka_dims or [8]))
    task.build_loss(stand_in, classes or ['0', '1'], 1)
    build_optimizer(
        config.optimizer,
        [torch.nn.Parameter(torch.zeros(1))],
        config.learning_rate,
        config.optimizer_options,
        'optimizer',
    )
