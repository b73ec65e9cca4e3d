"""Every registered loss and miner runs a forward/backward step; names and options are checked."""

from __future__ import annotations

import pytest
import torch

from executor.tuning.losses import build_loss, build_miner, list_losses, list_miners

EMBED, CLASSES = 16, 4


def batch():
    torch.manual_seed(0)
    embeddings = torch.randn(16, EMBED, requires_grad=True)  # 4 classes x 4 items, as the sampler makes them
    labels = torch.arange(CLASSES).repeat_interleave(4)
    return embeddings, labels


@pytest.mark.parametrize('name', list_losses())
def test_loss_forward_backward_without_nan(name):
    embeddings, labels = batch()
    spec = build_loss(name, num_classes=CLASSES, embedding_size=EMBED)
    if name == 'CrossEntropyLoss':
        loss = spec.module(torch.nn.Linear(EMBED, CLASSES)(embeddings), labels)
    else:
        loss = spec.module(embeddings, labels)
    loss.backward()
    assert torch.isfinite(loss) and embeddings.grad is not None and torch.isfinite(embeddings.grad).all()


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
