"""Finetuner's callbacks (``finetuner.callback``'s classes, names and defaults) and the options each stands for here.

Callbacks carry no code here: ``EvaluationCallback`` is evaluation data, ``BestModelCheckpoint`` and
``EarlyStopping`` the monitor options, ``WiSEFTCallback`` ``wise_ft_alpha``. They come as these classes (the Python
client re-exports them) or as dicts ``{'name': 'EarlyStopping', 'patience': 2}`` (JSON); ``finetuner_compat`` calls
``callback_options``.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union


class FinetunerArgumentError(ValueError):
    """A Finetuner argument this service cannot give its meaning; the message says what to use instead."""


def merge(new: dict[str, Any], old: dict[str, Any], where: str) -> dict[str, Any]:
    """``new``, after checking that no key of it is already in ``old`` with another value."""
    for key, value in new.items():
        if key in old and old[key] != value:
            raise FinetunerArgumentError(
                f'parameter {key!r} is given twice, as {old[key]!r} and as {value!r} (from {where}); give it once'
            )
    return new


class _FinetunerCallback:
    """A Finetuner callback as data: ``to_dict()`` gives its name and the fields set to other than the default."""

    def to_dict(self) -> dict[str, Any]:
        given = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default or f.default is dataclasses.MISSING
        }
        return {'name': type(self).__name__, **given}


@dataclass
class EvaluationCallback(_FinetunerCallback):
    """Retrieval metrics on ``query_data`` searching ``index_data`` (or itself) each epoch."""

    query_data: str
    index_data: Optional[str] = None
    model: Optional[str] = None
    index_model: Optional[str] = None
    multi_modal: bool = False
    batch_size: int = 32
    exclude_self: bool = True
    limit: int = 20
    distance: str = 'cosine'
    steps_per_interval: Optional[int] = None
    gather_examples: bool = False
    num_example_queries: int = 5
    num_workers: int = 8
    caption: Optional[str] = None
    output_model_names: bool = False
    query_sample_size: Optional[int] = None


@dataclass
class BestModelCheckpoint(_FinetunerCallback):
    """Keep the weights of the best epoch by ``monitor``."""

    monitor: str = 'val_loss'
    mode: str = 'auto'


@dataclass
class TrainingCheckpoint(_FinetunerCallback):
    """Checkpoints to resume from (here: the last epoch's, always)."""

    last_k_epochs: int = 1


@dataclass
class EarlyStopping(_FinetunerCallback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs (or not bettered
    ``baseline``)."""

    monitor: str = 'val_loss'
    mode: str = 'auto'
    patience: int = 2
    min_delta: int = 0
    baseline: Optional[float] = None


@dataclass
class WandBLogger(_FinetunerCallback):
    """Weights & Biases logging: ``loggers=['tensorboard', 'wandb']`` here (offline unless ``WANDB_MODE`` says
    otherwise); W&B's own settings come from its environment variables (``WANDB_PROJECT``, ``WANDB_ENTITY``...)."""

    metrics_logger_step: Literal['batch', 'epoch'] = 'epoch'
    wandb_args: Union[dict[str, Any], None] = None
    log_zero_shot: bool = True


@dataclass
class WiSEFTCallback(_FinetunerCallback):
    """WiSE-FT (Wortsman et al., 2022): the final weights interpolate the pre-trained and the fine-tuned ones."""

    alpha: Union[int, float] = 0.4


CALLBACKS = {
    cls.__name__: cls
    for cls in (EvaluationCallback, BestModelCheckpoint, TrainingCheckpoint, EarlyStopping, WandBLogger, WiSEFTCallback)
}
CALLBACK_REFUSALS: dict[str, str] = {}
# EvaluationCallback fields this service has no counterpart for: each is taken at Finetuner's default only
EVALUATION_DEFAULT_ONLY = {
    'model': 'the run evaluates the model it trains; a text-to-image (CLIP) model is not trained here',
    'index_model': 'the run evaluates the model it trains with one tower',
    'multi_modal': 'multi-modal documents (chunks) are not read here',
    'exclude_self': 'a query never matches itself here',
    'distance': "retrieval is by cosine similarity here (distance='cosine')",
    'steps_per_interval': 'evaluation runs at the end of each epoch',
    'gather_examples': 'example results are not gathered',
    'caption': 'one evaluation set per run, its metrics under their own names',
    'output_model_names': 'metric names carry no model name',
    'query_sample_size': 'every query of the evaluation data is searched; pass fewer queries instead',
}


def callback_options(given: Any, core: bool) -> tuple[list[Any], dict[str, Any]]:
    """This project's ``Callback`` objects (kept, in ``core``: objects with its hooks) and the options Finetuner's
    callbacks stand for."""
    if not isinstance(given, (list, tuple)):
        raise FinetunerArgumentError(f"parameter 'callbacks': must be a list of callbacks, got {given!r}")
    kept, options, evaluations = [], {}, 0
    for i, callback in enumerate(given):
        if core and hasattr(callback, 'on_epoch_end') and not isinstance(callback, _FinetunerCallback):
            kept.append(callback)
            continue
        name, fields = _callback_fields(callback, i)
        where = f'callbacks[{i}] ({name})'
        evaluations += name == 'EvaluationCallback'
        if evaluations > 1:
            raise FinetunerArgumentError(
                f'{where}: one EvaluationCallback per run here (its metrics under their own names); merge the '
                'evaluation sets, or evaluate the others after training with /evaluate'
            )
        options.update(merge(CALLBACK_OPTIONS[name](fields, where), options, where))
    return kept, options


def _callback_fields(callback: Any, i: int) -> tuple[str, dict[str, Any]]:
    if isinstance(callback, _FinetunerCallback):
        raw = callback.to_dict()
    elif isinstance(callback, dict):
        raw = dict(callback)
    else:
        raw = {'name': type(callback).__name__, **dict(getattr(callback, '__dict__', {}))}
    name = raw.pop('name', None)
    if name not in CALLBACKS:
        close = difflib.get_close_matches(str(name), CALLBACKS, n=1)
        hint = f' (did you mean {close[0]!r}?)' if close else ''
        raise FinetunerArgumentError(
            f"callbacks[{i}]: unknown callback {name!r}{hint}; Finetuner's callbacks are {', '.join(CALLBACKS)}, "
            "given as objects (from executor.client import EarlyStopping) or as {'name': 'EarlyStopping', ...}"
        )
    if name in CALLBACK_REFUSALS:
        raise FinetunerArgumentError(f'callbacks[{i}] ({name}): {CALLBACK_REFUSALS[name]}')
    allowed = [f.name for f in dataclasses.fields(CALLBACKS[name])]
    for key in raw:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f' (did you mean {close[0]!r}?)' if close else ''
            raise FinetunerArgumentError(
                f'callbacks[{i}] ({name}): unknown argument {key!r}{hint}; {name} takes {", ".join(allowed)}'
            )
    try:
        CALLBACKS[name](**raw)
    except TypeError as err:
        raise FinetunerArgumentError(f'callbacks[{i}] ({name}): {err}') from None
    return name, raw


def _evaluation(fields: dict[str, Any], where: str) -> dict[str, Any]:
    defaults = {f.name: f.default for f in dataclasses.fields(EvaluationCallback)}
    for key, why in EVALUATION_DEFAULT_ONLY.items():
        if key in fields and fields[key] != defaults[key]:
            raise FinetunerArgumentError(
                f'{where}: {key}={fields[key]!r} is not taken here ({why}); leave {key} at {defaults[key]!r}'
            )
    out: dict[str, Any] = {'limit': fields['limit']} if 'limit' in fields else {}
    # batch_size and num_workers size the embedding work only: the metrics are the same whatever they are
    if fields.get('index_data') is None:
        return {**out, 'eval_data': fields['query_data']}  # Finetuner: the queries search each other
    return {**out, 'query_data': fields['query_data'], 'index_data': fields['index_data']}


def _monitor(fields: dict[str, Any], where: str) -> dict[str, Any]:
    """``monitor`` (Finetuner's default 'val_loss' left out: the run's own metric on its evaluation data)."""
    from executor.tuning.evaluation import metric_mode

    monitor = fields.get('monitor')
    if monitor == 'val_loss':
        raise FinetunerArgumentError(
            f"{where}: monitor='val_loss': runs here compute no validation loss; monitor a retrieval metric of the "
            "evaluation data (leave monitor out for the run's own, e.g. ndcg@10; or precision_at_k, recall_at_k, "
            "hit@10, ...) or 'train_loss'"
        )
    mode = fields.get('mode', 'auto')
    if mode not in ('auto', 'min', 'max'):
        raise FinetunerArgumentError(f"{where}: mode must be 'auto', 'min' or 'max', got {mode!r}")
    if monitor is not None and mode != 'auto' and mode != metric_mode(monitor):
        raise FinetunerArgumentError(
            f'{where}: mode={mode!r}, but {monitor!r} is better when it is {metric_mode(monitor)}imal here; '
            "leave mode='auto'"
        )
    return {'monitor': monitor} if monitor is not None else {}


def _best(fields: dict[str, Any], where: str) -> dict[str, Any]:
    return {**_monitor(fields, where), 'save_best': True}


def _early_stopping(fields: dict[str, Any], where: str) -> dict[str, Any]:
    out = {**_monitor(fields, where), 'early_stopping_patience': fields.get('patience', 2)}
    if fields.get('min_delta'):
        out['early_stopping_min_delta'] = fields['min_delta']
    if fields.get('baseline') is not None:
        out['early_stopping_baseline'] = fields['baseline']
    return out


def _training_checkpoint(fields: dict[str, Any], where: str) -> dict[str, Any]:
    if fields.get('last_k_epochs', 1) != 1:
        raise FinetunerArgumentError(
            f"{where}: last_k_epochs={fields['last_k_epochs']}: a run keeps its last epoch's checkpoint "
            '(checkpoints/last.pt, what resume continues from); drop last_k_epochs'
        )
    return {}


def _wise_ft(fields: dict[str, Any], where: str) -> dict[str, Any]:
    alpha = fields.get('alpha', 0.4)
    if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise FinetunerArgumentError(f'{where}: alpha must be a number from 0 to 1, got {alpha!r}')
    return {'wise_ft_alpha': float(alpha)}


def _wandb(fields: dict[str, Any], where: str) -> dict[str, Any]:
    if fields.get('wandb_args'):
        raise FinetunerArgumentError(
            f"{where}: wandb_args={fields['wandb_args']!r} is not taken here: the run logs where W&B's environment "
            'says (WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE on the server; offline by default); drop wandb_args'
        )
    # both steps are logged here: the batch loss as it goes, the epoch metrics at each epoch's end
    return {'loggers': ['tensorboard', 'wandb']}


CALLBACK_OPTIONS = {
    'EvaluationCallback': _evaluation,
    'WandBLogger': _wandb,
    'BestModelCheckpoint': _best,
    'EarlyStopping': _early_stopping,
    'TrainingCheckpoint': _training_checkpoint,
    'WiSEFTCallback': _wise_ft,
}
