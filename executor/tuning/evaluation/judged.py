"""Search measured on relevance judgements, as BEIR and MTEB measure it: each judged query searches the whole corpus
(exact kNN, the corpus embedded once), and its ranking is scored against its judgements (doc id -> grade).

The metrics are trec_eval's (and so pytrec_eval's, which the tests check them against), at BEIR's cutoffs. For a
query with ranked results r_1..r_k, grades g(r_i) (0 where not judged), relevant meaning a grade > 0, and R its
number of relevant documents in the whole corpus:

- ``ndcg@10`` = DCG@10 / IDCG@10, DCG@10 = sum_{i<=10} g(r_i) / log2(i + 1) with linear gain (trec_eval's
  ``ndcg_cut_10``), IDCG@10 the DCG of the best possible ranking of the query's judged grades;
- ``mrr@10``: 1 / the rank of the first relevant result within the first 10 (0 when none);
- ``map@100`` = sum_{i<=100, r_i relevant} P@i / R (``map_cut_100``);
- ``recall@10``, ``recall@100``: relevant results in the first k / R;
- ``precision@10``: relevant results in the first 10 / 10 (``P_10``: a corpus smaller than 10 does not raise it).

A query whose judgements are all 0 scores 0 (as trec_eval scores it). Queries that a split does not judge are left
out and counted (``queries_unjudged``); ``queries_judged`` counts those measured. Each metric is the mean over queries.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from executor.tuning.data.sources import Item
from executor.tuning.errors import DataError
from executor.tuning.evaluation.evaluator import Embedder, Evaluation
from executor.tuning.evaluation.knn import knn
from executor.tuning.inputs.base import DOCUMENT, QUERY

logger = logging.getLogger(__name__)

JUDGED_METRICS = ('ndcg@10', 'mrr@10', 'map@100', 'recall@10', 'recall@100', 'precision@10')
DEPTH = 100  # the deepest cutoff: how many results each query retrieves


def judged_metrics(ranked: Sequence[Sequence[str]], judgements: Sequence[dict[str, float]]) -> dict[str, float]:
    """The mean of each of ``JUDGED_METRICS`` over the queries: ``ranked[q]``, query q's result ids best first;
    ``judgements[q]``, its grades by doc id."""
    if len(ranked) != len(judgements):
        raise ValueError(f'{len(ranked)} rankings but {len(judgements)} judgements; give one of each per query')
    if not ranked:
        raise DataError('no judged query to evaluate')
    depth = max(DEPTH, max(len(r) for r in ranked))
    grades = np.zeros((len(ranked), depth))  # (Q, depth): the grade of each query's i-th result
    for q, (results, judged) in enumerate(zip(ranked, judgements)):
        grades[q, : len(results)] = [judged.get(doc, 0.0) for doc in results]
    grades = np.maximum(grades, 0.0)  # a negative grade counts as not relevant, as in trec_eval's gain
    relevant = grades > 0
    num_relevant = np.array([sum(g > 0 for g in judged.values()) for judged in judgements], dtype=np.float64)
    ranks = np.arange(1, depth + 1)
    discount = 1.0 / np.log2(ranks + 1)

    ideal = np.zeros((len(ranked), 10))
    for q, judged in enumerate(judgements):
        best = sorted((g for g in judged.values() if g > 0), reverse=True)[:10]
        ideal[q, : len(best)] = best
    dcg = (grades[:, :10] * discount[:10]).sum(axis=1)
    idcg = (ideal * discount[:10]).sum(axis=1)
    ndcg = np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)

    top10 = relevant[:, :10]
    first = np.where(top10.any(axis=1), top10.argmax(axis=1) + 1, 0)
    mrr = np.divide(1.0, first, out=np.zeros(len(first)), where=first > 0)

    hits = np.cumsum(relevant[:, :DEPTH], axis=1)  # (Q, 100): relevant results within the first i
    precision_at = hits / ranks[:DEPTH]
    average_precision = np.divide(
        (precision_at * relevant[:, :DEPTH]).sum(axis=1),
        num_relevant,
        out=np.zeros(len(ranked)),
        where=num_relevant > 0,
    )

    def recall(k: int) -> np.ndarray:
        return np.divide(hits[:, k - 1], num_relevant, out=np.zeros(len(ranked)), where=num_relevant > 0)

    per_query = {
        'ndcg@10': ndcg,
        'mrr@10': mrr,
        'map@100': average_precision,
        'recall@10': recall(10),
        'recall@100': recall(100),
        'precision@10': hits[:, 9] / 10,
    }
    return {name: float(values.mean()) for name, values in per_query.items()}


class RelevanceEvaluator:
    """The ``JUDGED_METRICS`` of judged ``queries`` (``Item.relevant``) searching ``corpus``, and the counts of
    queries judged and left out. The corpus is embedded once per call."""

    monitor = 'ndcg@10'

    def __init__(self, queries: Sequence[Item], corpus: Sequence[Item]) -> None:
        if not corpus:
            raise DataError('relevance evaluation needs a corpus to search; the corpus is empty')
        ids = [doc.id for doc in corpus]
        if len(set(ids)) < len(ids):
            raise DataError('two corpus documents share an id; judgements name documents by id, so each needs its own')
        known = set(ids)
        judged = [q for q in queries if q.relevant]
        for query in judged:
            missing = sorted(set(query.relevant) - known)
            if missing:
                raise DataError(f'{query.name} is judged on {missing[:3]}, which are not in the corpus')
        self.unjudged = len(queries) - len(judged)  # queries with no judgement: left out, and counted
        if not judged:
            raise DataError(f'none of the {len(queries)} queries has a judgement; relevance evaluation needs some')
        self.queries, self.corpus, self.ids = judged, list(corpus), ids

    def __call__(self, embedder: Embedder) -> Evaluation:
        queries = embedder.embed_items(self.queries, QUERY)  # (Q, D), behind the model's query prompt if it has one
        corpus = embedder.embed_items(self.corpus, DOCUMENT)  # (N, D)
        _, indices = knn(_tensor(queries), _tensor(corpus), k=min(DEPTH, len(self.corpus)))
        ranked = [[self.ids[j] for j in row] for row in indices.tolist()]
        metrics = judged_metrics(ranked, [q.relevant for q in self.queries])
        metrics['queries_judged'] = float(len(self.queries))
        metrics['queries_unjudged'] = float(self.unjudged)
        return Evaluation(metrics, queries, corpus)


def _tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    return array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
