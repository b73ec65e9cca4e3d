"""Text-to-image training (CLIP): captioned images, a two-tower model, CLIP's symmetric InfoNCE over the batch."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from executor.tuning.data.sources import Item
from executor.tuning.errors import DataError
from executor.tuning.evaluation import Evaluator, evaluator_for
from executor.tuning.inputs import Batch
from executor.tuning.losses import LossSpec
from executor.tuning.models import TwoTowerModel, build_two_tower
from executor.tuning.pair_losses import CLIP_LOSS, CLIPLoss
from executor.tuning.tasks.base import Task


class TextToImage(Task):
    """``CLIPLoss`` on (image, caption) pairs. The images' ids are the task's classes, only so that the loss masks
    the captions of one image out of each other's negatives; the model gets no classifier."""

    name = 'text-to-image'
    # pre-trained towers, new projections (at 10x the rate, as every head here); chosen on flickr8k-dev's training
    # images (bench/paper_tables.py --only text-to-image)
    defaults = {'learning_rate': 1e-4, 'epochs': 5, 'batch_size': 32}
    monitor = 'mrr@10'

    def __init__(self, config) -> None:
        super().__init__(config.model_copy(update={'loss': config.loss or CLIP_LOSS}))

    def check_data(self, items: Sequence[Item]) -> list[str]:
        single = next((it for it in items if it.text is None or it.kind != 'image'), None)
        if single is not None:
            raise DataError(
                f'{single.name} is not a captioned image: a two-tower model trains on (image, caption) pairs; give a '
                'CSV with image,caption (or uri,text) columns, or documents with both an image and a text'
            )
        images = sorted({it.label for it in items})
        if len(images) < 2:
            raise DataError(f'the training data has captions of {len(images)} image; CLIPLoss needs at least 2')
        return images

    def prepare(self, items: Sequence[Item]) -> list[Item]:
        """Each item labelled with its image's id: its label when it has one, else its path (or its item id)."""
        return [dataclasses.replace(it, label=it.label or it.uri or it.id) for it in items]

    def build_model(self, class_names: list[str] | None) -> TwoTowerModel:
        config = self.config
        if config.embedding_layer is not None:
            raise ValueError('embedding_layer does not apply to a two-tower model; leave it out')
        return build_two_tower(
            config.model,
            config.text_model,
            output_dim=config.output_dim,
            weights=config.weights,
            pretrained=config.pretrained,
            freeze=config.freeze,
            text_freeze=config.text_freeze,
            pooler=config.pooler,
        )

    def build_heads(self, model: nn.Module) -> dict[str, nn.Module]:
        """The towers' new projections, trained at the heads' rate (a CLIP model's own are part of its towers)."""
        heads = {'image_projection': model.image.projection, 'text_projection': model.text.projection}
        return {name: head for name, head in heads.items() if head is not None}

    def build_loss(self, model: nn.Module, class_names: list[str] | None, world: int) -> LossSpec:
        options = dict(self.config.loss_options)
        unknown = sorted(set(options) - {'gather_across_devices'})
        if unknown:
            raise ValueError(
                f"CLIPLoss takes only the loss_option 'gather_across_devices' (got {unknown}); its scale is learnt "
                'with the model'
            )
        return LossSpec(CLIP_LOSS, CLIPLoss(**options))

    def compute_loss(self, net: nn.Module, model: nn.Module, batch: Batch, labels: torch.Tensor) -> torch.Tensor:
        images, texts = net(batch).float().chunk(2)  # the batch's images, then their captions
        return self.loss.module(images, texts, model.scale(), labels)

    def evaluator(self, query: Sequence[Item], index: Sequence[Item] | None, limit: int) -> Evaluator:
        """Text -> image retrieval (``query_data`` sentences with their image's id as label, ``index_data`` the
        images with theirs), or image -> text with the two swapped."""
        if index is None:
            raise DataError(
                'a two-tower model is evaluated with query_data (a text,label CSV of captions, label = the image id) '
                'and index_data (a uri,label CSV of the images); eval_data alone does not say which side is which'
            )
        return evaluator_for(query, index, limit, None, accuracy=False)
