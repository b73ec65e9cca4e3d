"""Finetuner 0.6-0.8's ``fit()`` arguments, translated into this project's options (or refused, saying what to use).

``translate`` runs at the edges, before the training options are validated: ``fit()`` and ``finetuner_config`` (the
Python API) and ``/train``'s parameters (the service); ``TrainConfig`` itself knows only this project's names. So a
Finetuner call works unchanged: ``model_options`` become the top-level model options, Finetuner's callbacks (as the
classes below, or as dicts ``{'name': 'EarlyStopping', 'patience': 2}``) become options, ``model_artifact`` the
model to start from, ``scheduler_step`` a scheduler option, and Finetuner's model names local models where their
weights are on this machine. An argument whose meaning this service cannot give is an error that names it, why, and
what to use instead; anything else unknown stays the validation error it was.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from executor.tuning.config import TrainConfig

from executor.tuning.errors import did_you_mean
from executor.tuning.finetuner_callbacks import FinetunerArgumentError, callback_options, merge

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
    'is a CLIP model (two towers, text-to-image), whose weights are not on this machine; with an open_clip checkpoint '
    "of it, name its open_clip model and give the file (model='open_clip/ViT-B-32', weights='/path/to/"
    "open_clip_pytorch_model.bin'), or train a two-tower model from the local towers (model=<an image model such as "
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


def finetuner_config(**arguments: Any) -> TrainConfig:
    """The ``TrainConfig`` of Finetuner's ``fit()`` keyword arguments (this project's own names pass as they are):
    the Python API's edge, as ``/train``'s parameters are the service's."""
    from executor.tuning.config import TrainConfig

    return TrainConfig(**translate(arguments, core=True))


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
        kept, from_callbacks = callback_options(data.pop('callbacks'), core)
        if kept:
            data['callbacks'] = kept
        options.update(merge(from_callbacks, options, 'callbacks'))
    given_evaluation = [key for key in EVALUATION_KEYS if key in data]
    if given_evaluation and any(key in options for key in EVALUATION_KEYS):
        raise FinetunerArgumentError(
            f'evaluation data is given twice: as {given_evaluation[0]} and in an EvaluationCallback; give it once'
        )
    data.update(merge(options, data, 'model_options or callbacks'))
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
            hint = did_you_mean(key, MODEL_OPTIONS)
            raise FinetunerArgumentError(
                f"unknown model option 'model_options.{key}'{hint}; model_options takes {', '.join(MODEL_OPTIONS)} "
                '(also accepted at the top level)'
            )
    return out
