"""Freezing backbone layers: all of them, leading stages (stem first), or layers by name or prefix."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

from executor.tuning.errors import close_names

if TYPE_CHECKING:
    from executor.tuning.models.embedding import EmbeddingModel

logger = logging.getLogger(__name__)

Freeze = Union[bool, int, Sequence[str]]


def backbone_stages(model: EmbeddingModel) -> list[list[str]]:
    """The backbone's module names grouped into stages, stem first (timm's coarse groups, a text model's embeddings
    then its layers, else top-level children)."""
    if hasattr(model.backbone, 'stages'):
        return model.backbone.stages()
    net = model.backbone.module
    if hasattr(net, 'group_matcher'):
        from timm.models import group_modules

        return [list(mods) for mods in group_modules(net, net.group_matcher(coarse=True)).values()]
    return [[n] for n, child in net.named_children() if any(True for _ in child.parameters())]


def _prefixes(model: EmbeddingModel, freeze: Freeze, modules: dict) -> list[str]:
    net = model.backbone.module
    if freeze is True:
        return [n for n, _ in net.named_children()]
    if isinstance(freeze, int) and not isinstance(freeze, bool):
        stages = backbone_stages(model)
        if not 0 <= freeze <= len(stages):
            raise ValueError(
                f'freeze={freeze} stages, but the backbone has {len(stages)} (stem first); use 0..{len(stages)}'
            )
        return [m for stage in stages[:freeze] for m in stage]
    if isinstance(freeze, (list, tuple)):
        for p in freeze:
            if not any(n == p or n.startswith(p + '.') for n in modules):
                close = close_names(p, [n for n in modules if n], n=5)
                raise ValueError(f'freeze names layer {p!r}, which the backbone does not have; close names: {close}')
        return list(freeze)
    raise ValueError(f'freeze must be a bool, a number of leading stages or a list of layer names; got {freeze!r}')


def freeze_layers(model: EmbeddingModel, freeze: Freeze) -> list[str]:
    """Stop gradients in the chosen backbone layers; returns the frozen module names."""
    net = model.backbone.module
    modules = dict(net.named_modules())
    prefixes = _prefixes(model, freeze, modules)
    frozen = [n for n in modules if n and any(n == p or n.startswith(p + '.') for p in prefixes)]
    for name, param in net.named_parameters():
        if any(name.startswith(p + '.') or name == p for p in prefixes):
            param.requires_grad_(False)
    model.frozen_modules = frozen
    model.config['freeze'] = freeze if not isinstance(freeze, tuple) else list(freeze)
    logger.info('froze %d backbone modules (%s)', len(frozen), freeze)
    return frozen
