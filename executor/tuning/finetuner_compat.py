"""Finetuner 0.6-0.8's ``fit()`` arguments, translated into this project's options (or refused, saying what to use).

``translate`` runs before the training options are validated (``TrainConfig`` and ``/train``'s parameters), so a
Finetuner call works unchanged: ``model_options`` become the top-level model options, Finetuner's callbacks (as the
classes below, or as dicts ``{'name': 'EarlyStopping', 'patience': 2}``) become options, ``model_artifact`` the
model to start from, ``scheduler_step`` a scheduler option, and Finetuner's model names local models where their
weights are on this machine. An argument whose meaning this service cannot give is an error that names it, why, and
what to use instead; anything else unknown stays the validation error it was.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

# Finetuner's options given as None mean "the default": the fields here are not Optional, so None is dropped.
NONE_IS_DEFAULT = (
    'model_options',
    'miner_options',
    'optimizer_options',
    'scheduler_options',
    'loss_optimizer',
    'loss_optimizer_options',
    'callbacks',
    'model_artifact',
    'csv_options',
)
MODEL_OPTIONS = ('freeze', 'output_dim', 'embedding_layer', 'pooler', 'pretrained', 'weights', 'image_size')
MODEL_OPTIONS += ('max_seq_length',)
EVALUATION_KEYS = ('eval_data', 'query_data', 'index_data')
USE_LITE0 = "use model='efficientnet_lite0', whose ImageNet weights ship with the service"
USE_MINILM = "use model='all-MiniLM-L6-v2' (offline: a smaller sentence encoder, not the same model)"


class FinetunerArgumentError(ValueError):
    """A Finetuner argument this service cannot give its meaning; the message says what to use instead."""


# --- Finetuner's callbacks: the same names, fields and defaults as finetuner.callback's ----------------------------


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
    """Weights & Biases logging (refused here: see ``CALLBACK_REFUSALS``)."""

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
CALLBACK_REFUSALS = {
    'WandBLogger': 'this service logs each run to TensorBoard (tensorboard=True: scalars under tensorboard/ in the '
    'run folder; `tensorboard --logdir <workspace>`); drop WandBLogger from callbacks',
}
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


# --- Finetuner's model names ------------------------------------------------------------------------------------

# display name or descriptor -> (this project's name, what it is); image models were torchvision's
IMAGE_MODELS = {
    'resnet-base': ('torchvision/resnet50', "torchvision's ResNet50"),
    'resnet-large': ('torchvision/resnet152', "torchvision's ResNet152"),
    'efficientnet-base': ('torchvision/efficientnet_b4', "torchvision's EfficientNet-B4"),
    'efficientnet-large': ('torchvision/efficientnet_b7', "torchvision's EfficientNet-B7"),
}
TEXT_MODELS = {
    'bert-base-en': 'bert-base-cased',
    'sbert-base-en': 'sentence-transformers/msmarco-distilbert-base-v3',
    'bert-base-multi': 'bert-base-multilingual-cased',
    'distiluse-base-multi': 'sentence-transformers/distiluse-base-multilingual-cased-v1',
    'jina-embedding-t-en-v1': 'jinaai/jina-embedding-t-en-v1',
}
CLIP = (
    'is a CLIP model (two towers, text-to-image), whose weights are not on this machine and which this service does '
    'not load; train a two-tower model from the local towers instead (model=<an image model such as '
    "'efficientnet_lite0'>, text_model='all-MiniLM-L6-v2', loss='CLIPLoss'), or an image or a text model alone: "
    f'{USE_LITE0}, or {USE_MINILM}'
)
REFUSED_MODELS = {
    **dict.fromkeys(['clip-base-en', 'clip-large-en', 'clip-base-multi', 'openai/clip-vit-base-patch32'], CLIP),
    **dict.fromkeys(['openai/clip-vit-large-patch14', 'xlm-roberta-base-ViT-B-32::laion5b_s13b_b90k'], CLIP),
    **dict.fromkeys(
        ['jina-embedding-s-en-v1', 'jina-embedding-b-en-v1', 'jina-embedding-l-en-v1'],
        f'is a T5 encoder, which the text models here (BERT-like encoders) do not include; {USE_MINILM}',
    ),
    **dict.fromkeys(
        ['pointnet-base', 'pointnet++'],
        'is a 3D mesh (point cloud) model; this service fine-tunes image models (timm, torchvision) and text '
        f'models (transformers): {USE_LITE0}, or {USE_MINILM}',
    ),
    'mlp': 'is an MLP trained from scratch on pre-computed features; this service fine-tunes image and text '
    f'models: {USE_LITE0}, or {USE_MINILM}',
    **dict.fromkeys(
        ['crossencoder-base-en', 'crossencoder-base-ml', 'cross-encoder/ms-marco-MiniLM-L-6-v2'],
        f'is a cross-encoder (it scores pairs, it does not embed); {USE_MINILM}',
    ),
}


def local_model(name: str, weights: Any, pretrained: Any) -> str:
    """This project's name for Finetuner's model ``name`` (``name`` itself when it is not one of Finetuner's)."""
    if name in REFUSED_MODELS:
        raise FinetunerArgumentError(f"parameter 'model': Finetuner's {name!r} {REFUSED_MODELS[name]}")
    if name in IMAGE_MODELS:
        local, what = IMAGE_MODELS[name]
        if weights or pretrained is False or _torchvision_weights_cached(local):
            return local
        raise FinetunerArgumentError(
            f"parameter 'model': Finetuner's {name!r} is {what} with ImageNet weights, here model={local!r}, but "
            "those weights are not on this machine (this service never downloads): pass weights='/path/to/the/"
            f"torchvision checkpoint.pth' (or put it in torch hub's cache), or {USE_LITE0}"
        )
    if name in TEXT_MODELS:
        local = TEXT_MODELS[name]
        from executor.tuning.models.families.transformers_models import cached_models

        if local in cached_models():
            return local
        raise FinetunerArgumentError(
            f"parameter 'model': Finetuner's {name!r} is Hugging Face's {local!r}, which is not in this machine's "
            f"Hugging Face cache (this service never downloads): pass model='/path/to/{local.split('/')[-1]}' (a "
            f'transformers folder on the server), or {USE_MINILM}'
        )
    return name


def _torchvision_weights_cached(local: str) -> bool:
    import torchvision

    from executor.tuning.models.weights import cached_torchvision_file

    arch = local.removeprefix('torchvision/')
    return cached_torchvision_file(torchvision.models.get_model_weights(arch).DEFAULT.url) is not None


# --- the translation --------------------------------------------------------------------------------------------


def translate(data: dict[str, Any], core: bool) -> dict[str, Any]:
    """``data`` (``fit()``'s keyword arguments, or ``/train``'s parameters) with Finetuner's arguments translated.

    ``core``: the arguments of ``TrainConfig`` (this project's own ``Callback`` objects stay in ``callbacks``,
    ``run_name`` names the output folder); else ``/train``'s parameters, where ``callbacks`` must be Finetuner's.
    """
    data = {k: v for k, v in data.items() if not (k in NONE_IS_DEFAULT and v is None)}
    options: dict[str, Any] = {}
    if 'model_artifact' in data:
        data['model'] = data.pop('model_artifact')  # as Finetuner: the artifact is the model, its name unused
    if 'model_options' in data:
        options.update(_model_options(data.pop('model_options')))
    if isinstance(data.get('model'), str):  # first: a model that cannot train here is the first thing to say
        weights = data.get('weights', options.get('weights'))
        data['model'] = local_model(data['model'], weights, data.get('pretrained', options.get('pretrained')))
    if 'scheduler_step' in data:
        step = data.pop('scheduler_step')
        data['scheduler_options'] = {**_as_dict(data.get('scheduler_options')), 'scheduler_step': step}
    if 'cpu' in data:
        options['device'] = 'cpu' if data.pop('cpu') else 'cuda'
    if 'public' in data and _public(data.pop('public')):
        raise FinetunerArgumentError(
            "parameter 'public': there is no shared cloud here to publish an artifact in; the run's artifact stays "
            'on this server (serve it with artifact=<run id>, or copy its folder or zip); drop public=True'
        )
    if 'callbacks' in data:
        kept, from_callbacks = _callbacks(data.pop('callbacks'), core)
        if kept:
            data['callbacks'] = kept
        options.update(_merge(from_callbacks, options, 'callbacks'))
    given_evaluation = [key for key in EVALUATION_KEYS if key in data]
    if given_evaluation and any(key in options for key in EVALUATION_KEYS):
        raise FinetunerArgumentError(
            f'evaluation data is given twice: as {given_evaluation[0]} and in an EvaluationCallback; give it once'
        )
    data.update(_merge(options, data, 'model_options or callbacks'))
    if 'optimizer_options' in data and 'layer_wise_lr_decay' in _as_dict(data['optimizer_options']):
        raise FinetunerArgumentError(
            "parameter 'optimizer_options': layer_wise_lr_decay (Finetuner's decaying rate per transformer layer) is "
            'not taken here; drop it, and keep the lower layers fixed with freeze=<number of leading layers> instead'
        )
    if core and 'run_name' in data:
        name = data.pop('run_name')
        data.setdefault('output_dir', f'runs/{name}')
    return data


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if hasattr(value, 'model_dump'):
        return value.model_dump(exclude_unset=True)
    if dataclasses.is_dataclass(value):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return dict(value)
    return value


def _public(value: Any) -> bool:
    if not isinstance(value, bool):
        raise FinetunerArgumentError(f"parameter 'public': must be true or false, got {value!r}")
    return value


def _merge(new: dict[str, Any], old: dict[str, Any], where: str) -> dict[str, Any]:
    """``new``, after checking that no key of it is already in ``old`` with another value."""
    for key, value in new.items():
        if key in old and old[key] != value:
            raise FinetunerArgumentError(
                f'parameter {key!r} is given twice, as {old[key]!r} and as {value!r} (from {where}); give it once'
            )
    return new


def _model_options(given: Any) -> dict[str, Any]:
    given = _as_dict(given)
    if not isinstance(given, dict):
        raise FinetunerArgumentError(f"parameter 'model_options': must be an object of model options, got {given!r}")
    out = {}
    for key, value in given.items():
        if key == 'pooler' and isinstance(value, str):
            out['pooler'] = value.lower()  # Finetuner's 'GeM'
        elif key == 'pooler_options':
            if value:
                raise FinetunerArgumentError(
                    "parameter 'model_options.pooler_options': the GeM pooler here learns its p, starting from 3 "
                    f'(eps 1e-6), and takes no options; drop pooler_options (got {value!r})'
                )
        elif key in ('preprocess_options', 'collate_options'):
            raise FinetunerArgumentError(
                f"parameter 'model_options.{key}': the model's preprocessing travels with it here; set image_size "
                '(pixels) for an image model or max_seq_length (tokens) for a text model'
            )
        elif key in MODEL_OPTIONS:
            out[key] = value
        else:
            close = difflib.get_close_matches(key, MODEL_OPTIONS, n=1)
            hint = f' (did you mean {close[0]!r}?)' if close else ''
            raise FinetunerArgumentError(
                f"unknown model option 'model_options.{key}'{hint}; model_options takes {', '.join(MODEL_OPTIONS)} "
                '(also accepted at the top level)'
            )
    return out


def _callbacks(given: Any, core: bool) -> tuple[list[Any], dict[str, Any]]:
    """This project's ``Callback`` objects (kept, in ``core``) and the options Finetuner's callbacks stand for."""
    from executor.tuning.callbacks import Callback

    if not isinstance(given, (list, tuple)):
        raise FinetunerArgumentError(f"parameter 'callbacks': must be a list of callbacks, got {given!r}")
    kept, options, evaluations = [], {}, 0
    for i, callback in enumerate(given):
        if core and isinstance(callback, Callback):
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
        options.update(_merge(CALLBACK_OPTIONS[name](fields, where), options, where))
    return kept, options


def _callback_fields(callback: Any, i: int) -> tuple[str, dict[str, Any]]:
    if isinstance(callback, _FinetunerCallback):
        raw = callback.to_dict()
    elif isinstance(callback, dict):
        raw = dict(callback)
    else:
        raw = {'name': type(callback).__name__, **_as_dict(vars(callback) if hasattr(callback, '__dict__') else {})}
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


CALLBACK_OPTIONS = {
    'EvaluationCallback': _evaluation,
    'BestModelCheckpoint': _best,
    'EarlyStopping': _early_stopping,
    'TrainingCheckpoint': _training_checkpoint,
    'WiSEFTCallback': _wise_ft,
}
