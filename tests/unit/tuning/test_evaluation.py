"""Retrieval/classification metrics against values worked out by hand, and kNN against a numpy brute force."""

from __future__ import annotations

import logging
from math import log2

import numpy as np
import pytest
import torch

from executor.tuning.evaluation import (
    ALIASES,
    DEFAULT_MONITOR,
    RETRIEVAL_METRICS,
    classification_metrics,
    knn,
    knn_accuracy,
    metric_mode,
    ranking_metrics,
    retrieval_metrics,
)


def assert_metrics(got: dict[str, float], expected: dict[str, float]) -> None:
    assert list(got) == [*RETRIEVAL_METRICS, *ALIASES]
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-9), name


# --- ranking metrics from relevance flags -----------------------------------------------------------------------


def test_ranking_metrics_by_hand():
    # 12 candidates, top 10 retrieved, limit (k) = 3.
    relevance = np.array(
        [
            [1, 0, 1, 0, 0, 0, 0, 0, 0, 1],  # q0: R = 4, one relevant item is not in the top 10
            [0, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # q1: R = 1
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # q2: R = 0 -> left out of every average
        ],
        dtype=bool,
    )
    got = ranking_metrics(relevance, [4, 1, 0], limit=3, num_candidates=12)
    # q0 @3: hits 2 (ranks 1, 3)          q1 @3: hits 1 (rank 2)
    # precision   2/3                     1/3
    # recall      2/4                     1/1
    # f1          2*(2/3)(1/2)/(7/6)=4/7  2*(1/3)(1)/(4/3)=1/2
    # hit         1                       1
    # AP@3        (1/1 + 2/3) / min(3,4)  (1/2) / min(3,1)
    # RR          1                       1/2
    # DCG@3       1/log2(2) + 1/log2(4)   1/log2(3)
    # IDCG@3      3 ideal: 1 + 1/log2(3) + 1/2     1 ideal: 1
    # r_precision r=min(4,3)=3: 2/3       r=1: top 1 is not relevant: 0
    dcg0, dcg1 = 1 + 1 / 2, 1 / log2(3)
    # @10 (aliases): q0 hits 3 (ranks 1, 3, 10), q1 hits 1 (rank 2)
    # hit@1: q0 1, q1 0.  recall@10: q0 3/4, q1 1.  mrr@10 as RR.
    # ndcg@10: q0 DCG = 1 + 1/2 + 1/log2(11), IDCG (4 ideal) = 1 + 1/log2(3) + 1/2 + 1/log2(5); q1 as @3.
    # map@10: q0 (1 + 2/3 + 3/10) / min(10, 4); q1 (1/2) / 1.
    ndcg10_q0 = (1 + 1 / 2 + 1 / log2(11)) / (1 + 1 / log2(3) + 1 / 2 + 1 / log2(5))
    assert_metrics(
        got,
        {
            'precision_at_k': (2 / 3 + 1 / 3) / 2,
            'recall_at_k': (2 / 4 + 1) / 2,
            'f1_score_at_k': (4 / 7 + 1 / 2) / 2,
            'hit_at_k': 1.0,
            'average_precision': ((1 + 2 / 3) / 3 + 1 / 2) / 2,
            'reciprocal_rank': (1 + 1 / 2) / 2,
            'dcg_at_k': (dcg0 + dcg1) / 2,
            'ndcg_at_k': (dcg0 / (1 + 1 / log2(3) + 1 / 2) + dcg1 / 1) / 2,
            'r_precision': (2 / 3 + 0) / 2,
            'hit@1': (1 + 0) / 2,
            'hit@5': 1.0,
            'hit@10': 1.0,
            'recall@10': (3 / 4 + 1) / 2,
            'mrr@10': (1 + 1 / 2) / 2,
            'ndcg@10': (ndcg10_q0 + dcg1) / 2,
            'map@10': ((1 + 2 / 3 + 3 / 10) / 4 + 1 / 2) / 2,
        },
    )


def test_ranking_metrics_k_larger_than_index():
    # 3 candidates, all returned; limit = 5 > 3. Ranked: [no, yes, yes], R = 2.
    got = ranking_metrics(np.array([[0, 1, 1]]), [2], limit=5)
    # precision: 2 relevant / 3 returned (min(5, 3)); recall 2/2; f1 2*(2/3)(1)/(5/3) = 4/5
    # AP: (P@2 + P@3) / min(3, 2) = (1/2 + 2/3) / 2 = 7/12; RR = 1/2
    # DCG = 1/log2(3) + 1/log2(4); IDCG (2 ideal) = 1 + 1/log2(3)
    # r_precision: r = min(R=2, limit=5) = 2 -> 1 of the top 2 -> 1/2
    dcg = 1 / log2(3) + 1 / 2
    ndcg = dcg / (1 + 1 / log2(3))
    assert_metrics(
        got,
        {
            'precision_at_k': 2 / 3,
            'recall_at_k': 1.0,
            'f1_score_at_k': 4 / 5,
            'hit_at_k': 1.0,
            'average_precision': 7 / 12,
            'reciprocal_rank': 1 / 2,
            'dcg_at_k': dcg,
            'ndcg_at_k': ndcg,
            'r_precision': 1 / 2,
            'hit@1': 0.0,
            'hit@5': 1.0,
            'hit@10': 1.0,
            'recall@10': 1.0,
            'mrr@10': 1 / 2,
            'ndcg@10': ndcg,
            'map@10': 7 / 12,
        },
    )


def test_ranking_metrics_rejects_inconsistent_input():
    with pytest.raises(ValueError, match='none of the 1 queries has a relevant item'):
        ranking_metrics(np.zeros((1, 3), bool), [0])
    with pytest.raises(ValueError, match='needs 10'):
        ranking_metrics(np.ones((1, 5), bool), [5], limit=3, num_candidates=20)
    with pytest.raises(ValueError, match='num_relevant must count every relevant'):
        ranking_metrics(np.ones((1, 3), bool), [2])
    with pytest.raises(ValueError, match='limit must be a positive integer'):
        ranking_metrics(np.ones((1, 3), bool), [3], limit=0)


# --- retrieval metrics end to end -------------------------------------------------------------------------------


def test_retrieval_metrics_self_search_by_hand(caplog):
    # Points on a line, euclidean, searched among themselves (a query never matches itself), limit = 2.
    emb = np.array([[0.0], [1.0], [3.0], [10.0]], dtype=np.float32)
    labels = ['a', 'b', 'a', 'c']
    # q0 (x=0, a): 1 (d=1, b), 2 (d=3, a), 3 (d=10, c) -> [0, 1, 0], R = 1
    # q1 (x=1, b): no other b -> R = 0, left out;  q3 (x=10, c): likewise
    # q2 (x=3, a): 1 (d=2, b), 0 (d=3, a), 3 (d=7, c) -> [0, 1, 0], R = 1
    # Both kept queries: precision@2 1/2, recall 1, f1 2*(1/2)(1)/(3/2) = 2/3, hit 1, AP (1/2)/min(2,1) = 1/2,
    # RR 1/2, DCG 1/log2(3), IDCG 1, r_precision: top 1 -> 0, hit@1 0.
    expected = {
        'precision_at_k': 1 / 2,
        'recall_at_k': 1.0,
        'f1_score_at_k': 2 / 3,
        'hit_at_k': 1.0,
        'average_precision': 1 / 2,
        'reciprocal_rank': 1 / 2,
        'dcg_at_k': 1 / log2(3),
        'ndcg_at_k': 1 / log2(3),
        'r_precision': 0.0,
        'hit@1': 0.0,
        'hit@5': 1.0,
        'hit@10': 1.0,
        'recall@10': 1.0,
        'mrr@10': 1 / 2,
        'ndcg@10': 1 / log2(3),
        'map@10': 1 / 2,
    }
    with caplog.at_level(logging.WARNING, logger='executor.tuning.evaluation'):
        assert_metrics(retrieval_metrics(emb, labels, limit=2, metric='euclidean'), expected)
    assert '2 of 4 queries have no relevant item' in caplog.text
    assert_metrics(retrieval_metrics(emb, labels, emb, labels, limit=2, metric='euclidean'), expected)
    copy = emb.copy()
    assert_metrics(
        retrieval_metrics(emb, labels, copy, labels, limit=2, metric='euclidean', exclude_self=True), expected
    )
    # Without exclude_self on a copy, each query finds itself first: hit@1 = 1 for every kept query.
    assert retrieval_metrics(emb, labels, copy, labels, limit=2, metric='euclidean')['hit@1'] == 1.0


def test_retrieval_metrics_ties_go_to_the_lower_index():
    # Query at 0 (label a). Index: 0 x=2 (a), 1 x=1 (b), 2 x=-1 (a), 3 x=3 (a), 4 x=1 (a).
    # Distances 2, 1, 1, 3, 1: the tie at 1 is ranked 1, 2, 4 -> order [1, 2, 4, 0, 3] -> rel [0, 1, 1, 1, 1].
    index = np.array([[2.0], [1.0], [-1.0], [3.0], [1.0]], dtype=np.float32)
    got = retrieval_metrics(np.zeros((1, 1), np.float32), ['a'], index, list('abaaa'), limit=2, metric='euclidean')
    # limit 2: hits 1 of 2; R = 4 -> recall 1/4; AP (1/2) / min(2, 4); hit@1 = 0; mrr 1/2
    # ndcg@2: DCG 1/log2(3), IDCG 1 + 1/log2(3)
    assert got['precision_at_k'] == pytest.approx(1 / 2)
    assert got['recall_at_k'] == pytest.approx(1 / 4)
    assert got['average_precision'] == pytest.approx(1 / 4)
    assert got['hit@1'] == 0.0
    assert got['ndcg_at_k'] == pytest.approx((1 / log2(3)) / (1 + 1 / log2(3)))
    # recall@10 over all 5: 4/4; map@10: (1/2 + 2/3 + 3/4 + 4/5) / 4
    assert got['recall@10'] == pytest.approx(1.0)
    assert got['map@10'] == pytest.approx((1 / 2 + 2 / 3 + 3 / 4 + 4 / 5) / 4)


def test_retrieval_metrics_input_errors():
    emb = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match='one label per embedding'):
        retrieval_metrics(emb, ['a', 'b'])
    with pytest.raises(ValueError, match='index_emb given without index_labels'):
        retrieval_metrics(emb, list('abc'), emb.copy())
    with pytest.raises(ValueError, match='item 1 has no label'):
        retrieval_metrics(emb, ['a', None, 'a'])
    with pytest.raises(ValueError, match='labels differ'):
        retrieval_metrics(emb, list('aab'), emb.copy(), list('aba'), exclude_self=True)


# --- kNN ---------------------------------------------------------------------------------------------------------


def brute_force(queries: np.ndarray, index: np.ndarray, k: int, metric: str, exclude_self: bool):
    q, x = queries.astype(np.float64), index.astype(np.float64)
    if metric == 'cosine':
        scores = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (x / np.linalg.norm(x, axis=1, keepdims=True)).T
    else:
        scores = -np.linalg.norm(q[:, None, :] - x[None, :, :], axis=2)
    if exclude_self:
        np.fill_diagonal(scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind='stable')[:, :k]  # stable: ties by lower index
    top = np.take_along_axis(scores, order, axis=1)
    return (top if metric == 'cosine' else -top), order


@pytest.mark.parametrize('metric', ['cosine', 'euclidean'])
@pytest.mark.parametrize('exclude_self', [False, True])
def test_knn_matches_brute_force(metric, exclude_self):
    rng = np.random.default_rng(0)
    index = rng.standard_normal((53, 16)).astype(np.float32)
    queries = index if exclude_self else rng.standard_normal((37, 16)).astype(np.float32)
    want_scores, want_idx = brute_force(queries, index, 7, metric, exclude_self)
    for q_chunk, i_chunk in [(8, 16), (5, 3), (100, 100)]:
        scores, idx = knn(
            queries, index, 7, metric, exclude_self=exclude_self, query_chunk=q_chunk, index_chunk=i_chunk, device='cpu'
        )
        np.testing.assert_array_equal(idx.numpy(), want_idx)
        np.testing.assert_allclose(scores.numpy(), want_scores, atol=1e-5)


def test_knn_euclidean_self_distance_is_exact():
    x = np.random.default_rng(1).standard_normal((20, 32)).astype(np.float32) * 10
    scores, idx = knn(x, x, 1, 'euclidean', device='cpu')
    np.testing.assert_array_equal(idx[:, 0].numpy(), np.arange(20))
    np.testing.assert_allclose(scores.numpy(), 0.0, atol=1e-6)


@pytest.mark.parametrize('index_chunk', [1, 2, 4, 16])
def test_knn_ties_break_by_lower_index(index_chunk):
    # Rows 0, 2, 3 and 5 equal the query; 1 and 4 are orthogonal. k = 2 cuts through the tie inside a chunk.
    v, w = [1.0, 0.0], [0.0, 1.0]
    index = torch.tensor([v, w, v, v, w, v])
    scores, idx = knn(torch.tensor([v, w]), index, 2, index_chunk=index_chunk, device='cpu')
    assert idx.tolist() == [[0, 2], [1, 4]]
    assert scores.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    _, idx = knn(torch.tensor([v]), index, 6, index_chunk=index_chunk, device='cpu')
    assert idx.tolist() == [[0, 2, 3, 5, 1, 4]]


def test_knn_caps_k_at_the_candidates_and_handles_zero_vectors():
    index = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    scores, idx = knn(index, index, 10, exclude_self=True, device='cpu')
    assert idx.shape == (3, 2)
    assert idx.tolist() == [[1, 2], [0, 2], [0, 1]]  # the zero vector scores 0 against everything
    assert scores.tolist() == [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]


def test_knn_input_errors():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match='dimension 2 but the index has 3'):
        knn(np.ones((2, 2), np.float32), x, 1)
    with pytest.raises(ValueError, match="unknown metric 'dot'"):
        knn(x, x, 1, 'dot')
    with pytest.raises(ValueError, match='k must be a positive integer'):
        knn(x, x, 0)
    with pytest.raises(ValueError, match='same set, got 2 queries and 4 index rows'):
        knn(x[:2], x, 1, exclude_self=True)
    with pytest.raises(ValueError, match='non-empty 2-D'):
        knn(np.ones(3, np.float32), x, 1)
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match='index row 2 holds NaN'):
        knn(x, bad, 1, index_chunk=2, device='cpu')


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_knn_on_cuda_matches_cpu():
    rng = np.random.default_rng(2)
    index = rng.standard_normal((300, 64)).astype(np.float32)
    queries = rng.standard_normal((50, 64)).astype(np.float32)
    for metric in ('cosine', 'euclidean'):
        cpu_scores, cpu_idx = knn(queries, index, 10, metric, device='cpu')
        gpu_scores, gpu_idx = knn(queries, index, 10, metric, index_chunk=128, device='cuda')
        np.testing.assert_array_equal(gpu_idx.numpy(), cpu_idx.numpy())
        np.testing.assert_allclose(gpu_scores.numpy(), cpu_scores.numpy(), atol=1e-4)


# --- classification ----------------------------------------------------------------------------------------------


def test_classification_metrics_by_hand():
    names = ['cat', 'dog', 'fox', 'owl']
    labels = [0, 0, 1, 1, 2]
    preds = [0, 1, 1, 1, 0]
    # correct: items 0, 2, 3 -> 3/5. cat: 1 of 2, dog: 2 of 2, fox: 0 of 1, owl: no item -> no key.
    metrics, confusion = classification_metrics(np.array(preds), labels, names)
    assert metrics == {'accuracy': 3 / 5, 'accuracy/cat': 1 / 2, 'accuracy/dog': 1.0, 'accuracy/fox': 0.0}
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    logits = torch.nn.functional.one_hot(torch.tensor(preds), 4).float() * 3 - 1
    assert classification_metrics(logits, [names[i] for i in labels], names)[0] == metrics


def test_classification_metrics_errors():
    with pytest.raises(ValueError, match=r"labels \['emu'\] are not among the class names"):
        classification_metrics(np.array([0]), ['emu'], ['cat'])
    with pytest.raises(ValueError, match='3 columns but there are 2 class names'):
        classification_metrics(np.zeros((1, 3)), [0], ['a', 'b'])
    with pytest.raises(ValueError, match='2 predictions but 1 labels'):
        classification_metrics(np.array([0, 1]), [0], ['a', 'b'])


def test_knn_accuracy_by_hand():
    points = np.array([[0.0], [0.1], [0.2], [5.0], [5.1], [5.2]], dtype=np.float32)
    # k = 3, labels a a b b b b:
    # 0.0 (a): 0.1 a, 0.2 b, 5.0 b -> b, wrong;  0.1 (a): 0.0 a, 0.2 b, 5.0 b -> b, wrong
    # 0.2 (b): 0.1 a, 0.0 a, 5.0 b -> a, wrong;  5.0, 5.1, 5.2 (b): b b b / b b b / b b b -> right  => 3/6
    assert knn_accuracy(points, list('aabbbb'), k=3, metric='euclidean') == pytest.approx(3 / 6)
    # k = 2, labels a a a b b b: 0.2 (a): 0.1 a, 0.0 a; 5.0 (b): 5.1 b, 5.2 b ... all right
    assert knn_accuracy(points, list('aaabbb'), k=2, metric='euclidean') == 1.0
    # Tied vote, k = 2, labels a b b a a a: 0.0 (a): 0.1 b, 0.2 b -> b wrong; 0.1 (b): 0.0 a, 0.2 b -> tie,
    # nearest (a) wins -> wrong; 0.2 (b): 0.1 b, 0.0 a -> tie, nearest b -> right; 5.x (a): a a -> right => 4/6
    assert knn_accuracy(points, list('abbaaa'), k=2, metric='euclidean') == pytest.approx(4 / 6)


def test_metric_modes():
    assert metric_mode(DEFAULT_MONITOR) == 'max'
    assert all(metric_mode(name) == 'max' for name in [*RETRIEVAL_METRICS, *ALIASES, 'accuracy', 'accuracy/cat'])
    assert metric_mode('val_loss') == metric_mode('loss') == metric_mode('eval_loss') == 'min'
    with pytest.raises(ValueError, match="unknown metric 'speed'"):
        metric_mode('speed')


def test_ranking_metrics_match_a_plain_loop_reference():
    rng = np.random.default_rng(3)
    relevance = rng.random((40, 12)) < 0.3
    num_relevant = relevance.sum(axis=1) + rng.integers(0, 3, 40)  # some relevant items were not retrieved
    num_relevant[num_relevant == 0] = 1
    limit = 6
    got = ranking_metrics(relevance, num_relevant, limit, num_candidates=30)

    def one(rel, big_r, k):
        top = rel[:k]
        hits = top.sum()
        p, r = hits / k, hits / big_r
        ideal = sum(1 / log2(i + 2) for i in range(min(k, big_r)))
        dcg = sum(1 / log2(i + 2) for i in range(k) if top[i])
        ranks = [i + 1 for i in range(k) if top[i]]
        return {
            'precision_at_k': p,
            'recall_at_k': r,
            'f1_score_at_k': 2 * p * r / (p + r) if hits else 0.0,
            'hit_at_k': float(hits > 0),
            'average_precision': sum(rel[:i].sum() / i for i in ranks) / min(k, big_r),
            'reciprocal_rank': 1 / ranks[0] if ranks else 0.0,
            'dcg_at_k': dcg,
            'ndcg_at_k': dcg / ideal,
            'r_precision': rel[: min(big_r, limit)].sum() / min(big_r, limit),
        }

    rows = [one(rel, big_r, limit) for rel, big_r in zip(relevance, num_relevant)]
    for name in RETRIEVAL_METRICS:
        assert got[name] == pytest.approx(np.mean([row[name] for row in rows])), name
    for alias, (name, cutoff) in ALIASES.items():
        want = np.mean([one(rel, big_r, cutoff)[name] for rel, big_r in zip(relevance, num_relevant)])
        assert got[alias] == pytest.approx(want), alias
