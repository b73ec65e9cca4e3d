"""BEIR's metrics on relevance judgements (evaluation/judged.py) against pytrec_eval (trec_eval's own code), on
hand-made runs and on a real model's search, to 1e-6."""

from __future__ import annotations

import random

import numpy as np
import pytest
import pytrec_eval
import torch

from executor.tuning.data.sources import Item
from executor.tuning.errors import DataError
from executor.tuning.evaluation import ModelEmbedder, evaluator_for
from executor.tuning.evaluation.judged import JUDGED_METRICS, RelevanceEvaluator, judged_metrics
from executor.tuning.models import build_model

TREC = {
    'ndcg@10': 'ndcg_cut_10',
    'map@100': 'map_cut_100',
    'recall@10': 'recall_10',
    'recall@100': 'recall_100',
    'precision@10': 'P_10',
}


def reference(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
    """pytrec_eval's means of BEIR's metrics; mrr@10 as BEIR computes it, trec_eval's recip_rank of the top 10."""
    top = {q: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:100]) for q, docs in run.items()}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {'ndcg_cut.10', 'map_cut.100', 'recall.10,100', 'P.10'}).evaluate(
        top
    )
    first10 = {q: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:10]) for q, docs in run.items()}
    reciprocal = pytrec_eval.RelevanceEvaluator(qrels, {'recip_rank'}).evaluate(first10)
    means = {ours: float(np.mean([m[trec] for m in per_query.values()])) for ours, trec in TREC.items()}
    means['mrr@10'] = float(np.mean([m['recip_rank'] for m in reciprocal.values()]))
    return means


def ranked(run: dict[str, dict[str, float]]) -> list[list[str]]:
    return [sorted(docs, key=lambda d: -docs[d])[:100] for docs in run.values()]


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_hand_made_graded_runs_equal_pytrec_eval(seed):
    """Graded judgements (0-3), queries with more relevant documents than 10 and than retrieved, a query judged only
    0, a query whose relevant documents are never retrieved."""
    rng = random.Random(seed)
    docs = [f'd{i}' for i in range(400)]
    qrels, run = {}, {}
    for q in range(60):
        judged = rng.sample(docs, rng.choice([1, 3, 12, 150]))
        qrels[f'q{q}'] = {d: rng.choice([0, 1, 1, 2, 3]) for d in judged}
        run[f'q{q}'] = {d: rng.random() for d in rng.sample(docs, rng.choice([5, 60, 200]))}
    qrels['q0'] = {d: 0 for d in docs[:5]}  # judged, none relevant
    qrels['q1'] = {'d399': 2}
    run['q1'] = {d: rng.random() for d in docs[:50]}  # its relevant one is never retrieved
    ours = judged_metrics(ranked(run), [{d: float(g) for d, g in qrels[q].items()} for q in run])
    expected = reference(qrels, run)
    assert set(ours) == set(JUDGED_METRICS)
    for name in JUDGED_METRICS:
        assert ours[name] == pytest.approx(expected[name], abs=1e-6), name


def test_a_hand_checked_query():
    """One query, results d1 (grade 2), d2 (0), d3 (1); the judgements also grade d4 = 3, never retrieved."""
    ours = judged_metrics([['d1', 'd2', 'd3']], [{'d1': 2.0, 'd3': 1.0, 'd4': 3.0, 'd2': 0.0}])
    dcg = 2 / np.log2(2) + 1 / np.log2(4)
    idcg = 3 / np.log2(2) + 2 / np.log2(3) + 1 / np.log2(4)
    assert ours['ndcg@10'] == pytest.approx(dcg / idcg)
    assert ours['mrr@10'] == 1.0
    assert ours['map@100'] == pytest.approx((1 / 1 + 2 / 3) / 3)
    assert ours['recall@10'] == pytest.approx(2 / 3)
    assert ours['precision@10'] == pytest.approx(0.2)  # P_10 divides by 10 whatever was retrieved


SENTENCES = {
    'd0': 'Ants live in colonies ruled by a single egg-laying queen.',
    'd1': 'Worker ants forage for food and defend the nest.',
    'd2': 'Honey bees store nectar in wax combs as honey.',
    'd3': 'A bee colony swarms when a new queen is raised.',
    'd4': 'The volcano erupted, covering the town in ash.',
    'd5': 'Lava flows cooled into black basalt fields.',
    'd6': 'The central bank raised interest rates again.',
    'd7': 'Inflation fell as energy prices dropped.',
    'd8': 'The striker scored twice in the final minutes.',
    'd9': 'The goalkeeper saved a penalty in extra time.',
    'd10': 'Photosynthesis turns light into chemical energy.',
    'd11': 'Chlorophyll absorbs red and blue light.',
}
QUERIES = {
    'q0': ('who rules an ant colony?', {'d0': 2, 'd1': 1}),
    'q1': ('how do bees make honey?', {'d2': 2, 'd3': 1}),
    'q2': ('what happens when a volcano erupts?', {'d4': 1, 'd5': 1}),
    'q3': ('why did interest rates change?', {'d6': 2, 'd7': 1}),
    'q4': ('who won the football match?', {'d8': 1, 'd9': 1, 'd0': 0}),
    'q5': ('how do plants use sunlight?', {'d10': 2, 'd11': 2}),
    'q6': ('an unjudged query about the weather', {}),
}


@pytest.fixture(scope='module')
def minilm():
    return build_model('all-MiniLM-L6-v2')


def test_a_real_models_search_equals_pytrec_eval(minilm):
    """The evaluator's own ranking of the real model's embeddings, scored again by pytrec_eval on the full cosine
    matrix of those embeddings."""
    corpus = [Item(id=d, text=t, name=d) for d, t in SENTENCES.items()]
    queries = [
        Item(id=q, text=t, name=q, relevant={d: float(g) for d, g in rel.items()}) for q, (t, rel) in QUERIES.items()
    ]
    evaluation = evaluator_for(queries, corpus, 20)(ModelEmbedder(minilm, torch.device('cpu')))
    q = torch.nn.functional.normalize(torch.as_tensor(evaluation.query_embeddings), dim=1)
    c = torch.nn.functional.normalize(torch.as_tensor(evaluation.index_embeddings), dim=1)
    judged = [name for name in QUERIES if QUERIES[name][1]]
    cosine = (q @ c.T).tolist()
    run = {name: dict(zip(SENTENCES, cosine[i])) for i, name in enumerate(judged)}
    expected = reference({name: QUERIES[name][1] for name in judged}, run)
    for name in JUDGED_METRICS:
        assert evaluation.metrics[name] == pytest.approx(expected[name], abs=1e-6), name
    assert evaluation.metrics['queries_judged'] == 6 and evaluation.metrics['queries_unjudged'] == 1
    assert evaluation.metrics['ndcg@10'] > 0.8  # the pre-trained model finds these easily: the search is real


def test_bad_judgements_are_refused():
    corpus = [Item(id='d1', text='a'), Item(id='d2', text='b')]
    with pytest.raises(DataError, match=r"judged on \['d9'\], which are not in the corpus"):
        RelevanceEvaluator([Item(id='q', text='q', relevant={'d9': 1.0})], corpus)
    with pytest.raises(DataError, match='none of the 1 queries has a judgement'):
        RelevanceEvaluator([Item(id='q', text='q', relevant={})], corpus)
    with pytest.raises(DataError, match='share an id'):
        RelevanceEvaluator([Item(id='q', text='q', relevant={'d1': 1.0})], [*corpus, Item(id='d1', text='c')])
