"""Embedding models: the registry over backbone families (one file each in ``families/``), offline weights, heads."""

from executor.tuning.models.embedding import EmbeddingModel
from executor.tuning.models.family import Backbone, BackboneFamily
from executor.tuning.models.freezing import backbone_stages, freeze_layers
from executor.tuning.models.heads import GeM, ProjectionHead
from executor.tuning.models.registry import (
    DEFAULT_MODEL,
    ModelDescription,
    build_model,
    build_two_tower,
    describe_models,
    family_of,
    is_model_file,
    list_models,
    load_model,
    register_family,
    save_model,
    unknown_model,
)
from executor.tuning.models.two_tower import TOWERS, TwoTowerModel
from executor.tuning.models.weights import WeightsNotFoundError

__all__ = [
    'DEFAULT_MODEL',
    'Backbone',
    'BackboneFamily',
    'EmbeddingModel',
    'ModelDescription',
    'GeM',
    'TOWERS',
    'ProjectionHead',
    'TwoTowerModel',
    'WeightsNotFoundError',
    'backbone_stages',
    'build_model',
    'build_two_tower',
    'describe_models',
    'family_of',
    'freeze_layers',
    'is_model_file',
    'list_models',
    'load_model',
    'register_family',
    'save_model',
    'unknown_model',
]
