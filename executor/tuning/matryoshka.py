"""Matryoshka embeddings (Kusupati et al., 2022): every leading slice of an embedding, L2-normalised again, is an
embedding too. The sizes a run trains and evaluates at, checked once (``matryoshka_sizes``); the slice
(``truncate``); the loss summed over the slices (``sliced_loss``) that pair training (``MatryoshkaLoss``) and
metric learning both train with.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from executor.tuning.pair_losses import check_pair_data, loss_name, mini_batch_size

Embeddings = TypeVar('Embeddings', Tensor, np.ndarray)
#: how the checks name the sizes and weights of a run (its config's fields)
FIELDS = ('matryoshka_dims', 'matryoshka_weights')


def matryoshka_sizes(
    dims: Sequence[int] | None,
    weights: Sequence[float] | None = None,
    embed_dim: int | None = None,
    names: tuple[str, str] = FIELDS,
) -> list[tuple[int, float]]:
    """``(dim, weight)`` pairs, widest first (weights default to 1 and follow their dims), after checking that the
    dims are distinct positive integers, no wider than ``embed_dim`` when it is given, with one weight ``>= 0`` per
    dim; ``[]`` without dims. ``names`` are the dims' and the weights' in messages."""
    dims_name, weights_name = names
    if dims is None:
        if weights is not None:
            raise ValueError(f'{weights_name} given without {dims_name}; give the dims or drop the weights')
        return []
    dims = list(dims)
    if not dims:
        raise ValueError(f'{dims_name} needs at least one dimension')
    if any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d <= 0 for d in dims):
        raise ValueError(f'{dims_name} must be positive integers, got {dims}')
    dims = [int(d) for d in dims]
    if len(set(dims)) != len(dims):
        raise ValueError(f'{dims_name} must be distinct, got {dims}')
    weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
    if len(weights) != len(dims):
        raise ValueError(
            f'{weights_name} has {len(weights)} entries for {dims_name} {dims}; give one weight per dim, or leave the '
            'weights out (1 each)'
        )
    if any(not w >= 0 for w in weights):
        raise ValueError(f'{weights_name} must be >= 0, got {weights}')
    if embed_dim is not None:
        check_width(dims, embed_dim, dims_name)
    return sorted(zip(dims, weights), key=lambda pair: pair[0], reverse=True)


def check_width(dims: Sequence[int], embed_dim: int, dims_name: str = FIELDS[0]) -> None:
    """Raise a ``ValueError`` when a dim is wider than the ``embed_dim``-dim embedding."""
    too_wide = [d for d in dims if d > embed_dim]
    if too_wide:
        raise ValueError(
            f"{dims_name} {too_wide} are wider than the model's {embed_dim}-dim embedding; give dims <= {embed_dim}"
        )


def truncate(embeddings: Embeddings, dim: int) -> Embeddings:
    """``(..., D)`` -> ``(..., dim)``: the first ``dim`` values of each embedding, L2-normalised again (how a
    Matryoshka model is served), of a tensor or an array."""
    if isinstance(embeddings, Tensor):
        return F.normalize(embeddings[..., :dim], p=2, dim=-1)
    out = embeddings[..., :dim]
    return out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)


def sliced_loss(
    loss: Callable[[list[Tensor]], Tensor], columns: Sequence[Tensor], sizes: Sequence[tuple[int, float]]
) -> Tensor:
    """``sum_k w_k * loss([truncate(x, d_k) for x in columns])`` over the ``(d_k, w_k)`` of ``sizes``."""
    return torch.stack([weight * loss([truncate(x, dim) for x in columns]) for dim, weight in sizes]).sum()


class MatryoshkaLoss(nn.Module):
    """Matryoshka representation loss over a pair loss, as sentence-transformers' MatryoshkaLoss.

    ``loss = sum_k w_k * inner([normalize(x[:, :d_k]) for x in columns], scores)`` over dims d_1 > d_2 > ...
    (sorted descending, weights following their dims; weights default to 1). ``needs_scores``, ``columns`` and
    ``mini_batch_size`` (a cached loss's) follow the inner loss.
    """

    def __init__(self, loss: nn.Module, dims: Sequence[int], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if not hasattr(loss, 'columns') or not hasattr(loss, 'needs_scores'):
            raise TypeError(
                f'MatryoshkaLoss wraps a pair loss (forward(columns, scores)), got {type(loss).__name__}; '
                'wrap a pytorch-metric-learning loss in ColumnLoss first'
            )
        sizes = matryoshka_sizes(dims, weights, names=('MatryoshkaLoss dims', 'MatryoshkaLoss weights'))
        self.loss = loss
        self.dims = tuple(d for d, _ in sizes)
        self.weights = tuple(w for _, w in sizes)

    @property
    def name(self) -> str:
        """For messages: the wrapper and what it wraps, ``MatryoshkaLoss(CoSENTLoss)``."""
        return f'MatryoshkaLoss({loss_name(self.loss)})'

    @property
    def needs_scores(self) -> bool:
        return bool(getattr(self.loss, 'needs_scores', False))

    @property
    def columns(self) -> Any:
        return getattr(self.loss, 'columns', ())

    @property
    def mini_batch_size(self) -> int | None:
        """A cached inner loss's: ``cached_loss`` embeds the batch in mini-batches and this loss slices their
        embeddings (as sentence-transformers' MatryoshkaLoss over CachedMultipleNegativesRankingLoss)."""
        return mini_batch_size(self.loss)

    def forward(self, columns: Sequence[Tensor], scores: Tensor | None = None) -> Tensor:
        columns = list(columns)
        check_pair_data(self, len(columns), scores is not None)
        check_width(self.dims, min(column.shape[-1] for column in columns), 'MatryoshkaLoss dims')
        return sliced_loss(lambda sliced: self.loss(sliced, scores), columns, list(zip(self.dims, self.weights)))
