"""The embedding model: a backbone cut before its classifier, a pooler, an optional projection and classifier head.

It takes a ``Batch`` (``dict[str, Tensor]``, as its ``inputs`` collate one) and knows nothing of the modality.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from executor.tuning.inputs import Batch, Inputs
from executor.tuning.models.heads import POOLERS

if TYPE_CHECKING:
    from executor.tuning.models.family import Backbone

logger = logging.getLogger(__name__)

ARTIFACT_FORMAT = 'finetuner-executor/model-v2'
ARTIFACT_FORMAT_V1 = 'finetuner-executor/model-v1'  # an image model's preprocessing kept as `data_config`


class EmbeddingModel(nn.Module):
    """``forward(batch) -> (B, embed_dim)``; ``inputs`` says how to make the batch (and travels with the model)."""

    def __init__(
        self,
        backbone: Backbone,
        feature_dim: int,
        pooler: str,
        projection: nn.Module | None,
        config: dict[str, Any],
    ) -> None:
        super().__init__()
        self.backbone = backbone.module
        self.inputs: Inputs = backbone.inputs
        self.pooler = POOLERS[pooler]() if not backbone.pooled else None
        self.normalize = backbone.normalize  # L2-normalised embeddings (text encoders, as sentence-transformers')
        self.projection = projection
        self.classifier: nn.Linear | None = None
        self.class_names: list[str] | None = None
        self.feature_dim = feature_dim
        self.embed_dim = projection.output_dim if projection is not None else feature_dim
        self.config = dict(config)
        self.frozen_modules: list[str] = []
        self.freeze_batchnorm = False

    def _batch(self, batch: Batch | torch.Tensor) -> Batch:
        """A model with one input also takes that input's tensor alone (``model(images)``)."""
        if isinstance(batch, torch.Tensor) and len(self.inputs.onnx_inputs) == 1:
            return {self.inputs.onnx_inputs[0]: batch}
        return batch

    def features(self, batch: Batch | torch.Tensor) -> torch.Tensor:  # -> (B, feature_dim)
        out = self.backbone(self._batch(batch))
        if out.ndim == 4:
            if self.pooler is None:
                raise RuntimeError('backbone returned a feature map but the model has no pooler')
            return self.pooler(out)
        if out.ndim == 3:  # (B, tokens, C) from a transformer cut mid-way: average the tokens
            return out.mean(dim=1)
        return out

    def forward(self, batch: Batch | torch.Tensor) -> torch.Tensor:  # -> (B, embed_dim)
        out = self.features(batch)
        out = self.projection(out) if self.projection is not None else out
        return nn.functional.normalize(out, dim=-1) if self.normalize else out

    def set_classes(self, class_names: list[str]) -> None:
        """Add (or replace) a linear classifier head over the embedding, one output per class name."""
        if len(class_names) < 2:
            raise ValueError(f'a classifier needs at least 2 classes, got {class_names}')
        self.class_names = [str(c) for c in class_names]
        self.classifier = nn.Linear(self.embed_dim, len(class_names))
        self.config['class_names'] = self.class_names

    def classify(self, batch: Batch | torch.Tensor) -> torch.Tensor:  # -> (B, num_classes) logits
        if self.classifier is None:
            raise ValueError('this model has no classifier head: train it with loss="CrossEntropyLoss" first')
        return self.classifier(self(batch))

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
            'inputs': self.inputs.config(),
            'class_names': self.class_names,
            'state_dict': {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }
