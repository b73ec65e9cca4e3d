"""A run planned once: ``plan_run`` turns a validated ``TrainConfig`` into everything the run needs (the config with
its task's defaults, the task, the training items as the task trains on them, their classes, the evaluation items),
after every check that needs no model built. ``RunPlan.save`` writes it into the run folder and ``RunPlan.load``
reads it back as it was: the training process loads the plan and decides nothing again (no validation, no second
read of the data, no second choice of task).

Layout of a saved plan, under the run folder::

    plan.json           the resolved config, the task and its arguments, the class names, the item counts
    plan/train.jsonl    the training items (one JSON object a line); plan/query.jsonl, plan/index.jsonl: evaluation
    plan/corpus.jsonl   the documents hard negatives are mined from (when the run mines them)
    plan/files/         the items' images that came as bytes or arrays (blobs as sent, arrays as PNG)
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from executor.tuning.config import DATA_FIELDS, TrainConfig
from executor.tuning.data.judgements import Judgements, is_judgements, read_documents, read_judgements
from executor.tuning.data.sources import Item, check_under_roots, load_items
from executor.tuning.errors import DataError
from executor.tuning.files import atomic_write_json, atomic_write_text
from executor.tuning.inputs import inputs_class
from executor.tuning.inputs.image import array_to_image
from executor.tuning.models.registry import inputs_kind
from executor.tuning.models.weights import read_state_dict
from executor.tuning.optim import build_optimizer
from executor.tuning.tasks import TASKS, Task, decide_task

logger = logging.getLogger(__name__)

PLAN_FILE = 'plan.json'
PLAN_DIR = 'plan'


@dataclass
class RunPlan:
    """What a run trains on and how, decided once. ``config`` has the task's defaults filled in."""

    config: TrainConfig
    task: Task
    items: list[Item]
    class_names: list[str] | None
    evaluation: tuple[list[Item], list[Item] | None] | None  # (queries, index); index None: queries search each other
    corpus: list[Item] | None = None  # what hard negatives are mined from (None: the training pairs' positives)

    def counts(self) -> dict[str, int]:
        """How many items each split holds (the index is absent when the queries search each other)."""
        counts = {'train': len(self.items)}
        if self.evaluation is not None:
            counts['query'] = len(self.evaluation[0])
            if self.evaluation[1] is not None:
                counts['index'] = len(self.evaluation[1])
        if self.corpus is not None:
            counts['corpus'] = len(self.corpus)
        return counts

    def save(self, folder: Path) -> None:
        """Write the plan into the run folder ``folder``, items first and ``plan.json`` last (whole or absent)."""
        items_dir = folder / PLAN_DIR
        splits = {'train': self.items}
        if self.evaluation is not None:
            splits['query'], splits['index'] = self.evaluation
        if self.corpus is not None:
            splits['corpus'] = self.corpus
        for split, items in splits.items():
            if items is not None:
                write_items(items_dir, split, items)
        atomic_write_json(
            folder / PLAN_FILE,
            {
                'config': config_record(self.config),
                'task': {'name': self.task.name, **self.task.spec()},
                'class_names': self.class_names,
                'counts': self.counts(),
            },
        )

    @classmethod
    def load(cls, folder: Path, **changes: Any) -> RunPlan:
        """The plan saved in ``folder``, with ``changes`` to its config (the training process's ``output_dir`` and
        ``callbacks``), built without validating again: it was validated when it was made."""
        record = _read_record(folder)
        config = TrainConfig.from_record({**record['config'], **changes})
        spec = dict(record['task'])
        task = TASKS[spec.pop('name')](config, **spec)
        counts = record['counts']
        items = read_items(folder / PLAN_DIR, 'train')
        evaluation = None
        if 'query' in counts:
            index = read_items(folder / PLAN_DIR, 'index') if 'index' in counts else None
            evaluation = read_items(folder / PLAN_DIR, 'query'), index
        corpus = read_items(folder / PLAN_DIR, 'corpus') if 'corpus' in counts else None
        return cls(task.config, task, items, record['class_names'], evaluation, corpus)

    @staticmethod
    def exists(folder: Path) -> bool:
        return (folder / PLAN_FILE).is_file()

    @staticmethod
    def update(folder: Path, **changes: Any) -> None:
        """Change options of a saved plan's config (``resume`` with other ``epochs``), written back atomically."""
        record = _read_record(folder)
        record['config'].update(changes)
        atomic_write_json(folder / PLAN_FILE, record)

    @staticmethod
    def saved_config(folder: Path) -> TrainConfig:
        """The config of the plan saved in ``folder``, without its items (what the service starts the run with)."""
        return TrainConfig.from_record(_read_record(folder)['config'])


def _read_record(folder: Path) -> dict[str, Any]:
    return json.loads((folder / PLAN_FILE).read_text(encoding='utf-8'))


def plan_run(config: TrainConfig, decode: bool = False) -> RunPlan:
    """The plan of a run: its training items (read once), its task and classes, its evaluation items, after every
    check that needs no model built: enough items, labels as the task needs them, content the model takes (each item
    decoded once with ``decode``), evaluation data readable and labelled, a weights file that loads, a loss, miner
    and optimizer that take their options.

    The service plans a run before it exists, so that bad input is an error of the request, not a FAILED run.
    """
    if config.train_data is None:
        raise DataError(
            'no training data: send labelled documents with the request, or set train_data to a CSV '
            'file or an image folder under the data roots'
        )
    held_out, corpus = None, None
    holds_out = config.val_split > 0 and config.eval_data is None and config.query_data is None
    if is_judgements(config.train_data, config.data_roots):
        judgements = read_judgements(config.train_data, config.split, config.data_roots, config.csv_options)
        if holds_out:
            judgements, held_out = holdout_queries(judgements, config)
        items, corpus = judgements.pairs(), judgements.corpus
    else:
        items = load_items(config.train_data, config.data_roots, config.csv_options)
        if holds_out:
            items, held_out = holdout(items, config)
    if len(items) < 2:
        raise DataError(
            f'the training data has {len(items)} item; training needs at least 2 (one batch), and '
            'metric learning at least 2 per class'
        )
    task = decide_task(config, items)
    if config.hard_negatives is not None:
        task, corpus = mining_task(config, task, items, corpus)
    else:
        corpus = None  # a corpus is kept only to mine from
    items = task.prepare(items)
    inputs = inputs_class('image-text' if config.two_tower else inputs_kind(config.model))
    inputs.check_items(items, 'training items')
    if decode:
        for item in items:
            inputs.check_content(item)
    class_names = task.check_data(items)
    check_objective(task, class_names)
    if config.weights is not None:
        read_state_dict(config.weights)
    evaluation = (held_out, None) if held_out is not None else evaluation_items(config)
    if evaluation is not None:
        task.evaluator(*evaluation, config.limit)  # checks that every evaluation item is labelled
    return RunPlan(task.config, task, items, class_names, evaluation, corpus)


def mining_task(config: TrainConfig, task: Task, items: list[Item], corpus: list[Item] | None) -> tuple[Task, list]:
    """The pair task as it trains on mined rows (query, positive and the negatives), and the corpus to mine from:
    ``hard_negatives.corpus``, else relevance data's corpus, else ``None`` (the pairs' own positives)."""
    if task.name != 'pairs' or task.scored or task.views != 2:
        raise DataError(
            f'hard_negatives are mined for (query, positive) pairs: relevance data (a BEIR folder, judgements) or an '
            f'anchor,positive CSV; {items[0].name} is not such a pair. Leave hard_negatives out for this data'
        )
    options = config.hard_negatives
    if options.corpus is not None:
        corpus = read_corpus(options.corpus, config)
    mined = TASKS['pairs'](config, columns=options.columns, scored=False)
    return mined, corpus


def read_corpus(source: str, config: TrainConfig) -> list[Item]:
    """``hard_negatives.corpus``: a BEIR corpus.jsonl, or a CSV of documents (``_id``/``id``, ``text``[, ``title``])."""
    path = check_under_roots(source, config.data_roots, 'hard_negatives.corpus')
    if not path.is_file():
        raise DataError(f'hard_negatives.corpus {source!r} is not a file; give a corpus.jsonl or a CSV of documents')
    corpus = list(read_documents(path, 'corpus'))
    if not corpus:
        raise DataError(f'hard_negatives.corpus {source!r} holds no documents')
    return corpus


def holdout_queries(judgements: Judgements, config: TrainConfig) -> tuple[Judgements, tuple[list[Item], list[Item]]]:
    """``val_split`` of the judged queries held out, whole (every judgement of a query on one side), the same way
    every time (by ``seed``): the rest trains, the held-out queries search the whole corpus."""
    judged = judgements.judged
    count = round(len(judged) * config.val_split)
    if count < 1 or count >= len(judged):
        raise DataError(
            f'val_split={config.val_split} of the {len(judged)} judged queries holds out {count}; each side needs at '
            'least one query: change val_split, or give eval_data'
        )
    held = set(random.Random(config.seed).sample(range(len(judged)), count))
    kept = [q for i, q in enumerate(judged) if i not in held]
    queries = [q for i, q in enumerate(judged) if i in held]
    return Judgements(kept, judgements.corpus, judgements.source), (queries, judgements.corpus)


def evaluation_items(config: TrainConfig) -> tuple[list[Item], list[Item] | None] | None:
    """The queries and the index given as evaluation data (``None`` without any)."""
    if config.eval_data is None and config.query_data is None:
        return None
    if config.query_data is None and is_judgements(config.eval_data, config.data_roots):
        judgements = read_judgements(config.eval_data, config.eval_split, config.data_roots, config.csv_options)
        return judgements.queries, judgements.corpus
    query_source = config.query_data if config.query_data is not None else config.eval_data
    query = load_items(query_source, config.data_roots, config.csv_options)
    index = None if config.index_data is None else load_items(config.index_data, config.data_roots, config.csv_options)
    return query, index


def holdout(items: list[Item], config: TrainConfig) -> tuple[list[Item], list[Item]]:
    """``items`` split into training and held-out evaluation items by ``val_split``, the same way every time (by
    ``seed``): labelled items class by class, so each class keeps items on both sides (a class held out needs two,
    one to search for the other); unlabelled ones (pairs) row by row."""
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


def check_objective(task: Task, classes: list[str] | None) -> None:
    """The loss, the miner and the optimizer built once with their options (on a stand-in embedding size), so that a
    misspelt or invalid option is refused now."""
    import torch

    config = task.config
    stand_in = SimpleNamespace(embed_dim=config.output_dim or max(config.matryoshka_dims or [8]))
    loss = task.build_loss(stand_in, classes or ['0', '1'], 1)  # its weights' size is checked before they are made
    build_optimizer(
        config.optimizer,
        [torch.nn.Parameter(torch.zeros(1))],
        config.learning_rate,
        config.optimizer_options,
        'optimizer',
    )
    if loss.has_parameters:
        build_optimizer(
            config.loss_optimizer, loss.module.parameters(), None, config.loss_optimizer_options, 'loss_optimizer'
        )


def config_record(config: TrainConfig) -> dict[str, Any]:
    """``config`` as JSON-able values, its data fields as a path or a count of documents (the items are saved apart)."""
    record = config.model_dump(mode='json', exclude=set(DATA_FIELDS))
    for key in DATA_FIELDS:
        record[key] = describe_data(getattr(config, key))
    return record


def describe_data(data: Any) -> Any:
    """A JSON-able description of a data argument (paths as they are, documents as a count)."""
    if data is None or isinstance(data, (str, Path)):
        return None if data is None else str(data)
    return f'<{len(data)} documents>'


# --- items on disk ------------------------------------------------------------------------------------------------

_FIELDS = [f.name for f in fields(Item) if f.name not in ('blob', 'tensor')]


def write_items(folder: Path, split: str, items: Sequence[Item]) -> None:
    """``items`` as ``<folder>/<split>.jsonl``, their bytes and arrays as image files (arrays decoded the way training
    would decode them)."""
    files = folder / 'files'
    lines = []
    for i, item in enumerate(items):
        record = {key: value for key, value in asdict(item).items() if key in _FIELDS and value is not None}
        if item.tensor is not None or item.blob is not None:
            files.mkdir(parents=True, exist_ok=True)
            name = f'{split}-{i:06d}.png' if item.tensor is not None else f'{split}-{i:06d}.bin'
            if item.tensor is not None:
                array_to_image(item.tensor, item.name).save(files / name)
            else:
                (files / name).write_bytes(item.blob)
            record['uri'] = f'files/{name}'
            record['stored'] = True
        lines.append(json.dumps(record))
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f'{split}.jsonl', ''.join(line + '\n' for line in lines))


def read_items(folder: Path, split: str) -> list[Item]:
    """The items ``write_items`` wrote (images that came as bytes or arrays as the files saved beside them)."""
    items = []
    for line in (folder / f'{split}.jsonl').read_text(encoding='utf-8').splitlines():
        record = json.loads(line)
        if record.pop('stored', False):
            record['uri'] = str(folder / record['uri'])
        if record.get('columns') is not None:
            record['columns'] = tuple(record['columns'])
        items.append(Item(**record))
    return items
