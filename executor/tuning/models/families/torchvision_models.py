"""torchvision's classification models as ``torchvision/<name>``, cut before their global pool."""

from __future__ import annotations

from typing import Any

import torch
import torchvision

from executor.tuning.inputs import ImageInputs
from executor.tuning.inputs.image import IMAGENET_CONFIG
from executor.tuning.models import weights as offline
from executor.tuning.models.families._images import cut_at
from executor.tuning.models.family import Backbone, BackboneFamily, Pooler, width
from executor.tuning.models.registry import register_family

PREFIX = 'torchvision/'
FEATURE_LAYERS = ('features', 'layer4', 'encoder')  # where torchvision's families end before their pool


@register_family
class TorchvisionFamily(BackboneFamily):
    family = 'torchvision'
    order = 20
    hint = "'torchvision/<name>'"

    def names(self) -> list[str]:
        return sorted(PREFIX + n for n in torchvision.models.list_models(module=torchvision.models))

    def weights_local(self, name: str) -> bool:
        try:
            url = torchvision.models.get_model_weights(name.removeprefix(PREFIX)).DEFAULT.url
        except (ValueError, AttributeError):  # a model without published weights
            return False
        return offline.cached_torchvision_file(url) is not None

    def default_options(self, name: str) -> dict[str, Any]:
        return {'pooler': 'avg', 'image_size': IMAGENET_CONFIG['input_size'][-1]}

    @torch.no_grad()
    def output_dim(self, name: str) -> int:
        from torchvision.models.feature_extraction import create_feature_extractor

        with torch.device('meta'):  # shapes only: no memory taken, no weights initialised
            net = torchvision.models.get_model(name.removeprefix(PREFIX), weights=None).eval()
            cut = cut_at(net, name, _feature_layer(net, name), create_feature_extractor)
            return width(cut({ImageInputs.name: torch.zeros(1, *IMAGENET_CONFIG['input_size'])}))

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
        arch = name.removeprefix(PREFIX)
        net = torchvision.models.get_model(arch, weights=None)
        default_url = torchvision.models.get_model_weights(arch).DEFAULT.url if pretrained and not weights else None
        offline.load_weights(net, name, weights, pretrained, lambda: offline.cached_torchvision_file(default_url))
        embedding_layer = embedding_layer or _feature_layer(net, name)
        from torchvision.models.feature_extraction import create_feature_extractor

        return Backbone(cut_at(net, name, embedding_layer, create_feature_extractor), ImageInputs(), pooled=False)


def _feature_layer(net: torch.nn.Module, name: str) -> str:
    """Where torchvision's network ``name`` ends before its global pool."""
    layer = next((n for n in FEATURE_LAYERS if hasattr(net, n)), None)
    if layer is None:
        raise ValueError(f'cannot find the feature layer of {name!r}: pass embedding_layer=<module name>')
    return layer
