"""What the image families share: calling a vision network so that it returns features."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from executor.tuning.errors import close_names
from executor.tuning.inputs import Batch, ImageInputs


class FeatureBackbone(nn.Module):
    """Calls a vision network on a batch's ``images`` so that it returns features: pooled ``(B, C)`` or a map
    ``(B, C, H, W)`` to pool.

    ``mode``: ``'call'`` calls the network (a timm model built with ``num_classes=0`` pools by itself);
    ``'features'`` calls its ``forward_features``; ``'extractor'`` calls an fx feature extractor whose output dict has
    the key ``'out'``.
    """

    def __init__(self, module: nn.Module, mode: str) -> None:
        super().__init__()
        self.module = module
        self.mode = mode

    def forward(self, batch: Batch) -> torch.Tensor:
        x = batch[ImageInputs.name]  # (B, 3, H, W)
        if self.mode == 'call':
            return self.module(x)
        if self.mode == 'features':
            return self.module.forward_features(x)
        return self.module(x)['out']


def cut_at(net: nn.Module, name: str, layer: str, create_feature_extractor: Callable) -> FeatureBackbone:
    """The network cut after ``layer`` (``embedding_layer``), through an fx feature extractor."""
    names = [n for n, _ in net.named_modules() if n]
    if layer not in names:
        close = close_names(layer, names, n=5)
        raise ValueError(f'embedding_layer {layer!r} is not a layer of {name!r}; close names: {close}')
    return FeatureBackbone(create_feature_extractor(net, return_nodes={layer: 'out'}), 'extractor')
