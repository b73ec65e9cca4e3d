"""The embedding model: a backbone cut before its classifier, a pooler, an optional projection and classifier head."""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from executor.tuning.models.heads import POOLERS

logger = logging.getLogger(__name__)

ARTIFACT_FORMAT = 'finetuner-executor/model-v1'


class FeatureBackbone(nn.Module):
    """Calls a backbone so that it returns features: pooled ``(B, C)`` or a map ``(B, C, H, W)`` to pool.

    ``mode``: ``'pooled'`` calls a timm model built with ``num_classes=0``; ``'features'`` calls its
    ``forward_features``; ``'extractor'`` calls an fx feature extractor whose output dict has the key ``'out'``.
    """

    def __init__(self, module: nn.Module, mode: str) -> None:
        super().__init__()
        self.module = module
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == 'pooled':
            return self.module(x)
        if self.mode == 'features':
            return self.module.forward_features(x)
        return self.module(x)['out']


class EmbeddingModel(nn.Module):
    """``forward(x: (B, 3, H, W)) -> (B, embed_dim)``, with the preprocessing it expects in ``data_config``."""

    def __init__(
        self,
        backbone: FeatureBackbone,
        feature_dim: int,
        pooler: str,
        projection: nn.Module | None,
        config: dict[str, Any],
        data_config: dict[str, Any],
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooler = POOLERS[pooler]() if backbone.mode != 'pooled' else None
        self.projection = projection
        self.classifier: nn.Linear | None = None
        self.class_names: list[str] | None = None
        self.feature_dim = feature_dim
        self.embed_dim = projection.output_dim if projection is not None else feature_dim
        self.config = dict(config)
        self.data_config = dict(data_config)
        self.frozen_modules: list[str] = []
        self.freeze_batchnorm = False

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, feature_dim)
        out = self.backbone(x)
        if out.ndim == 4:
            if self.pooler is None:
                raise RuntimeError('backbone returned a feature map but the model has no pooler')
            return self.pooler(out)
        if out.ndim == 3:  # (B, tokens, C) from a transformer cut mid-way: average the tokens
            return out.mean(dim=1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, embed_dim)
        out = self.features(x)
        return self.projection(out) if self.projection is not None else out

    def set_classes(self, class_names: list[str]) -> None:
        """Add (or replace) a linear classifier head over the embedding, one output per class name."""
        if len(class_names) < 2:
            raise ValueError(f'a classifier needs at least 2 classes, got {class_names}')
        self.class_names = [str(c) for c in class_names]
        self.classifier = nn.Linear(self.embed_dim, len(class_names))
        self.config['class_names'] = self.class_names

    def classify(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, num_classes) logits
        if self.classifier is None:
            raise ValueError('this model has no classifier head: train it with loss="CrossEntropyLoss" first')
        return self.classifier(self(x))

    def train(self, mode: bool = True) -> EmbeddingModel:
        """BatchNorm layers of frozen modules (all of them with ``freeze_batchnorm``) stay in eval mode, so their
        running statistics do not move either."""
        super().train(mode)
        if mode and (self.frozen_modules or self.freeze_batchnorm):
            modules = dict(self.backbone.module.named_modules())
            names = modules if self.freeze_batchnorm else self.frozen_modules
            for name in names:
                module = modules.get(name)
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def artifact(self) -> dict[str, Any]:
        """Everything needed to rebuild the model offline; loadable with ``torch.load(weights_only=True)``."""
        return {
            'format': ARTIFACT_FORMAT,
            'config': self.config,
            'data_config': self.data_config,
            'class_names': self.class_names,
            'state_dict': {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }
