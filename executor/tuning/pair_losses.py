"""Losses for sentence-pair, triplet and scored-pair training of text embedding models (sentence-transformers style).

Every loss is an ``nn.Module`` whose ``forward(columns, scores=None)`` takes the embeddings already computed:
``columns`` is a list of k tensors, each (B, D): column 0 holds the anchors (sentence1), column 1 the positives
(sentence2) and any further columns hard negatives (a triplet's one, or an n-tuple's negative_1..negative_n);
``scores`` is a (B,) tensor for scored pairs (STS style). Each class says what data it takes through ``needs_scores``
and ``columns`` (the column counts it accepts: a tuple, or ``AtLeast(2)``), and refuses other data with a
``ValueError`` naming the loss and the loss to use instead (see ``check_pair_data``).

``CachedMultipleNegativesRankingLoss`` is MNRL whose batch is embedded in mini-batches (GradCache, ``cached_loss``):
the pairs task gives it the encoder rather than the embeddings. ``gather_across_devices`` makes MNRL, the cached loss
and ``CLIPLoss`` take every DDP rank's candidates as negatives (``gather``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_metric_learning.losses import BaseMetricLossFunction, TripletMarginLoss
from torch import Tensor, nn

from executor.tuning.losses import unknown_name

PAIRS_OR_TRIPLETS = 'anchor,positive pairs or anchor,positive,negative triplets'
PAIRS_TO_N_TUPLES = (
    'anchor,positive pairs, anchor,positive,negative triplets or n-tuples (anchor,positive,negative_1..negative_n)'
)
SCORED_PAIRS = 'scored pairs (a sentence1,sentence2,score CSV)'


@dataclass(frozen=True)
class AtLeast:
    """The column counts a loss takes from ``low`` up (``7 in AtLeast(2)``); ``str`` says it as messages do."""

    low: int

    def __contains__(self, count: object) -> bool:
        return isinstance(count, int) and count >= self.low

    def __str__(self) -> str:
        return f'{self.low} or more'


def _counts(accepted: Sequence[int] | AtLeast) -> str:
    return str(accepted) if isinstance(accepted, AtLeast) else ' or '.join(str(c) for c in accepted)


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
    accepted = getattr(loss_module, 'columns', ())
    name = loss_name(loss_module)
    counts = _counts(accepted)
    if needs_scores and not scored:
        alternative = (
            'anchor,positive pairs'
            if columns <= 2
            else 'anchor,positive,negative triplets'
            if columns == 3
            else f'{columns}-column n-tuples (anchor,positive,negative_1..negative_{columns - 2})'
        )
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
        wanted = SCORED_PAIRS if needs_scores else PAIRS_TO_N_TUPLES if 4 in accepted else PAIRS_OR_TRIPLETS
        hint = ''
        if not needs_scores and columns < 2:
            hint = '; a single column of texts cannot make pairs, add a positive column'
        elif needs_scores and columns == 3:
            hint = '; for anchor,positive,negative triplets use MultipleNegativesRankingLoss'
        elif columns > 3:
            hint = (
                f'; for {columns}-column n-tuples (anchor,positive,negative_1..negative_{columns - 2}) use '
                'MultipleNegativesRankingLoss or CachedMultipleNegativesRankingLoss, or mine hard negatives with '
                "output_format='triplet'"
            )
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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(tensor: Tensor) -> tuple[Tensor, int]:
    """``(every rank's rows of tensor in rank order, where this rank's rows start among them)`` under
    torch.distributed, the gradient flowing back to each rank's own rows (``torch.distributed.nn.functional
    .all_gather``, whose backward sums every rank's gradient: with DDP averaging the ranks' gradients, that is the
    gradient of the mean loss over the global batch); ``(tensor, 0)`` when not distributed. Every rank must give as
    many rows (the trainer's batches are all full)."""
    if not _distributed():
        return tensor, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous())), dist.get_rank() * tensor.shape[0]


def _check_flag(name: str, option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f'{name} {option} must be true or false, got {value!r}')
    return value


class MultipleNegativesRankingLoss(nn.Module):
    """In-batch negatives InfoNCE, as sentence-transformers' MultipleNegativesRankingLoss.

    With anchors a, positives p and optional hard negatives n^1..n^k (a triplet's one, an n-tuple's k), the candidates
    are c = [p_1..p_B, n^1_1..n^1_B, ..., n^k_B] and
    ``loss = mean_i -log(exp(s * cos(a_i, p_i)) / sum_j exp(s * cos(a_i, c_j)))`` with s = ``scale``.
    ``symmetric=True`` averages that with the positive->anchor direction (positives as queries against the anchors
    only): ``mean_i -log(exp(s * cos(p_i, a_i)) / sum_j exp(s * cos(p_i, a_j)))``, as
    MultipleNegativesSymmetricRankingLoss. ``gather_across_devices=True`` (under DDP) ranks each rank's queries against
    the candidates (and, when symmetric, the anchors) of every rank (``gather``); it changes nothing in one process.
    """

    needs_scores = False
    columns = AtLeast(2)

    def __init__(self, scale: float = 20.0, symmetric: bool = False, gather_across_devices: bool = False) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f'{name} scale must be a number > 0, got {scale!r}')
        self.scale = float(scale)
        self.symmetric = _check_flag(name, 'symmetric', symmetric)
        self.gather_across_devices = _check_flag(name, 'gather_across_devices', gather_across_devices)

    def forward(self, columns: Sequence[Tensor], scores: Tensor | None = None) -> Tensor:
        columns, _ = _checked(self, columns, scores)
        anchors, candidates, offset = columns[0], torch.cat(columns[1:], dim=0), 0
        if self.gather_across_devices and _distributed():
            candidates = torch.cat([gather(column)[0] for column in columns[1:]], dim=0)
            offset = dist.get_rank() * anchors.shape[0]
        target = torch.arange(anchors.shape[0], device=anchors.device) + offset
        loss = F.cross_entropy(_cos_matrix(anchors, candidates) * self.scale, target)
        if not self.symmetric:
            return loss
        queried = gather(anchors)[0] if self.gather_across_devices else anchors
        backward = F.cross_entropy(_cos_matrix(columns[1], queried) * self.scale, target)
        return (loss + backward) / 2


class CachedMultipleNegativesRankingLoss(MultipleNegativesRankingLoss):
    """MultipleNegativesRankingLoss at the memory of ``mini_batch_size`` (GradCache, Gao et al. 2021), as
    sentence-transformers' CachedMultipleNegativesRankingLoss: the same loss and gradients over the whole batch's
    in-batch negatives, the batch embedded ``mini_batch_size`` sentences at a time (``cached_loss``).

    Given embeddings (``forward(columns, scores)``) it is MultipleNegativesRankingLoss; the pairs task instead hands
    ``cached_loss`` its encoder and the batch cut into mini-batches (``mini_batch_size`` of it, or of a
    ``MatryoshkaLoss`` around it, says so).
    """

    def __init__(
        self,
        scale: float = 20.0,
        symmetric: bool = False,
        mini_batch_size: int = 32,
        gather_across_devices: bool = False,
    ) -> None:
        super().__init__(scale, symmetric, gather_across_devices)
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
            raise ValueError(
                f'CachedMultipleNegativesRankingLoss mini_batch_size must be a whole number >= 1 (sentences embedded '
                f'at once, e.g. 32), got {mini_batch_size!r}'
            )
        self.mini_batch_size = mini_batch_size


class _RngState:
    """The CPU generator's state and that of the CUDA devices given, taken now; ``restored()`` runs a block from
    them and leaves the generators as they were before it (dropout replays the masks of the pass it was taken at)."""

    def __init__(self, devices: list[int]) -> None:
        self.devices = devices
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in devices]

    @contextmanager
    def restored(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            yield


def _cuda_devices(chunk: Any) -> list[int]:
    tensors = chunk.values() if isinstance(chunk, dict) else [chunk]
    return sorted({t.device.index or 0 for t in tensors if isinstance(t, Tensor) and t.is_cuda})


def _autocast_now() -> list[tuple[str, torch.dtype]]:
    """The autocast regions in force (device type, dtype), to embed again under them in the backward pass (which the
    trainer runs outside its ``torch.autocast`` block)."""
    return [(d, torch.get_autocast_dtype(d)) for d in ('cuda', 'cpu') if torch.is_autocast_enabled(d)]


def cached_loss(
    loss: nn.Module,
    encode: Callable[[Any], Tensor],
    chunks: Sequence[Any],
    views: int,
    scores: Tensor | None = None,
    no_sync: Callable[[], Any] | None = None,
) -> Tensor:
    """``loss(columns, scores)`` over the embeddings of ``chunks`` (the batch's rows, every first column then every
    second..., cut into mini-batches; ``encode(chunk) -> (rows, D)``), at the memory of one chunk: GradCache.

    1. every chunk is embedded without gradient (its RNG state kept, for dropout);
    2. the loss and its gradient w.r.t. the embeddings are computed on them (the only whole-batch tensors: B x D);
    3. the loss comes back detached, with a hook: when the caller back-propagates it, each chunk is embedded again
       with gradient (same RNG state, same autocast) and back-propagated with its cached gradient times the
       gradient arriving at the loss (a GradScaler's scale, an accumulation's 1/k), so that the parameters get what
       ``loss(encode(whole batch))`` would give them. ``no_sync`` (a DDP model's) holds the all-reduce back until
       the last chunk.

    Without gradient mode (evaluation) it is the loss on the embeddings, nothing cached.
    """
    states, parts = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_RngState(_cuda_devices(chunk)))
            parts.append(encode(chunk))
    embeddings = torch.cat(parts)
    if not torch.is_grad_enabled():
        return loss(list(embeddings.chunk(views)), scores)
    leaf = embeddings.detach().requires_grad_()
    value = loss(list(leaf.chunk(views)), scores)
    (cached,) = torch.autograd.grad(value, leaf)
    cached = cached.split([len(part) for part in parts])
    del parts, embeddings, leaf
    autocast = _autocast_now()

    def replay(upstream: Tensor) -> None:
        last = len(chunks) - 1
        for i, (chunk, state, gradient) in enumerate(zip(chunks, states, cached)):
            sync = no_sync() if no_sync is not None and i < last else nullcontext()
            with state.restored(), torch.enable_grad(), sync:
                with ExitStack() as stack:  # the forward under autocast, its backward not (as the trainer's)
                    for device_type, dtype in autocast:
                        stack.enter_context(torch.autocast(device_type, dtype=dtype))
                    embedded = encode(chunk)
                torch.autograd.backward(embedded, gradient * upstream.to(gradient.dtype))

    result = value.detach().requires_grad_()
    result.register_hook(replay)
    return result


def mini_batch_size(loss: nn.Module) -> int | None:
    """The mini-batch a cached loss (or a wrapper around one) embeds at a time; ``None`` for every other loss."""
    size = getattr(loss, 'mini_batch_size', None)
    return size if isinstance(size, int) else None


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
    holding two captions of one image never pushes them apart. ``gather_across_devices=True`` (under DDP) ranks each
    rank's images against every rank's captions and its captions against every rank's images (``gather``), as one
    process holding the global batch would; it changes nothing in one process.
    """

    def __init__(self, gather_across_devices: bool = False) -> None:
        super().__init__()
        self.gather_across_devices = _check_flag('CLIPLoss', 'gather_across_devices', gather_across_devices)

    def forward(self, images: Tensor, texts: Tensor, scale: Tensor, groups: Tensor | None = None) -> Tensor:
        if images.shape != texts.shape or images.ndim != 2:
            raise ValueError(f'CLIPLoss takes (B, D) images and texts of one shape, got {images.shape}, {texts.shape}')
        images, texts = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
        all_images, all_texts, all_groups, offset = images, texts, groups, 0
        if self.gather_across_devices and _distributed():
            (all_images, offset), (all_texts, _) = gather(images), gather(texts)
            if groups is not None:
                parts = [torch.empty_like(groups) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, groups.contiguous())
                all_groups = torch.cat(parts)
        target = torch.arange(len(images), device=images.device) + offset
        per_image = scale * images @ all_texts.T  # (B, world B): this rank's images against every caption
        per_text = scale * texts @ all_images.T
        if groups is not None:
            same = groups[:, None] == all_groups[None, :]  # another caption of the same image: no negative
            same[torch.arange(len(images)), target] = False
            per_image, per_text = per_image.masked_fill(same, float('-inf')), per_text.masked_fill(same, float('-inf'))
        return (F.cross_entropy(per_image, target) + F.cross_entropy(per_text, target)) / 2


CLIP_LOSS = 'CLIPLoss'

PAIR_LOSSES: dict[str, type] = {
    'MultipleNegativesRankingLoss': MultipleNegativesRankingLoss,
    'CachedMultipleNegativesRankingLoss': CachedMultipleNegativesRankingLoss,
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
