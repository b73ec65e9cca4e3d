"""A two-tower (text-to-image) model: an image ``EmbeddingModel`` and a text one, each projected into one shared
space and L2-normalised, with CLIP's learnable temperature. Either tower serves alone (``tower('clip-text')``)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from executor.tuning.inputs import Batch, TwoTowerInputs
from executor.tuning.inputs.two_tower import IMAGE, ORDER, TEXT, tower_batch
from executor.tuning.models.embedding import ARTIFACT_FORMAT, EmbeddingModel

# the Hub executor's names of CLIP's towers (``select_model``), and the tower each is
TOWERS = {'clip-vision': IMAGE, 'clip-text': TEXT}
DEFAULT_OUTPUT_DIM = 256
INITIAL_TEMPERATURE = 0.07  # CLIP's: logit scale log(1 / 0.07)
MAX_LOGIT_SCALE = 100.0  # CLIP clamps the learnt scale here, so the softmax cannot collapse


class TwoTowerModel(nn.Module):
    """``forward(batch) -> (N, D)``: the batch's images embedded by the image tower, then its texts by the text tower
    (in the items' own order when the batch holds ``order``); see ``inputs.two_tower``."""

    normalize = True
    classifier = None
    class_names = None

    def __init__(self, image: EmbeddingModel, text: EmbeddingModel, config: dict[str, Any]) -> None:
        super().__init__()
        if image.embed_dim != text.embed_dim:
            raise ValueError(
                f'the towers embed into {image.embed_dim} and {text.embed_dim} dimensions; give both one output_dim'
            )
        image.normalize = text.normalize = True  # both towers' embeddings meet on the unit sphere
        self.image, self.text = image, text
        self.embed_dim = image.embed_dim
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / INITIAL_TEMPERATURE)))
        self.config = dict(config)

    @property
    def inputs(self) -> TwoTowerInputs:
        return TwoTowerInputs(self.image.inputs, self.text.inputs)

    @inputs.setter
    def inputs(self, inputs: TwoTowerInputs) -> None:  # a run's options (image_size, max_seq_length) reach the towers
        self.image.inputs, self.text.inputs = inputs.image, inputs.text

    @property
    def backbone(self) -> nn.ModuleDict:
        """Both towers' backbones (what WiSE-FT interpolates), without their projections."""
        return nn.ModuleDict({IMAGE: self.image.backbone, TEXT: self.text.backbone})

    @property
    def freeze_batchnorm(self) -> bool:
        return self.image.freeze_batchnorm

    @freeze_batchnorm.setter
    def freeze_batchnorm(self, value: bool) -> None:
        self.image.freeze_batchnorm = self.text.freeze_batchnorm = value

    @property
    def frozen_modules(self) -> list[str]:
        return [f'image.{m}' for m in self.image.frozen_modules] + [f'text.{m}' for m in self.text.frozen_modules]

    def tower(self, name: str) -> EmbeddingModel:
        """The tower ``'clip-vision'`` or ``'clip-text'`` (the Hub executor's names), or ``'image'``/``'text'``."""
        key = TOWERS.get(name, name)
        if key not in (IMAGE, TEXT):
            raise ValueError(f'unknown tower {name!r}; a two-tower model has {sorted(TOWERS)}')
        return self.image if key == IMAGE else self.text

    def scale(self) -> torch.Tensor:
        """The learnt logit scale (1 / temperature), clamped as CLIP's."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, batch: Batch) -> torch.Tensor:  # -> (N, D)
        parts = []
        for tower, model in ((IMAGE, self.image), (TEXT, self.text)):
            own = tower_batch(batch, tower)
            if own:
                parts.append(model(own))
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        return out[batch[ORDER]] if ORDER in batch else out

    def classify(self, batch: Batch) -> torch.Tensor:
        raise ValueError('a two-tower model has no classifier head; it embeds images and texts into one space')

    def artifact(self) -> dict[str, Any]:
        """Both towers (each as ``EmbeddingModel.artifact`` gives it) and the temperature, in one file."""
        return {
            'format': ARTIFACT_FORMAT,
            'config': self.config,
            'inputs': self.inputs.config(),
            'class_names': None,
            'towers': {IMAGE: self.image.artifact(), TEXT: self.text.artifact()},
            'state_dict': {'logit_scale': self.logit_scale.detach().cpu()},
        }
