"""Retrieval and classification metrics over embeddings (Finetuner's names, hand-checked formulas).

Retrieval metrics keep Finetuner's names (``precision_at_k`` ... ``r_precision``, k = ``limit``) and add the ``@k``
aliases (``hit@1``, ``ndcg@10``, ...). Relevant means "has the query's label". Everything is vectorised over a
(queries, results) relevance matrix; no Python loop runs per query or per document. The search itself is
``knn.knn``.

Example::

    metrics = retrieval_metrics(query_emb, query_labels, index_emb, index_labels, limit=20)
    metrics['ndcg@10']
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from executor.tuning.evaluation.knn import ArrayLike, Distance, knn

logger = logging.getLogger(__name__)

Mode = Literal['min', 'max']

RETRIEVAL_METRICS = (
    'precision_at_k',
    'recall_at_k',
    'f1_score_at_k',
    'hit_at_k',
    'average_precision',
    'reciprocal_rank',
    'dcg_at_k',
    'ndcg_at_k',
    'r_precision',
)
# alias -> (metric at a cutoff, the cutoff); computed whatever `limit` is.
ALIASES: dict[str, tuple[str, int]] = {
    'hit@1': ('hit_at_k', 1),
    'hit@5': ('hit_at_k', 5),
    'hit@10': ('hit_at_k', 10),
    'recall@10': ('recall_at_k', 10),
    'mrr@10': ('reciprocal_rank', 10),
    'ndcg@10': ('ndcg_at_k', 10),
    'map@10': ('average_precision', 10),
}
_ALIAS_DEPTH = max(cutoff for _, cutoff in ALIASES.values())

DEFAULT_MONITOR = 'ndcg@10'
METRIC_MODES: dict[str, Mode] = {
    **{name: 'max' for name in RETRIEVAL_METRICS},
    **{name: 'max' for name in ALIASES},
    'accuracy': 'max',
    'knn_accuracy': 'max',
    'spearman_cosine': 'max',
    'pearson_cosine': 'max',
    # measured on relevance judgements (judged.py)
    'map@100': 'max',
    'recall@100': 'max',
    'precision@10': 'max',
    'queries_judged': 'max',
    'queries_unjudged': 'min',
    'loss': 'min',
    'train_loss': 'min',
    'val_loss': 'min',
}


def metric_mode(name: str) -> Mode:
    """Whether a smaller ('min') or larger ('max') value of the metric `name` is better.

    Known names are in `METRIC_MODES`; per-class accuracies (``accuracy/<class>``) are 'max', a metric at a Matryoshka
    dimension (``<metric>_dim<d>``) is its metric's, and any other name containing 'loss' is 'min'.
    """
    if name in METRIC_MODES:
        return METRIC_MODES[name]
    base, _, dim = name.rpartition('_dim')
    if base and dim.isdigit():
        return metric_mode(base)
    if name.startswith('accuracy/'):
        return 'max'
    if 'loss' in name:
        return 'min'
    raise ValueError(
        f'unknown metric {name!r}: cannot tell whether higher is better; known metrics: {sorted(METRIC_MODES)}, '
        "'accuracy/<class>', '<metric>_dim<d>', or any name containing 'loss' (lower is better)"
    )


def ranking_metrics(
    relevance: ArrayLike,
    num_relevant: ArrayLike,
    limit: int = 20,
    num_candidates: int | None = None,
) -> dict[str, float]:
    """Retrieval metrics from ranked relevance flags, averaged over queries.

    For one query, rel_i (i = 1, 2, ...) says whether its i-th result is relevant, R is the number of relevant
    items among all candidates in the index (not only those retrieved), and k is `limit` (or the alias's cutoff).
    hits@k = sum_{i<=k} rel_i, and n = min(k, number of results returned) (n < k only when the index holds fewer
    than k candidates):

    - precision_at_k = hits@k / n (as Finetuner computed it: a small index does not cap precision)
    - recall_at_k = hits@k / R
    - f1_score_at_k = 2 P R' / (P + R') for P = precision_at_k, R' = recall_at_k; 0 when both are 0
    - hit_at_k = 1 if hits@k > 0 else 0
    - average_precision (AP@k) = sum_{i<=n} rel_i * (hits@i / i) / min(n, R)
    - reciprocal_rank = 1 / (rank of the first relevant result) if it is within k, else 0
    - dcg_at_k = sum_{i<=n} rel_i / log2(i + 1)
    - ndcg_at_k = dcg_at_k / IDCG, IDCG = sum_{i<=min(n, R)} 1 / log2(i + 1) (the best possible ranking)
    - r_precision = hits@r / r with r = min(R, limit): the precision over the first R results, truncated to
      `limit` because only that many are retrieved

    A query with no relevant item in the index (R = 0) has no defined recall or nDCG, so it is left out of every
    average (Finetuner refused such data outright) and a warning says how many were left out; if no query has a
    relevant item, this raises ValueError.

    :param relevance: (Q, K) booleans, rel_i of the top K results of each query, best first, with
        K >= min(max(limit, 10), num_candidates) so that the @10 aliases can be computed.
    :param num_relevant: (Q,) R of each query.
    :param num_candidates: number of items each query was ranked against; default: K (all were returned).
    :return: the nine metrics at k = `limit`, then the aliases of `ALIASES`, as floats.
    """
    rel, n_rel = _queries_with_relevant_items(relevance, num_relevant, limit, num_candidates)
    depth = rel.shape[1]
    ranks = np.arange(1, depth + 1)  # (K,)
    hits = np.cumsum(rel, axis=1)  # (Q, K): relevant among the top i
    discount = 1.0 / np.log2(ranks + 1)  # (K,)
    cum_dcg = np.cumsum(rel * discount, axis=1)  # (Q, K)
    cum_ideal = np.cumsum(discount)  # (K,)
    cum_precision = np.cumsum(rel * (hits / ranks), axis=1)  # (Q, K)
    first_hit = np.where(rel.any(axis=1), rel.argmax(axis=1) + 1, depth + 1)  # (Q,) rank; depth+1 = none

    def at(cutoff: int) -> dict[str, np.ndarray]:
        n = min(cutoff, depth)
        h = hits[:, n - 1]
        precision = h / n
        recall = h / n_rel
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
        n_ideal = np.minimum(n, n_rel)
        return {
            'precision_at_k': precision,
            'recall_at_k': recall,
            'f1_score_at_k': f1,
            'hit_at_k': (h > 0).astype(np.float64),
            'average_precision': cum_precision[:, n - 1] / n_ideal,
            'reciprocal_rank': np.where(first_hit <= n, 1.0 / first_hit, 0.0),
            'dcg_at_k': cum_dcg[:, n - 1],
            'ndcg_at_k': cum_dcg[:, n - 1] / cum_ideal[n_ideal - 1],
        }

    per_query = at(limit)
    r = np.minimum(n_rel, min(limit, depth))
    per_query['r_precision'] = hits[np.arange(len(r)), r - 1] / r
    out = {name: float(per_query[name].mean()) for name in RETRIEVAL_METRICS}
    by_cutoff = {cutoff: at(cutoff) for cutoff in {c for _, c in ALIASES.values()}}
    for alias, (name, cutoff) in ALIASES.items():
        out[alias] = float(by_cutoff[cutoff][name].mean())
    return out


def _queries_with_relevant_items(
    relevance: ArrayLike, num_relevant: ArrayLike, limit: int, num_candidates: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """``ranking_metrics``'s arguments checked, without the queries that have no relevant item (with a warning)."""
    rel = _to_numpy(relevance).astype(bool)
    n_rel = _to_numpy(num_relevant).astype(np.int64)
    if rel.ndim != 2 or n_rel.shape != (rel.shape[0],):
        raise ValueError(
            f'relevance must be (queries, results) and num_relevant (queries,), got {rel.shape} and {n_rel.shape}'
        )
    _check_limit(limit)
    n_queries, depth = rel.shape
    candidates = depth if num_candidates is None else num_candidates
    needed = min(max(limit, _ALIAS_DEPTH), candidates)
    if not needed <= depth <= candidates:
        raise ValueError(
            f'relevance has {depth} results per query; with limit={limit} and {candidates} candidates it needs '
            f'{needed} (min(max(limit, {_ALIAS_DEPTH}), candidates)) and at most {candidates}'
        )
    retrieved = rel.sum(axis=1)
    if (retrieved > n_rel).any():
        row = int(np.argmax(retrieved > n_rel))
        raise ValueError(
            f'query {row} has {retrieved[row]} relevant results but num_relevant says {n_rel[row]}: '
            'num_relevant must count every relevant candidate in the index'
        )

    keep = n_rel > 0
    if not keep.any():
        raise ValueError(
            f'none of the {n_queries} queries has a relevant item (an index item with the same label): '
            'evaluate with index data that shares labels with the queries'
        )
    if not keep.all():
        logger.warning(
            '%d of %d queries have no relevant item in the index and are left out of the metrics',
            n_queries - int(keep.sum()),
            n_queries,
        )
    return rel[keep], n_rel[keep]


def retrieval_metrics(
    query_emb: ArrayLike,
    query_labels: Sequence | ArrayLike,
    index_emb: ArrayLike | None = None,
    index_labels: Sequence | ArrayLike | None = None,
    limit: int = 20,
    metric: Distance = 'cosine',
    exclude_self: bool = False,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Retrieval metrics of `ranking_metrics` for queries searched in an index; relevant = same label.

    Without `index_emb` (or with the very same object as `query_emb`) the queries are searched among themselves
    and a query never matches itself; `exclude_self=True` asks for the same with an equal copy. R counts the
    relevant index items other than the query itself in that case.

    :param query_emb: (Q, D) embeddings.
    :param query_labels: Q labels (strings or numbers).
    :param index_emb: (N, D) embeddings; default: the queries.
    :param index_labels: N labels; required with `index_emb`.
    :param limit: k of the ``*_at_k`` metrics (the @k aliases use their own k whatever `limit` is).
    """
    _check_limit(limit)
    if index_emb is None or index_emb is query_emb:
        if index_labels is not None and index_emb is None:
            raise ValueError('index_labels given without index_emb: pass both, or neither to search the queries')
        index_emb, index_labels, exclude_self = query_emb, query_labels, True
    if index_labels is None:
        raise ValueError('index_emb given without index_labels: relevance is decided by labels, pass both')
    q_codes, i_codes = _encode_labels(query_labels, index_labels, len(query_emb), len(index_emb))
    if exclude_self and (len(q_codes) != len(i_codes) or (q_codes != i_codes).any()):
        raise ValueError(
            'exclude_self needs queries and index to be the same items in the same order, but their labels '
            'differ: pass exclude_self=False for distinct sets'
        )
    _, idx = knn(query_emb, index_emb, max(limit, _ALIAS_DEPTH), metric, exclude_self=exclude_self, device=device)
    relevance = i_codes[idx.numpy()] == q_codes[:, None]  # (Q, K)
    n_labels = int(max(q_codes.max(), i_codes.max())) + 1
    num_relevant = np.bincount(i_codes, minlength=n_labels)[q_codes] - int(exclude_self)
    return ranking_metrics(relevance, num_relevant, limit, num_candidates=len(i_codes) - int(exclude_self))


def classification_metrics(
    predictions: ArrayLike,
    labels: Sequence | ArrayLike,
    class_names: Sequence[str],
) -> tuple[dict[str, float], np.ndarray]:
    """Accuracy, per-class accuracy and the confusion matrix of a classifier.

    - accuracy = (items predicted as their class) / (items)
    - ``accuracy/<class>`` = (items of that class predicted as it) / (items of that class), i.e. the class's
      recall; a class with no item is left out rather than reported as NaN.

    :param predictions: (N, C) logits or probabilities (argmax is taken), or (N,) predicted class indices.
    :param labels: N true classes, as indices into `class_names` or as the names themselves.
    :param class_names: the C class names, in the order of the logits' columns.
    :return: (metrics, confusion) with confusion[i, j] = items of class i predicted as class j, int64 (C, C).
    """
    names = [str(name) for name in class_names]
    n_classes = len(names)
    if n_classes == 0:
        raise ValueError('class_names is empty: give the names of the classes, in the order of the logits')
    pred = _to_numpy(predictions)
    if pred.ndim == 2:
        if pred.shape[1] != n_classes:
            raise ValueError(f'predictions have {pred.shape[1]} columns but there are {n_classes} class names')
        pred = pred.argmax(axis=1)
    elif pred.ndim != 1:
        raise ValueError(f'predictions must be (N, C) logits or (N,) class indices, got shape {pred.shape}')
    pred = pred.astype(np.int64)
    true = _class_indices(labels, names)
    if len(true) != len(pred):
        raise ValueError(f'{len(pred)} predictions but {len(true)} labels: give one label per prediction')
    if len(true) == 0:
        raise ValueError('no predictions to score: give at least one item')
    if pred.min() < 0 or pred.max() >= n_classes:
        raise ValueError(f'predicted class indices must lie in [0, {n_classes}), got {pred.min()}..{pred.max()}')
    confusion = np.bincount(true * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    metrics = {'accuracy': float(np.trace(confusion) / len(true))}
    support = confusion.sum(axis=1)
    for c in np.flatnonzero(support):
        metrics[f'accuracy/{names[c]}'] = float(confusion[c, c] / support[c])
    return metrics, confusion


def knn_accuracy(
    embeddings: ArrayLike,
    labels: Sequence | ArrayLike,
    k: int = 5,
    metric: Distance = 'cosine',
    device: str | torch.device | None = None,
) -> float:
    """Leave-one-out k-nearest-neighbour classification accuracy of labelled embeddings.

    Each item is classified by a majority vote of the labels of its k nearest other items; a tied vote goes to the
    tied label whose first neighbour ranks highest. Returns the fraction classified as their own label.
    """
    if len(embeddings) < 2:
        raise ValueError(f'knn_accuracy needs at least 2 items, got {len(embeddings)}')
    codes, _ = _encode_labels(labels, labels, len(embeddings), len(embeddings))
    _, idx = knn(embeddings, embeddings, k, metric, exclude_self=True, device=device)
    votes = codes[idx.numpy()]  # (N, k) neighbour labels, nearest first
    same = votes[:, :, None] == votes[:, None, :]  # (N, k, k)
    count = same.sum(axis=2)  # (N, k): votes for the label at each rank
    # More votes wins; among equal counts the earliest rank wins (it is the label's first occurrence).
    key = count * (votes.shape[1] + 1) - np.arange(votes.shape[1])
    predicted = votes[np.arange(len(votes)), key.argmax(axis=1)]
    return float((predicted == codes).mean())


def _check_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f'limit must be a positive integer, got {limit!r}')


def _to_numpy(data: Sequence | ArrayLike) -> np.ndarray:
    if isinstance(data, torch.Tensor):
        return data.detach().cpu().numpy()
    return np.asarray(data)


def _encode_labels(
    query_labels: Sequence | ArrayLike, index_labels: Sequence | ArrayLike, n_queries: int, n_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Map both label lists to shared integer codes, checking one label per embedding."""
    q, x = _to_numpy(query_labels), _to_numpy(index_labels)
    for name, labels, expected in (('query', q, n_queries), ('index', x, n_index)):
        if labels.ndim != 1 or len(labels) != expected:
            raise ValueError(
                f'{name} labels must be a flat list with one label per embedding: got shape {labels.shape} '
                f'for {expected} embeddings'
            )
        if labels.dtype == object:
            missing = [i for i, label in enumerate(labels.tolist()) if label is None]
            if missing:
                raise ValueError(f'{name} item {missing[0]} has no label: every item needs one to be evaluated')
    try:
        _, codes = np.unique(np.concatenate([q, x]), return_inverse=True)
    except TypeError as err:
        raise ValueError(f'labels must be all strings or all numbers, not a mix ({err})') from None
    codes = codes.reshape(-1)
    return codes[: len(q)], codes[len(q) :]


def _class_indices(labels: Sequence | ArrayLike, names: list[str]) -> np.ndarray:
    values = _to_numpy(labels)
    if values.ndim != 1:
        raise ValueError(f'labels must be a flat list of classes, got shape {values.shape}')
    if values.dtype.kind in 'iu':
        if len(values) and (values.min() < 0 or values.max() >= len(names)):
            raise ValueError(f'label indices must lie in [0, {len(names)}), got {values.min()}..{values.max()}')
        return values.astype(np.int64)
    lookup = {name: i for i, name in enumerate(names)}
    unknown = sorted({str(v) for v in values.tolist()} - lookup.keys())
    if unknown:
        raise ValueError(f'labels {unknown[:5]} are not among the class names {names}')
    return np.array([lookup[str(v)] for v in values.tolist()], dtype=np.int64)
