"""Embedding models: the registry, offline weights, heads."""
from executor.tuning.models.embedding import EmbeddingModel
from executor.tuning.models.heads import GeM, ProjectionHead
from executor.tuning.models.registry import (
    DEFAULT_MODEL,
    build_model,
    backbone_stages,
    freeze_layers,
    list_models,
    load_model,
    save_model,
)
from executor.tuning.models.weights import WeightsNotFoundError

__all__ = [
    'DEFAULT_MODEL', 'EmbeddingModel', 'GeM', 'ProjectionHead', 'WeightsNotFoundError', 'backbone_stages',
    'build_model', 'freeze_layers', 'list_models', 'load_model', 'save_model',
]
