"""The tuning core: plain PyTorch (no jina) — models, data, losses, the trainer, evaluation, export, inference."""

import os

# Before any Hugging Face library is imported (timm imports huggingface_hub, which reads these once): nothing here
# may reach the network; models come from local files and caches only.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

from executor.tuning.config import TrainConfig
from executor.tuning.models import build_model, describe_models, list_models, load_model, save_model
from executor.tuning.trainer import FitResult, Trainer, fit

__all__ = [
    'FitResult',
    'TrainConfig',
    'Trainer',
    'build_model',
    'describe_models',
    'fit',
    'list_models',
    'load_model',
    'save_model',
]
