"""Evaluation of sentence pairs: Spearman and Pearson correlation of cosine similarity with the scores of scored pairs
(sentence-transformers' ``spearman_cosine``, ``pearson_cosine``); retrieval metrics on unscored pairs (each anchor
searches the positives, its own being the relevant one); and any evaluation at every Matryoshka dimension."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import stats

from executor.tuning.data.sources import Item
from executor.tuning.errors import DataError
from executor.tuning.evaluation.evaluator import Embedder, Evaluation, Evaluator
from executor.tuning.evaluation.judged import RelevanceEvaluator
from executor.tuning.inputs.base import DOCUMENT, QUERY
from executor.tuning.matryoshka import matryoshka_sizes, truncate


class ScoredPairEvaluator:
    """``spearman_cosine`` and ``pearson_cosine`` between the cosine similarity of each pair's two sentences and its
    score."""

    monitor = 'spearman_cosine'

    def __init__(self, pairs: Sequence[Item]) -> None:
        unscored = [it.name for it in pairs if it.score is None or it.columns is None or len(it.columns) != 2]
        if unscored:
            raise DataError(f'{unscored[0]} is not a scored pair: this evaluation takes sentence1,sentence2,score rows')
        if len(pairs) < 3:
            raise DataError(f'correlation needs at least 3 scored pairs, got {len(pairs)}')
        self.pairs = list(pairs)
        self.scores = np.array([it.score for it in pairs], dtype=np.float64)
        if np.ptp(self.scores) == 0:
            raise DataError(f'every evaluation pair has the score {self.scores[0]}: a correlation needs varied scores')

    def __call__(self, embedder: Embedder) -> Evaluation:
        first = embedder.embed_items(column_items(self.pairs, 0))  # (N, D)
        second = embedder.embed_items(column_items(self.pairs, 1))
        return Evaluation(self.metrics(_numpy(first), _numpy(second)), first, second)

    def metrics(self, first: np.ndarray, second: np.ndarray) -> dict[str, float]:
        first = first / np.maximum(np.linalg.norm(first, axis=1, keepdims=True), 1e-12)
        second = second / np.maximum(np.linalg.norm(second, axis=1, keepdims=True), 1e-12)
        cosine = (first * second).sum(axis=1)
        return {
            'spearman_cosine': float(stats.spearmanr(cosine, self.scores).statistic),
            'pearson_cosine': float(stats.pearsonr(cosine, self.scores).statistic),
        }


def column_items(pairs: Sequence[Item], column: int) -> list[Item]:
    """One column of pair items as single text items (named by their row and column)."""
    shown = column + 1
    return [Item(id=f'{it.id}:{shown}', text=it.columns[column], name=f'{it.name} column {shown}') for it in pairs]


def pair_retrieval(pairs: Sequence[Item], limit: int) -> Evaluator:
    """Anchors as queries and positives (and negatives, as distractors) as the index; relevant: the same row. The
    anchors take the query prompt and the rest the document prompt, as in training (``dataset.column_prompt``)."""
    rows = list(enumerate(pairs))
    query = [Item(id=f'q{i}', text=it.columns[0], label=str(i), name=f'{it.name} column 1') for i, it in rows]
    index = [Item(id=f'p{i}', text=it.columns[1], label=str(i), name=f'{it.name} column 2') for i, it in rows]
    index += [
        Item(id=f'n{i}:{c}', text=it.columns[c], label=f'negative {i}:{c}', name=f'{it.name} column {c + 1}')
        for i, it in rows
        for c in range(2, len(it.columns))
    ]
    return Evaluator(query, index, limit, retrieval=True, accuracy=False, prompts=(QUERY, DOCUMENT))


def evaluator_for(
    query: Sequence[Item],
    index: Sequence[Item] | None,
    limit: int,
    dims: Sequence[int] | None = None,
    accuracy: bool = True,
) -> Evaluator | ScoredPairEvaluator | RelevanceEvaluator | MatryoshkaEvaluator:
    """The evaluator the data calls for: judged queries (``Item.relevant``) -> BEIR's metrics searching the corpus;
    scored pairs -> correlations; pairs/triplets -> retrieval of each anchor's
    positive; labelled items -> retrieval (and accuracy) as ``Evaluator``; at every dim of ``dims`` too."""
    if query and query[0].relevant is not None:
        if index is None:
            raise DataError('judged queries search a corpus: give the corpus with them (a BEIR folder, or documents)')
        evaluator = RelevanceEvaluator(query, index)
    elif query and query[0].columns is not None:
        if index is not None:
            raise DataError('pairs are evaluated on their own: give them as eval_data (or data), without index_data')
        evaluator = ScoredPairEvaluator(query) if query[0].score is not None else pair_retrieval(query, limit)
    else:
        evaluator = Evaluator(query, index, limit, accuracy=accuracy)
    return MatryoshkaEvaluator(evaluator, dims) if dims else evaluator


#: the metrics repeated at each Matryoshka dimension (the full size has them all)
SLICE_METRICS = ('spearman_cosine', 'pearson_cosine', 'ndcg@10', 'mrr@10', 'recall@10', 'hit@1', 'recall@100')


class MatryoshkaEvaluator:
    """An evaluation at the full size and at each leading slice of the embedding (``<metric>_dim<d>``, for the
    ``SLICE_METRICS``); the items are embedded once."""

    def __init__(self, evaluator: Evaluator | ScoredPairEvaluator | RelevanceEvaluator, dims: Sequence[int]) -> None:
        # a dim given twice is evaluated once
        self.evaluator, self.dims = evaluator, [dim for dim, _ in matryoshka_sizes(sorted(set(dims)))]
        self.monitor = getattr(evaluator, 'monitor', None)

    def __call__(self, embedder: Embedder) -> Evaluation:
        cached = _Memo(embedder)
        result = self.evaluator(cached)
        for dim in self.dims:
            if dim >= cached.width:
                continue
            sliced = self.evaluator(_Sliced(cached, dim))
            result.metrics.update(
                {f'{name}_dim{dim}': value for name, value in sliced.metrics.items() if name in SLICE_METRICS}
            )
        return result


class _Memo:
    def __init__(self, embedder: Embedder) -> None:
        self.embedder, self.class_names, self.cache, self.width = embedder, embedder.class_names, {}, 0

    def embed_items(self, items: Sequence[Item], prompt_name: str | None = None) -> np.ndarray:
        # the items are kept with their embeddings, so no id is reused meanwhile
        key = (prompt_name, *(id(it) for it in items))
        if key not in self.cache:
            self.cache[key] = (list(items), _numpy(self.embedder.embed_items(items, prompt_name)))
            self.width = self.cache[key][1].shape[1]
        return self.cache[key][1]

    def classify_items(self, items: Sequence[Item]) -> np.ndarray:
        return _numpy(self.embedder.classify_items(items))


class _Sliced:
    """The embeddings ``truncate``d to ``dim`` (how a Matryoshka model is served)."""

    def __init__(self, embedder: _Memo, dim: int) -> None:
        self.embedder, self.dim, self.class_names = embedder, dim, None

    def embed_items(self, items: Sequence[Item], prompt_name: str | None = None) -> np.ndarray:
        return truncate(self.embedder.embed_items(items, prompt_name), self.dim)


def _numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
