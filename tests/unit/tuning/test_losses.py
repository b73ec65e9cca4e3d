"""Every registered loss and miner runs a forward/backward step whose gradient lowers the loss; four PML losses
against plain loops; names and options are checked."""

from __future__ import annotations

import math

import pytest
import torch

from executor.tuning.losses import build_loss, build_miner, list_losses, list_miners

EMBED, CLASSES = 16, 4
STEP = 0.01  # the length of the step against the gradient; the embeddings' norm is about 16


def batch():
    torch.manual_seed(0)
    embeddings = torch.randn(16, EMBED, requires_grad=True)  # 4 classes x 4 items, as the sampler makes them
    labels = torch.arange(CLASSES).repeat_interleave(4)
    return embeddings, labels


@pytest.mark.parametrize('name', list_losses())
def test_a_step_against_the_gradient_lowers_every_loss(name):
    embeddings, labels = batch()
    spec = build_loss(name, num_classes=CLASSES, embedding_size=EMBED)
    head = torch.nn.Linear(EMBED, CLASSES) if name == 'CrossEntropyLoss' else None

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        return spec.module(head(x) if head else x, labels)

    loss = loss_of(embeddings)
    loss.backward()
    grad = embeddings.grad
    assert torch.isfinite(loss) and grad is not None and torch.isfinite(grad).all() and grad.norm() > 0
    with torch.no_grad():
        after = loss_of(embeddings - STEP * grad / grad.norm())
    # to first order the step lowers the loss by STEP * |grad| (measured: 0.98-1.47 of it for every loss): at least
    # half of that, or the gradient does not point where the loss falls
    assert loss.item() - after.item() > 0.5 * STEP * grad.norm().item(), (loss.item(), after.item())


def unit(u: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in u))
    return [x / norm for x in u]


def distance(u: list[float], v: list[float]) -> float:
    """PML's default LpDistance: euclidean, between the L2-normalised embeddings."""
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(unit(u), unit(v))))


def similarity(u: list[float], v: list[float]) -> float:
    return sum(x * y for x, y in zip(unit(u), unit(v)))


def mean_of_non_zero(values: list[float]) -> float:
    """PML's AvgNonZeroReducer."""
    non_zero = [v for v in values if v > 0]
    return sum(non_zero) / len(non_zero) if non_zero else 0.0


def ref_triplet(x, y, margin=0.05):
    """relu(d(a, p) - d(a, n) + margin) over every triplet of the batch, the mean of the non-zero ones."""
    n = len(x)
    return mean_of_non_zero(
        [
            max(0.0, distance(x[a], x[p]) - distance(x[a], x[q]) + margin)
            for a in range(n)
            for p in range(n)
            for q in range(n)
            if a != p and y[a] == y[p] and y[q] != y[a]
        ]
    )


def ref_contrastive(x, y, pos_margin=0.0, neg_margin=1.0):
    """relu(d - pos_margin) over positive pairs plus relu(neg_margin - d) over negative pairs, each averaged over its
    non-zero terms."""
    n = len(x)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    positive = [max(0.0, distance(x[i], x[j]) - pos_margin) for i, j in pairs if y[i] == y[j]]
    negative = [max(0.0, neg_margin - distance(x[i], x[j])) for i, j in pairs if y[i] != y[j]]
    return mean_of_non_zero(positive) + mean_of_non_zero(negative)


def ref_ntxent(x, y, temperature=0.1):
    """Per positive pair (a, p): -log of its exp(cos / t) among it and the anchor's negatives; the mean."""
    n = len(x)
    losses = []
    for a in range(n):
        negatives = [math.exp(similarity(x[a], x[q]) / temperature) for q in range(n) if y[q] != y[a]]
        for p in range(n):
            if p != a and y[p] == y[a]:
                positive = math.exp(similarity(x[a], x[p]) / temperature)
                losses.append(-math.log(positive / (positive + sum(negatives))))
    return sum(losses) / len(losses)


def ref_multi_similarity(x, y, alpha=2.0, beta=50.0, base=0.5):
    """Per anchor: log(1 + sum_p exp(-alpha (s_p - base))) / alpha + log(1 + sum_n exp(beta (s_n - base))) / beta."""
    n = len(x)
    total = 0.0
    for i in range(n):
        positives = [similarity(x[i], x[j]) for j in range(n) if j != i and y[j] == y[i]]
        negatives = [similarity(x[i], x[j]) for j in range(n) if y[j] != y[i]]
        total += math.log1p(sum(math.exp(-alpha * (s - base)) for s in positives)) / alpha
        total += math.log1p(sum(math.exp(beta * (s - base)) for s in negatives)) / beta
    return total / n


REFERENCES = {
    'TripletMarginLoss': ({'margin': 0.2}, lambda x, y: ref_triplet(x, y, margin=0.2)),
    'ContrastiveLoss': ({'pos_margin': 0.1, 'neg_margin': 0.9}, lambda x, y: ref_contrastive(x, y, 0.1, 0.9)),
    'NTXentLoss': ({}, ref_ntxent),  # temperature 0.1, the registry's default
    'MultiSimilarityLoss': ({}, ref_multi_similarity),
}


@pytest.mark.parametrize('name', sorted(REFERENCES))
def test_pml_losses_equal_a_plain_loop(name):
    options, reference = REFERENCES[name]
    embeddings, labels = batch()
    ours = build_loss(name, options).module(embeddings, labels).item()
    assert ours == pytest.approx(reference(embeddings.detach().double().tolist(), labels.tolist()), abs=1e-5)


def test_triplet_loss_is_zero_when_every_triplet_meets_the_margin():
    """The edge case: no triplet violates the margin, so none is averaged and the loss is 0 (not a NaN of 0 / 0)."""
    embeddings = torch.eye(EMBED)[:8].repeat_interleave(2, dim=0).requires_grad_(True)  # pairs of equal vectors
    labels = torch.arange(8).repeat_interleave(2)
    assert ref_triplet(embeddings.detach().tolist(), labels.tolist()) == 0.0
    loss = build_loss('TripletMarginLoss').module(embeddings, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(embeddings.grad, torch.zeros_like(embeddings))


@pytest.mark.parametrize('name', list_miners())
def test_miner_feeds_the_triplet_loss(name):
    embeddings, labels = batch()
    miner = build_miner(name)
    indices = miner(embeddings, labels)
    loss = build_loss('TripletMarginLoss').module(embeddings, labels, indices)
    loss.backward()
    assert torch.isfinite(loss) and isinstance(indices, tuple)


def test_self_supervised_ntxent_on_two_views():
    spec = build_loss('NTXentLoss', self_supervised=True)
    assert type(spec.module).__name__ == 'SelfSupervisedLoss'
    first, second = torch.randn(8, EMBED, requires_grad=True), torch.randn(8, EMBED)
    loss = spec.module(first, second)
    loss.backward()
    assert torch.isfinite(loss) and first.grad.abs().sum() > 0


def test_losses_with_class_weights_need_their_own_optimizer():
    assert build_loss('ArcFaceLoss', num_classes=CLASSES, embedding_size=EMBED).has_parameters
    assert not build_loss('TripletMarginLoss').has_parameters


def test_names_and_options_are_checked():
    with pytest.raises(ValueError, match=r"unknown loss 'TripletLoss'.*'TripletMarginLoss'"):
        build_loss('TripletLoss')
    with pytest.raises(ValueError, match=r"unknown miner 'HardMiner'"):
        build_miner('HardMiner')
    with pytest.raises(ValueError, match=r"TripletMarginLoss has no option \['margn'\]"):
        build_loss('TripletMarginLoss', {'margn': 0.1})
    with pytest.raises(ValueError, match='without a miner'):
        build_miner(None, {'margin': 0.1})
    assert build_miner(None) is None
