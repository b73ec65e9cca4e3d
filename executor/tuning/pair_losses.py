"""Losses for sentence-pair, triplet and scored-pair training of text embedding models (sentence-transformers style).

Every loss is an ``nn.Module`` whose ``forward(columns, scores=None)`` takes the embeddings already computed:
``columns`` is a list of k tensors, each (B, D): column 0 holds the anchors (sentence1), column 1 the positives
(sentence2) and an optional column 2 the hard negatives; ``scores`` is a (B,) tensor for scored pairs (STS style).
Each class says what data it takes through ``needs_scores`` and ``columns`` (the column counts it accepts), and refuses
other data with a ``ValueError`` naming the loss and the loss to use instead (see ``check_pair_data``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import BaseMetricLossFunction, TripletMarginLoss
from torch import Tensor, nn

from executor.tuning.losses import unknown_name

PAIRS_OR_TRIPLETS = 'anchor,positive pairs or anchor,positive,negative triplets'
SCORED_PAIRS = 'scored pairs (a sentence1,sentence2,score CSV)'


def loss_name(loss_module: nn.Module) -> str:
    """The loss's name for messages: ``ColumnLoss(TripletMarginLoss)``, a wrapper's own ``name`` (the Matryoshka
    one's: ``MatryoshkaLoss(CoSENTLoss)``), else its class's."""
    if isinstance(loss_module, ColumnLoss):
        return f'ColumnLoss({type(loss_module.pml_loss).__name__})'
    name = getattr(loss_module, 'name', None)
    return name if isinstance(name, str) else type(loss_module).__name__


def check_pair_data(loss_module: nn.Module, columns: int, scored: bool) -> None:
    """Raise a ``ValueError`` unless ``loss_module`` takes ``columns`` embedding columns, with scores iff ``scored``.

    The message says what the loss needs and which loss fits the data given instead.
    """
    needs_scores = bool(getattr(loss_module, 'needs_scores', False))
    accepted = tuple(getattr(loss_module, 'columns', ()))
    name = loss_name(loss_module)
    counts = ' or '.join(str(c) for c in accepted)
    if needs_scores and not scored:
        alternative = 'anchor,positive pairs' if columns <= 2 else 'anchor,positive,negative triplets'
        raise ValueError(
            f'{name} needs {SCORED_PAIRS}; got {columns} column(s) without scores. '
            f'For {alternative} use MultipleNegativesRankingLoss'
        )
    if not needs_scores and scored:
        raise ValueError(
            f'{name} needs {PAIRS_OR_TRIPLETS} without scores; got scored data. '
            'For scored pairs (sentence1,sentence2,score) use CoSENTLoss or CosineSimilarityLoss'
        )
    if columns not in accepted:
        wanted = SCORED_PAIRS if needs_scores else PAIRS_OR_TRIPLETS
        hint = ''
        if not needs_scores and columns < 2:
            hint = '; a single column of texts cannot make pairs, add a positive column'
        if needs_scores and columns == 3:
            hint = '; for anchor,positive,negative triplets use MultipleNegativesRankingLoss'
        raise ValueError(f'{name} needs {wanted}: {counts} embedding columns, got {columns}{hint}')


def _checked(loss_module: nn.Module, columns: Sequence[Tensor], scores: Tensor | None) -> tuple[list[Tensor], Tensor]:
    """Validate the data against the loss and return the columns (half precision raised to float32) and scores."""
    columns = list(columns)
    check_pair_data(loss_module, len(columns), scores is not None)
    name = loss_name(loss_module)
    shape = tuple(columns[0].shape)
    for i, column in enumerate(columns):
        if column.ndim != 2 or tuple(column.shape) != shape:
            raise ValueError(
                f'{name}: every column must be a (B, D) tensor of one shape; column {i} is '
                f'{tuple(column.shape)}, column 0 is {shape}'
            )
    if columns[0].dtype in (torch.float16, torch.bfloat16):
        columns = [column.float() for column in columns]
    if scores is None:
        return columns, torch.empty(0)
    if scores.numel() != shape[0]:
        raise ValueError(f'{name} needs one score per pair: {shape[0]} pairs, {scores.numel()} scores')
    return columns, scores.reshape(-1).to(columns[0].dtype)


def _cos_matrix(a: Tensor, b: Tensor) -> Tensor:
    """cos(a_i, b_j) for all i, j: an (len(a), len(b)) matrix."""
    return F.normalize(a, p=2, dim=1) @ F.normalize(b, p=2, dim=1).T


class MultipleNegativesRankingLoss(nn.Module):
    """In-batch negatives InfoNCE, as sentence-transformers' MultipleNegativesRankingLoss.

    With anchors a, positives p and optional hard negatives n, the candidates are c = [p_1..p_B, n_1..n_B] and
    ``loss = mean_i -log(exp(s * cos(a_i, p_i)) / sum_j exp(s * cos(a_i, c_j)))`` with s = ``scale``.
    ``symmetric=True`` averages that with the positive->anchor direction (positives as queries against the anchors
    only): ``mean_i -log(exp(s * cos(p_i, a_i)) / sum_j exp(s * cos(p_i, a_j)))``, as
    MultipleNegativesSymmetricRankingLoss.
    """

    needs_scores = False
    columns = (2, 3)

    def __init__(self, scale: float = 20.0, symmetric: bool = False) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f'MultipleNegativesRankingLoss scale must be > 0, got {scale}')
        self.scale = float(scale)
        self.symmetric = bool(symmetric)

    def forward(self, columns: Sequence[Tensor], scores: Tensor | None = None) -> Tensor:
        columns, _ = _checked(self, columns, scores)
        anchors, candidates = columns[0], torch.cat(columns[1:], dim=0)
        target = torch.arange(anchors.shape[0], device=anchors.device)
        loss = F.cross_entropy(_cos_matrix(anchors, candidates) * self.scale, target)
        if not self.symmetric:
            return loss
        backward = F.cross_entropy(_cos_matrix(columns[1], anchors) * self.scale, target)
        return (loss + backward) / 2


class CoSENTLoss(nn.Module):
    """CoSENT, as sentence-transformers' CoSENTLoss, on scored pairs (a_i, b_i, y_i).

    With s_i = ``scale`` * cos(a_i, b_i): ``loss = log(1 + sum_{(i, j): y_i > y_j} exp(s_j - s_i))``, i.e. logsumexp
    over 0 and every s_j - s_i where pair i is scored higher than pair j (ties give no term).
    """

    needs_scores = True
    columns = (2,)

    def __init__(self, scale: float = 20.0) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f'CoSENTLoss scale must be > 0, got {scale}')
        self.scale = float(scale)

    def forward(self, columns: Sequence[Tensor], scores: Tensor | None = None) -> Tensor:
        columns, labels = _checked(self, columns, scores)
        sims = F.cosine_similarity(columns[0], columns[1], dim=1) * self.scale
        differences = sims[None, :] - sims[:, None]  # [i, j] = s_j - s_i
        ordered = labels[:, None] > labels[None, :]  # [i, j] = y_i > y_j
        return torch.logsumexp(torch.cat([sims.new_zeros(1), differences[ordered]]), dim=0)


class CosineSimilarityLoss(nn.Module):
    """Regression of cosine similarity on the score, as sentence-transformers' CosineSimilarityLoss.

    ``loss = mean_i (cos(a_i, b_i) - y_i)^2``; the caller normalises the scores y to [0, 1] (or [-1, 1]).
    """

    needs_scores = True
    columns = (2,)

    def forward(self, columns: Sequence[Tensor], scores: Tensor | None = None) -> Tensor:
        columns, labels = _checked(self, columns, scores)
        return F.mse_loss(torch.cosine_similarity(columns[0], columns[1]), labels)


class ColumnLoss(nn.Module):
    """Any pytorch-metric-learning loss on pair/triplet columns, over the concatenated embeddings [a; p; n].

    Labels: a_i and p_i share label i, n_i gets label B + i (it is nobody's positive). A ``TripletMarginLoss`` given
    three columns is computed on exactly the given triplets (a_i, p_i, n_i) through PML's ``indices_tuple``
    (i, B + i, 2B + i); every other case lets the PML loss form its own pairs/triplets from the labels, e.g. for
    TripletMarginLoss ``mean over triplets with loss > 0 of relu(d(a, p) - d(a, n) + margin)``.
    """

    needs_scores = False
    columns = (2, 3)

    def __init__(self, pml_loss: nn.Module) -> None:
        super().__init__()
        if not isinstance(pml_loss, BaseMetricLossFunction):
            raise TypeError(f'ColumnLoss takes a pytorch-metric-learning loss, got {type(pml_loss).__name__}')
        self.pml_loss = pml_loss

    def forward(self, columns: Sequence[Tensor], scores: Tensor | None = None) -> Tensor:
        columns, _ = _checked(self, columns, scores)
        batch = columns[0].shape[0]
        index = torch.arange(batch, device=columns[0].device)
        labels = torch.cat([index, index] + ([index + batch] if len(columns) == 3 else []))
        embeddings = torch.cat(columns, dim=0)
        if len(columns) == 3 and isinstance(self.pml_loss, TripletMarginLoss):
            return self.pml_loss(embeddings, labels, indices_tuple=(index, index + batch, index + 2 * batch))
        return self.pml_loss(embeddings, labels)


class CLIPLoss(nn.Module):
    """CLIP's symmetric InfoNCE over a batch of (image, caption) pairs: each image's caption is its positive among the
    batch's captions, and each caption's image among its images, at the model's learnt logit ``scale``.

    ``groups`` (one id per pair, the image's) masks the pairs of one image out of each other's negatives, so a batch
    holding two captions of one image never pushes them apart.
    """

    def forward(self, images: Tensor, texts: Tensor, scale: Tensor, groups: Tensor | None = None) -> Tensor:
        if images.shape != texts.shape or images.ndim != 2:
            raise ValueError(f'CLIPLoss takes (B, D) images and texts of one shape, got {images.shape}, {texts.shape}')
        logits = scale * F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T  # (B, B), rows: images
        if groups is not None:
            same = groups[:, None] == groups[None, :]
            same.fill_diagonal_(False)
            logits = logits.masked_fill(same, float('-inf'))
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


CLIP_LOSS = 'CLIPLoss'

PAIR_LOSSES: dict[str, type] = {
    'MultipleNegativesRankingLoss': MultipleNegativesRankingLoss,
    'CoSENTLoss': CoSENTLoss,
    'CosineSimilarityLoss': CosineSimilarityLoss,
}


def _options_taken(cls: type) -> list[str]:
    parameters = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in parameters if p.name != 'self' and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def build_pair_loss(name: str, options: dict[str, Any] | None, pml_loss: nn.Module | None = None) -> nn.Module:
    """The pair loss ``name`` built with ``options``, or ``ColumnLoss(pml_loss)`` when ``name`` is not a pair loss
    and a PML loss is given (``options`` are then the PML loss's, already applied by whoever built it). A run with
    ``matryoshka_dims`` wraps it in ``matryoshka.MatryoshkaLoss``."""
    options = dict(options or {})
    if name in PAIR_LOSSES:
        cls = PAIR_LOSSES[name]
        taken = _options_taken(cls)
        unknown = sorted(set(options) - set(taken))
        if unknown:
            raise ValueError(f'{name} has no option {", ".join(unknown)}; it takes {taken or "no options"}')
        loss: nn.Module = cls(**options)
    elif pml_loss is not None:
        loss = ColumnLoss(pml_loss)
    else:
        raise unknown_name('pair loss', name, sorted(PAIR_LOSSES))
    return loss
