"""torchvision's classification models as ``torchvision/<name>``, cut before their global pool."""

from __future__ import annotations

from typing import Any

import torchvision

from executor.tuning.inputs import ImageInputs
from executor.tuning.models import weights as offline
from executor.tuning.models.families._images import cut_at
from executor.tuning.models.family import Backbone, BackboneFamily, Pooler
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
        if embedding_layer is None:
            embedding_layer = next((n for n in FEATURE_LAYERS if hasattr(net, n)), None)
            if embedding_layer is None:
                raise ValueError(f'cannot find the feature layer of {name!r}: pass embedding_layer=<module name>')
        from torchvision.models.feature_extraction import create_feature_extractor

        return Backbone(cut_at(net, name, embedding_layer, create_feature_extractor), ImageInputs(), pooled=False)
