"""Pair, triplet and scored-pair losses: finite gradients, loop references, sentence-transformers parity, checks."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning.losses import ContrastiveLoss, MultiSimilarityLoss, NTXentLoss, TripletMarginLoss
from sentence_transformers.sentence_transformer.losses import CoSENTLoss as STCoSENTLoss
from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss as STCosineSimilarityLoss
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss as STMatryoshkaLoss
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as STMNRL
from torch import nn

from executor.tuning.matryoshka import MatryoshkaLoss
from executor.tuning.pair_losses import (
    PAIR_LOSSES,
    AtLeast,
    ColumnLoss,
    CoSENTLoss,
    CosineSimilarityLoss,
    MultipleNegativesRankingLoss,
    build_pair_loss,
    check_pair_data,
    loss_name,
)

B, D = 5, 8
TIED_SCORES = [0.5, 0.5, 1.0, 0.0, 0.5]
# A short step: the triplet losses average their non-zero terms, so a step that brings one to zero raises the
# mean of the rest (a step of 0.01 does so for ColumnLoss(TripletMarginLoss) on 2 columns here)
STEP = 1e-3


def make_columns(k: int, seed: int = 0, grad: bool = False) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(B, D, generator=generator).requires_grad_(grad) for _ in range(k)]


def rows(tensor: torch.Tensor) -> list[list[float]]:
    return tensor.detach().double().tolist()


def cos(u: list[float], v: list[float]) -> float:
    dot = sum(x * y for x, y in zip(u, v))
    return dot / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v)))


def unit(u: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in u))
    return [x / norm for x in u]


def euclid(u: list[float], v: list[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(u, v)))


def info_nce(queries: list[list[float]], candidates: list[list[float]], scale: float) -> float:
    """mean_i -log softmax_j(scale * cos(q_i, c_j))[i], in explicit loops."""
    total = 0.0
    for i, query in enumerate(queries):
        logits = [scale * cos(query, candidate) for candidate in candidates]
        total += -logits[i] + math.log(sum(math.exp(x) for x in logits))
    return total / len(queries)


def ref_mnrl(columns: list[list[list[float]]], scale: float = 20.0, symmetric: bool = False) -> float:
    candidates = [row for column in columns[1:] for row in column]
    forward = info_nce(columns[0], candidates, scale)
    return (forward + info_nce(columns[1], columns[0], scale)) / 2 if symmetric else forward


def ref_cosent(a: list[list[float]], b: list[list[float]], scores: list[float], scale: float = 20.0) -> float:
    sims = [scale * cos(u, v) for u, v in zip(a, b)]
    total = 1.0  # exp(0)
    for i in range(len(sims)):
        for j in range(len(sims)):
            if scores[i] > scores[j]:
                total += math.exp(sims[j] - sims[i])
    return math.log(total)


def ref_cosine_mse(a: list[list[float]], b: list[list[float]], scores: list[float]) -> float:
    return sum((cos(u, v) - y) ** 2 for u, v, y in zip(a, b, scores)) / len(scores)


def ref_triplets(triplets: list[tuple[list[float], list[float], list[float]]], margin: float = 0.05) -> float:
    """PML TripletMarginLoss defaults: L2-normalised, euclidean, relu(d_ap - d_an + margin), mean of the non-zero."""
    losses = [max(0.0, euclid(unit(a), unit(p)) - euclid(unit(a), unit(n)) + margin) for a, p, n in triplets]
    positive = [x for x in losses if x > 0]
    return sum(positive) / len(positive) if positive else 0.0


def scores_tensor(values: list[float] = TIED_SCORES) -> torch.Tensor:
    return torch.tensor(values)


class StandIn(nn.Module):
    """Enough of a SentenceTransformer for sentence-transformers' losses: features {'emb': x} embed to x."""

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {'sentence_embedding': features['emb']}

    def get_embedding_dimension(self) -> int:
        return D


LOSS_CASES = [
    (MultipleNegativesRankingLoss(), 2, False),
    (MultipleNegativesRankingLoss(), 3, False),
    (MultipleNegativesRankingLoss(symmetric=True), 3, False),
    (CoSENTLoss(), 2, True),
    (CosineSimilarityLoss(), 2, True),
    (ColumnLoss(TripletMarginLoss()), 3, False),
    (ColumnLoss(TripletMarginLoss()), 2, False),
    (ColumnLoss(MultiSimilarityLoss()), 3, False),
    (ColumnLoss(NTXentLoss()), 2, False),
    (MatryoshkaLoss(MultipleNegativesRankingLoss(), [8, 4, 2], [1.0, 0.5, 0.25]), 3, False),
    (MatryoshkaLoss(CoSENTLoss(), [4, 8]), 2, True),
]


@pytest.mark.parametrize(('loss', 'k', 'scored'), LOSS_CASES, ids=[f'{loss_name(c[0])}-{c[1]}' for c in LOSS_CASES])
def test_forward_backward_is_finite_and_a_step_against_the_gradient_lowers_the_loss(loss, k, scored):
    columns = make_columns(k, grad=True)
    scores = scores_tensor() if scored else None
    value = loss(columns, scores)
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value)
    for column in columns:
        assert column.grad is not None and torch.isfinite(column.grad).all()
    norm = torch.cat([column.grad for column in columns]).norm().item()
    with torch.no_grad():
        after = loss([column - STEP * column.grad / norm for column in columns], scores)
    # to first order the step lowers the loss by STEP * |grad| (measured: 0.999-1.0001 of it in every case)
    assert value.item() - after.item() > 0.5 * STEP * norm, (value.item(), after.item())


@pytest.mark.parametrize('k', [2, 3])
@pytest.mark.parametrize('symmetric', [False, True])
@pytest.mark.parametrize('scale', [20.0, 1.0])
def test_mnrl_matches_loop_reference(k, symmetric, scale):
    columns = make_columns(k, seed=1)
    ours = MultipleNegativesRankingLoss(scale=scale, symmetric=symmetric)(columns)
    assert ours.item() == pytest.approx(ref_mnrl([rows(c) for c in columns], scale, symmetric), abs=1e-5)


@pytest.mark.parametrize('values', [TIED_SCORES, [0.1, 0.9, 0.3, 0.7, 0.5], [0.2] * B])
def test_cosent_matches_loop_reference(values):
    a, b = make_columns(2, seed=2)
    ours = CoSENTLoss()([a, b], scores_tensor(values))
    assert ours.item() == pytest.approx(ref_cosent(rows(a), rows(b), values), abs=1e-5)
    if len(set(values)) == 1:
        assert ours.item() == pytest.approx(0.0, abs=1e-7)  # all tied: only the 0 term, log(1)


def test_cosine_similarity_matches_loop_reference():
    a, b = make_columns(2, seed=3)
    ours = CosineSimilarityLoss()([a, b], scores_tensor())
    assert ours.item() == pytest.approx(ref_cosine_mse(rows(a), rows(b), TIED_SCORES), abs=1e-5)


def test_matryoshka_mnrl_matches_loop_reference():
    columns = make_columns(3, seed=4)
    dims, weights = [8, 4, 2], [1.0, 0.5, 0.25]
    ours = MatryoshkaLoss(MultipleNegativesRankingLoss(), [2, 8, 4], [0.25, 1.0, 0.5])(columns)  # sorted inside
    expected = 0.0
    for dim, weight in zip(dims, weights):
        expected += weight * ref_mnrl([[row[:dim] for row in rows(c)] for c in columns])
    assert ours.item() == pytest.approx(expected, abs=1e-5)


def test_column_loss_triplets_match_loop_reference():
    anchors, positives, negatives = make_columns(3, seed=5)
    positives[0] = anchors[0] + 0.01  # an easy triplet: zero loss, left out of PML's average
    negatives[0] = -anchors[0]
    negatives[1] = anchors[1]  # a hard one: d_an = 0
    triplets = list(zip(rows(anchors), rows(positives), rows(negatives)))
    losses = [max(0.0, euclid(unit(a), unit(p)) - euclid(unit(a), unit(n)) + 0.05) for a, p, n in triplets]
    assert 0 < sum(x > 0 for x in losses) < B  # both kinds present, so the non-zero average is what is tested
    ours = ColumnLoss(TripletMarginLoss())([anchors, positives, negatives])
    assert ours.item() == pytest.approx(ref_triplets(triplets), abs=1e-5)


def test_column_loss_pairs_use_labels():
    """2 columns: PML forms every triplet from the labels (a_i and p_i share label i), over the 2B embeddings."""
    anchors, positives = make_columns(2, seed=6)
    embeddings = rows(anchors) + rows(positives)
    labels = list(range(B)) * 2
    triplets = [
        (embeddings[x], embeddings[y], embeddings[z])
        for x in range(2 * B)
        for y in range(2 * B)
        for z in range(2 * B)
        if x != y and labels[x] == labels[y] and labels[z] != labels[x]
    ]
    ours = ColumnLoss(TripletMarginLoss(margin=0.5))([anchors, positives])
    assert torch.isfinite(ours)
    assert ours.item() == pytest.approx(ref_triplets(triplets, margin=0.5), abs=1e-5)


def test_column_loss_gives_negatives_their_own_labels():
    anchors, positives, negatives = make_columns(3, seed=7)
    ours = ColumnLoss(ContrastiveLoss())([anchors, positives, negatives])
    embeddings = torch.cat([anchors, positives, negatives])
    labels = torch.cat([torch.arange(B), torch.arange(B), torch.arange(B) + B])
    assert ours.item() == pytest.approx(ContrastiveLoss()(embeddings, labels).item(), abs=1e-6)
    # and by hand: a_i and p_i are the only positive pairs (both orders); every other pair is negative, n_i's included
    x, y = rows(embeddings), labels.tolist()
    pairs = [(i, j) for i in range(3 * B) for j in range(3 * B) if i != j]
    positive = [euclid(unit(x[i]), unit(x[j])) for i, j in pairs if y[i] == y[j]]  # relu(d - 0)
    negative = [max(0.0, 1 - euclid(unit(x[i]), unit(x[j]))) for i, j in pairs if y[i] != y[j]]
    assert len(positive) == 2 * B
    expected = sum(positive) / len(positive) + sum(negative) / sum(v > 0 for v in negative)  # means of the non-zero
    assert ours.item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize('k', [2, 3])
@pytest.mark.parametrize('symmetric', [False, True])
def test_mnrl_equals_sentence_transformers(k, symmetric):
    columns = make_columns(k, seed=8)
    directions = ('query_to_doc', 'doc_to_query') if symmetric else ('query_to_doc',)
    theirs = STMNRL(StandIn(), directions=directions, partition_mode='per_direction')
    expected = theirs.compute_loss_from_embeddings(columns, None)
    ours = MultipleNegativesRankingLoss(symmetric=symmetric)(columns)
    assert ours.item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize('values', [TIED_SCORES, [0.1, 0.9, 0.3, 0.7, 0.5]])
def test_cosent_and_cosine_equal_sentence_transformers(values):
    a, b = make_columns(2, seed=9)
    scores = scores_tensor(values)
    st_cosent = STCoSENTLoss(StandIn()).compute_loss_from_embeddings([a, b], scores)
    st_cosine = STCosineSimilarityLoss(StandIn()).compute_loss_from_embeddings([a, b], scores)
    assert CoSENTLoss()([a, b], scores).item() == pytest.approx(st_cosent.item(), abs=1e-5)
    assert CosineSimilarityLoss()([a, b], scores).item() == pytest.approx(st_cosine.item(), abs=1e-5)


def test_matryoshka_equals_sentence_transformers():
    columns = make_columns(3, seed=10)
    model = StandIn()
    theirs = STMatryoshkaLoss(model, STMNRL(model), [8, 4, 2], [1.0, 0.5, 0.25])
    expected = theirs([{'emb': column} for column in columns], None)
    ours = MatryoshkaLoss(MultipleNegativesRankingLoss(), [8, 4, 2], [1.0, 0.5, 0.25])(columns)
    assert ours.item() == pytest.approx(expected.item(), abs=1e-5)
    a, b = columns[:2]
    theirs_cosent = STMatryoshkaLoss(model, STCoSENTLoss(model), [8, 2])([{'emb': a}, {'emb': b}], scores_tensor())
    ours_cosent = MatryoshkaLoss(CoSENTLoss(), [8, 2])([a, b], scores_tensor())
    assert ours_cosent.item() == pytest.approx(theirs_cosent.item(), abs=1e-5)


def test_cosent_refuses_pairs_without_scores():
    with pytest.raises(ValueError, match='CoSENTLoss needs scored pairs.*MultipleNegativesRankingLoss'):
        CoSENTLoss()(make_columns(2))


def test_mnrl_refuses_one_column_and_scores():
    with pytest.raises(ValueError, match='MultipleNegativesRankingLoss needs anchor,positive pairs'):
        MultipleNegativesRankingLoss()(make_columns(1))
    with pytest.raises(ValueError, match='MultipleNegativesRankingLoss.*use CoSENTLoss'):
        MultipleNegativesRankingLoss()(make_columns(2), scores_tensor())


def test_scored_losses_refuse_triplets():
    with pytest.raises(ValueError, match='CosineSimilarityLoss needs scored pairs'):
        CosineSimilarityLoss()(make_columns(3), scores_tensor())


def test_matryoshka_refuses_dims_larger_than_the_embeddings():
    loss = MatryoshkaLoss(MultipleNegativesRankingLoss(), [16, 8])
    with pytest.raises(ValueError, match=r'MatryoshkaLoss dims \[16\] are wider than the model.s 8-dim embedding'):
        loss(make_columns(2))


@pytest.mark.parametrize(
    ('dims', 'weights', 'message'),
    [([], None, 'at least one'), ([8, 0], None, 'positive'), ([8, 8], None, 'distinct'), ([8, 4], [1.0], 'weight')],
)
def test_matryoshka_refuses_bad_dims(dims, weights, message):
    with pytest.raises(ValueError, match=f'MatryoshkaLoss.*{message}'):
        MatryoshkaLoss(MultipleNegativesRankingLoss(), dims, weights)


def test_matryoshka_follows_the_inner_loss():
    wrapped = MatryoshkaLoss(CoSENTLoss(), [4])
    assert wrapped.needs_scores and wrapped.columns == (2,)
    with pytest.raises(ValueError, match=r'MatryoshkaLoss\(CoSENTLoss\) needs scored pairs'):
        check_pair_data(wrapped, 2, scored=False)
    check_pair_data(wrapped, 2, scored=True)


def test_class_attributes_and_check_pair_data():
    assert MultipleNegativesRankingLoss.columns == AtLeast(2) and not MultipleNegativesRankingLoss.needs_scores
    assert 7 in MultipleNegativesRankingLoss.columns and 1 not in MultipleNegativesRankingLoss.columns
    assert CoSENTLoss.columns == (2,) and CoSENTLoss.needs_scores
    check_pair_data(MultipleNegativesRankingLoss(), 3, scored=False)
    with pytest.raises(ValueError, match=r'ColumnLoss\(TripletMarginLoss\) needs anchor,positive'):
        check_pair_data(ColumnLoss(TripletMarginLoss()), 1, scored=False)


def test_build_pair_loss():
    assert set(PAIR_LOSSES) == {
        'MultipleNegativesRankingLoss',
        'CachedMultipleNegativesRankingLoss',
        'CoSENTLoss',
        'CosineSimilarityLoss',
    }
    mnrl = build_pair_loss('MultipleNegativesRankingLoss', {'scale': 10.0, 'symmetric': True})
    assert isinstance(mnrl, MultipleNegativesRankingLoss) and mnrl.scale == 10.0 and mnrl.symmetric
    column = build_pair_loss('TripletMarginLoss', None, pml_loss=TripletMarginLoss())
    assert isinstance(column, ColumnLoss)
    wrapped = MatryoshkaLoss(build_pair_loss('CoSENTLoss', None), [4, 8], [0.5, 1.0])
    assert isinstance(wrapped, MatryoshkaLoss) and isinstance(wrapped.loss, CoSENTLoss)
    assert wrapped.dims == (8, 4) and wrapped.weights == (1.0, 0.5)


def test_build_pair_loss_refuses_unknown_options_and_names():
    with pytest.raises(ValueError, match="CoSENTLoss has no option temperature; it takes \\['scale'\\]"):
        build_pair_loss('CoSENTLoss', {'temperature': 0.05})
    with pytest.raises(ValueError, match='CosineSimilarityLoss has no option scale'):
        build_pair_loss('CosineSimilarityLoss', {'scale': 2.0})
    with pytest.raises(ValueError, match="unknown pair loss 'CoSentLoss'.*did you mean 'CoSENTLoss'"):
        build_pair_loss('CoSentLoss', None)
