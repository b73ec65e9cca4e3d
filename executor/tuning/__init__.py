"""The tuning core: plain PyTorch (no jina) — models, data, losses, the trainer, evaluation, export, inference."""

from executor.tuning.config import TrainConfig
from executor.tuning.models import build_model, list_models, load_model, save_model
from executor.tuning.trainer import FitResult, Trainer, fit

__all__ = ['FitResult', 'TrainConfig', 'Trainer', 'build_model', 'fit', 'list_models', 'load_model', 'save_model']
