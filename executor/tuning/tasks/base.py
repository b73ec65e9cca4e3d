"""A training objective as a class: its defaults, data checks, heads, sampler, loss computation, monitor, evaluator.

The trainer asks its ``Task`` for each of these and holds no ``if task == ...`` of its own. The tasks are
``MetricLearning``, ``Classification`` (and ``LinearProbe``) and ``SelfSupervised``; ``decide_task`` picks one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from executor.tuning.config import TrainConfig
from executor.tuning.data.sources import Item
from executor.tuning.errors import DataError
from executor.tuning.evaluation import Evaluator, evaluator_for
from executor.tuning.inputs import Batch, Inputs
from executor.tuning.inputs.base import Transform
from executor.tuning.losses import LossSpec
from executor.tuning.models import build_model


class Task(ABC):
    """One training objective. ``config`` is the run's configuration with this task's defaults filled in."""

    name: ClassVar[str]
    #: learning_rate, epochs and batch_size when the caller leaves them out (README, "Defaults")
    defaults: ClassVar[dict[str, Any]]
    #: what best-model and early stopping watch when there is evaluation data
    monitor: ClassVar[str] = 'ndcg@10'
    #: samples per item in a batch (two augmented views for self-supervised learning)
    views: ClassVar[int] = 1
    #: whether the model gets a classifier head over the training classes
    classifier: ClassVar[bool] = False

    def __init__(self, config: TrainConfig) -> None:
        defaults = dict(self.defaults)
        per_device = config.num_devices
        defaults['batch_size'] = -(-defaults['batch_size'] // per_device) * per_device  # divides evenly
        self.config = config.model_copy(update={k: v for k, v in defaults.items() if getattr(config, k) is None})
        self.loss: LossSpec | None = None
        self.heads: dict[str, nn.Module] = {}  # new modules trained beside the model, saved in the checkpoint

    def __repr__(self) -> str:
        return f'{type(self).__name__}(loss={self.config.loss!r})'

    def spec(self) -> dict[str, Any]:
        """The task's arguments besides the config, as JSON values: what a saved plan rebuilds it from
        (``TASKS[name](config, **spec)``), including what ``check_data`` learnt of the data."""
        return {}

    # --- data -------------------------------------------------------------------------------------------------------

    def prepare(self, items: Sequence[Item]) -> list[Item]:
        """The training items as the task trains on them (as they are, unless a task says otherwise)."""
        return list(items)

    def check_data(self, items: Sequence[Item]) -> list[str] | None:
        """The sorted class names of the training items, after checking what the task needs of their labels."""
        missing = [it.name for it in items if it.label is None]
        if missing:
            raise DataError(
                f'{len(missing)} training items have no label ({missing[:3]}...), but the loss is '
                'supervised; label every item or use loss="NTXentLoss" on unlabelled data'
            )
        classes = sorted({it.label for it in items})
        if len(classes) < 2:
            raise DataError(f'training data has {len(classes)} class ({classes}); supervised training needs at least 2')
        return classes

    def train_transform(self, inputs: Inputs) -> Transform:
        return inputs.train_transform(self.config.augmentation)

    def sampler_mode(self) -> Literal['class', 'random']:
        return 'random'

    def batch_multiple(self) -> int:
        """What a batch (per process) must be a multiple of, for the automatic batch size."""
        return 1

    # --- model --------------------------------------------------------------------------------------------------

    def build_model(self, class_names: list[str] | None) -> nn.Module:
        """The run's model, pre-trained as configured (with a classifier over ``class_names`` when the task has one)."""
        config = self.config
        return build_model(
            config.model,
            weights=config.weights,
            pretrained=config.pretrained,
            freeze=config.freeze,
            embedding_layer=config.embedding_layer,
            output_dim=config.output_dim,
            pooler=config.pooler,
            class_names=class_names if self.classifier else None,
        )

    # --- objective --------------------------------------------------------------------------------------------------

    def build(self, model: nn.Module, class_names: list[str] | None, world: int) -> None:
        """Create the task's heads, then its loss (in that order: both draw from the seeded generator)."""
        self.heads = self.build_heads(model)
        self.loss = self.build_loss(model, class_names, world)

    def build_heads(self, model: nn.Module) -> dict[str, nn.Module]:
        return {}

    @abstractmethod
    def build_loss(self, model: nn.Module, class_names: list[str] | None, world: int) -> LossSpec: ...

    @abstractmethod
    def compute_loss(self, net: nn.Module, model: nn.Module, batch: Batch, labels: torch.Tensor) -> torch.Tensor:
        """The batch's loss; ``net`` is what runs the forward pass (the model, or its DDP wrapper)."""

    @property
    def loss_scale(self) -> int:
        """What the logged loss is divided by (a loss gathered over ranks is scaled by the world size)."""
        return 1

    def modules(self) -> list[nn.Module]:
        """The loss and the heads: what moves to the device and whose gradients are cleared with the model's."""
        return [self.loss.module, *self.heads.values()]

    # --- evaluation -------------------------------------------------------------------------------------------------

    def evaluator(self, query: Sequence[Item], index: Sequence[Item] | None, limit: int) -> Evaluator:
        """Retrieval metrics on labelled items, correlations on scored pairs, retrieval of each anchor's positive on
        pairs (at every Matryoshka dimension too, when the run has them)."""
        return evaluator_for(query, index, limit, self.config.matryoshka_dims, accuracy=False)
