"""Finetuner's callbacks (``finetuner.callback``'s names, arguments and defaults) and the options each stands for.

``EvaluationCallback``, ``BestModelCheckpoint`` (``BestModel``), ``EarlyStopping`` and ``WandBLogger`` are the core's
own callbacks (``callbacks``, ``trackers``), which take Finetuner's arguments; ``TrainingCheckpoint`` and
``WiSEFTCallback`` stand for what every run does, or for ``wise_ft_alpha``. Given to ``fit()`` or ``/train``, as
objects (the Python client re-exports them) or as dicts ``{'name': 'EarlyStopping', 'patience': 2}`` (JSON), each is
translated into the run's options (``callback_options``, which ``finetuner_compat`` calls): the evaluation data for
the plan to read, the monitor options; the run then builds the callbacks it runs from those.
"""

from __future__ import annotations

from typing import Any

from executor.tuning.callbacks import BestModelCheckpoint, EarlyStopping, EvaluationCallback, FinetunerCallback
from executor.tuning.errors import did_you_mean
from executor.tuning.trackers import WandBLogger


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


class TrainingCheckpoint(FinetunerCallback):
    """Checkpoints to resume from (here: the last epoch's, always): Finetuner's, taken at its default only."""

    def __init__(self, last_k_epochs: int = 1) -> None:
        self.last_k_epochs = last_k_epochs


class WiSEFTCallback(FinetunerCallback):
    """WiSE-FT (Wortsman et al., 2022): the final weights interpolate the pre-trained and the fine-tuned ones
    (``wise_ft_alpha`` here, which the trainer applies to the final model)."""

    def __init__(self, alpha: float = 0.4) -> None:
        self.alpha = alpha


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
        if core and hasattr(callback, 'on_epoch_end') and not isinstance(callback, FinetunerCallback):
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
    if isinstance(callback, FinetunerCallback):
        raw = callback.to_dict()
    elif isinstance(callback, dict):
        raw = dict(callback)
    else:
        raw = {'name': type(callback).__name__, **dict(getattr(callback, '__dict__', {}))}
    name = raw.pop('name', None)
    if name not in CALLBACKS:
        hint = did_you_mean(name, CALLBACKS)
        raise FinetunerArgumentError(
            f"callbacks[{i}]: unknown callback {name!r}{hint}; Finetuner's callbacks are {', '.join(CALLBACKS)}, "
            "given as objects (from executor.client import EarlyStopping) or as {'name': 'EarlyStopping', ...}"
        )
    if name in CALLBACK_REFUSALS:
        raise FinetunerArgumentError(f'callbacks[{i}] ({name}): {CALLBACK_REFUSALS[name]}')
    allowed = list(CALLBACKS[name].arguments())
    for key in raw:
        if key not in allowed:
            hint = did_you_mean(key, allowed)
            raise FinetunerArgumentError(
                f'callbacks[{i}] ({name}): unknown argument {key!r}{hint}; {name} takes {", ".join(allowed)}'
            )
    try:
        CALLBACKS[name](**raw)
    except TypeError as err:
        raise FinetunerArgumentError(f'callbacks[{i}] ({name}): {err}') from None
    return name, raw


def _evaluation(fields: dict[str, Any], where: str) -> dict[str, Any]:
    if fields.get('query_data') is None:
        raise FinetunerArgumentError(f'{where}: query_data is missing; give the evaluation data (a CSV file or folder)')
    defaults = EvaluationCallback.arguments()
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
