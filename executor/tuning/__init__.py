"""The tuning core: plain PyTorch (no jina) — models, data, losses, the trainer, evaluation, export, inference."""
from executor.tuning.models import build_model, list_models, load_model, save_model

__all__ = ['build_model', 'list_models', 'load_model', 'save_model']
