"""Matryoshka sizes checked once (for the config, the pair loss, metric learning and evaluation), the slice, the loss
over the slices against a plain loop, and the evaluation at a slice against the evaluation of the slice."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from executor.tuning.config import TrainConfig
from executor.tuning.data.sources import Item
from executor.tuning.evaluation import evaluator_for
from executor.tuning.matryoshka import MatryoshkaLoss, matryoshka_sizes, sliced_loss, truncate
from executor.tuning.pair_losses import MultipleNegativesRankingLoss
from executor.tuning.tasks.pairs import PairTraining


def test_sizes_are_widest_first_with_their_weights():
    assert matryoshka_sizes([64, 256, 128], [0.5, 1.0, 0.25]) == [(256, 1.0), (128, 0.25), (64, 0.5)]
    assert matryoshka_sizes([8, 32]) == [(32, 1.0), (8, 1.0)]
    assert matryoshka_sizes(None) == []
    assert matryoshka_sizes([384, 64], embed_dim=384) == [(384, 1.0), (64, 1.0)]


@pytest.mark.parametrize(
    ('dims', 'weights', 'embed_dim', 'message'),
    [
        ([], None, None, r'matryoshka_dims needs at least one dimension'),
        ([8, 0], None, None, r'matryoshka_dims must be positive integers, got \[8, 0\]'),
        ([8, True], None, None, 'must be positive integers'),
        ([8, 8], None, None, r'matryoshka_dims must be distinct, got \[8, 8\]'),
        ([8, 4], [1.0], None, r'matryoshka_weights has 1 entries for matryoshka_dims \[8, 4\]; give one weight'),
        ([8, 4], [1.0, -1.0], None, r'matryoshka_weights must be >= 0'),
        (None, [1.0], None, 'matryoshka_weights given without matryoshka_dims'),
        ([512, 64], None, 384, r"matryoshka_dims \[512\] are wider than the model's 384-dim embedding; give dims <="),
    ],
)
def test_bad_sizes_are_refused_saying_why(dims, weights, embed_dim, message):
    with pytest.raises(ValueError, match=message):
        matryoshka_sizes(dims, weights, embed_dim)


def test_the_config_refuses_what_the_losses_refuse():
    cases = (
        ([64, 64], None, 'distinct'),
        ([8, 4], [1, -0.5], '>= 0'),
        ([0], None, 'greater than or equal to 1'),
        ([70_000], None, 'less than or equal to 65536'),  # MAX_EMBED_DIM: no check allocates 4 x 62.5M bytes
    )
    for dims, weights, message in cases:
        with pytest.raises(ValueError, match=f'(?s)matryoshka_.* {message}'):
            TrainConfig(train_data='x.csv', matryoshka_dims=dims, matryoshka_weights=weights)


def test_truncate_keeps_the_leading_values_unit_length_for_tensors_and_arrays():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    got = truncate(x, 3)
    assert got.shape == (4, 3) and torch.allclose(got.norm(dim=1), torch.ones(4))
    assert torch.allclose(got, x[:, :3] / x[:, :3].norm(dim=1, keepdim=True))
    assert np.allclose(truncate(x.numpy(), 3), got.numpy(), atol=1e-7)


def test_sliced_loss_is_the_weighted_sum_of_the_loss_at_each_slice():
    a, b = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))

    def loss(columns):  # any loss of the columns: here the mean cosine distance of the rows
        return (1 - (columns[0] * columns[1]).sum(dim=1)).mean()

    expected = 0.0
    for dim, weight in ((8, 1.0), (4, 0.5), (2, 0.25)):
        x, y = F.normalize(a[:, :dim], dim=1), F.normalize(b[:, :dim], dim=1)
        expected += weight * (1 - (x * y).sum(dim=1)).mean().item()
    got = sliced_loss(loss, [a, b], matryoshka_sizes([2, 8, 4], [0.25, 1.0, 0.5]))
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_pair_training_wraps_its_loss_and_checks_the_sizes_against_the_model():
    config = TrainConfig(train_data='x.csv', matryoshka_dims=[4, 8], matryoshka_weights=[0.5, 1.0])
    task = PairTraining(config, columns=2, scored=False)
    spec = task.build_loss(SimpleNamespace(embed_dim=8), None, 1)
    assert isinstance(spec.module, MatryoshkaLoss) and isinstance(spec.module.loss, MultipleNegativesRankingLoss)
    assert spec.module.dims == (8, 4) and spec.module.weights == (1.0, 0.5)
    with pytest.raises(ValueError, match=r"matryoshka_dims \[8\] are wider than the model's 4-dim embedding"):
        task.build_loss(SimpleNamespace(embed_dim=4), None, 1)


class Fixed:
    """An embedder of fixed embeddings, one row per item id."""

    class_names = None

    def __init__(self, rows: dict[str, np.ndarray]) -> None:
        self.rows = rows

    def embed_items(self, items, prompt_name=None):
        return np.stack([self.rows[it.id] for it in items])


def test_the_evaluation_at_a_slice_is_the_evaluation_of_the_sliced_embeddings():
    rng = np.random.default_rng(0)
    items = [Item(id=f'i{n}', text=f't{n}', label=str(n % 3)) for n in range(12)]
    full = {it.id: rng.normal(size=8).astype(np.float32) for it in items}
    sliced = {key: truncate(row[None], 3)[0] for key, row in full.items()}

    got = evaluator_for(items, None, 5, [3, 3, 8])(Fixed(full)).metrics  # a dim twice: evaluated once
    at_3 = evaluator_for(items, None, 5)(Fixed(sliced)).metrics
    assert got['ndcg@10_dim3'] == pytest.approx(at_3['ndcg@10'])
    assert got['hit@1_dim3'] == pytest.approx(at_3['hit@1'])
    assert not any(name.endswith('_dim8') for name in got)  # the full size has every metric already
    with pytest.raises(ValueError, match=r'matryoshka_dims must be positive integers, got \[0, 3\]'):
        evaluator_for(items, None, 5, [3, 0])
