"""The trainer on real handwritten digits (scikit-learn): learning, exact resume, freezing, checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from PIL import Image

from executor.tuning import TrainConfig, Trainer, fit, load_model
from executor.tuning.callbacks import Callback
from executor.tuning.data import DataError
from executor.tuning.data.digits import digits_items
from executor.tuning.evaluation import Evaluator
from executor.tuning.inference import TorchEncoder

SMALL = dict(
    model='resnet18',
    pretrained=False,
    image_size=32,
    batch_size=20,
    num_items_per_class=4,
    tensorboard=False,
    learning_rate=1e-3,
    seed=7,
)


@pytest.fixture(scope='module')
def train_items():
    return digits_items(per_class=8, size=32)


def train_loss(trainer: Trainer) -> float:
    """Mean loss over the training batches of epoch 0's order, as training computes it (batch statistics), on a
    copy of the model so that measuring moves no BatchNorm statistics."""
    model = trainer.model
    trainer.model = copy.deepcopy(model).train()
    trainer.sampler.set_epoch(0)
    with torch.no_grad():
        losses = [trainer.compute_loss(trainer.to_device(x), y).item() for x, y in trainer.loader]
    trainer.model = model
    return sum(losses) / len(losses)


def test_one_epoch_lowers_the_training_loss(tmp_path, train_items):
    # The real pretrained default model: its BatchNorm statistics make eval-mode losses meaningful.
    options = {
        **SMALL,
        'model': 'efficientnet_lite0',
        'pretrained': True,
        'image_size': 64,
        'learning_rate': 1e-4,
        'loss_options': {'margin': 0.2},
    }
    trainer = Trainer(TrainConfig(train_data=train_items, epochs=1, output_dir=tmp_path, **options))
    before = train_loss(trainer)
    trainer.fit()
    after = train_loss(trainer)
    assert after < before, (before, after)
    history = [json.loads(line) for line in (tmp_path / 'history.jsonl').read_text().splitlines()]
    assert len(history) == 1 and history[0]['epoch'] == 1
    assert (tmp_path / 'checkpoints' / 'last.pt').is_file() and (tmp_path / 'model.pt').is_file()
    assert json.loads((tmp_path / 'config.json').read_text())['train_data'] == '<80 documents>'


class StopAtEpoch(Callback):
    """Simulates a crash: raises on the first batch of the given epoch (after the previous checkpoint)."""

    def __init__(self, epoch: int) -> None:
        self.stop_epoch = epoch

    def on_batch_end(self, trainer, loss):
        if trainer.epoch == self.stop_epoch:
            raise KeyboardInterrupt('simulated crash')


def test_resume_after_epoch_1_gives_the_same_weights(tmp_path, train_items):
    options = dict(train_data=train_items, epochs=2, scheduler='cosine', **SMALL)
    straight = fit(output_dir=tmp_path / 'straight', **options)
    with pytest.raises(KeyboardInterrupt):
        fit(output_dir=tmp_path / 'resumed', callbacks=[StopAtEpoch(1)], **options)
    resumed = fit(output_dir=tmp_path / 'resumed', resume=True, **options)
    # Same seed, CPU, deterministic kernels: the weights agree bit for bit (tolerance 0).
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h['train_loss'] for h in straight.history] == [h['train_loss'] for h in resumed.history]


def test_frozen_parameters_stay_bit_identical(tmp_path, train_items):
    config = TrainConfig(train_data=train_items, epochs=1, freeze=2, output_dir=tmp_path, **SMALL)
    trainer = Trainer(config)
    net = trainer.model.backbone.module
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    frozen_bn = {n: b.clone() for n, b in net.named_buffers() if n.startswith(('bn1', 'layer1'))}
    trainable = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    trainer.fit()
    assert frozen and all(torch.equal(frozen[n], p) for n, p in net.named_parameters() if n in frozen)
    assert all(torch.equal(frozen_bn[n], b) for n, b in net.named_buffers() if n in frozen_bn)
    assert any(not torch.equal(trainable[n], p) for n, p in net.named_parameters() if n in trainable)


def test_evaluation_best_model_and_early_stopping(tmp_path, train_items):
    eval_items = digits_items(per_class=4, offset=50, size=32)
    result = fit(
        train_data=train_items,
        eval_data=eval_items,
        epochs=4,
        limit=5,
        early_stopping_patience=1,
        early_stopping_min_delta=1.0,  # hit@1 lies in [0, 1]: no epoch can better the first by more than 1
        monitor='hit@1',
        output_dir=tmp_path,
        **SMALL,
    )
    assert all('ndcg@10' in h and 'hit@1' in h for h in result.history)
    # epoch 1 sets the best, epoch 2 fails to better it: patience 1 is spent, so 2 of the 4 epochs ran
    assert [h['epoch'] for h in result.history] == [1, 2]
    best = max(h['hit@1'] for h in result.history)
    # the one evaluator, on the saved artifact through the serving encoder, finds what the epoch's evaluation found
    served = TorchEncoder(load_model(result.artifact), device='cpu')
    assert Evaluator(eval_items, None, limit=5)(served.embedder()).metrics['hit@1'] == pytest.approx(best)
    assert result.metrics_after['hit@1'] == pytest.approx(best)
    before_after = json.loads((tmp_path / 'reports' / 'metrics_before_after.json').read_text())
    assert before_after['before'] == pytest.approx(result.metrics_before, nan_ok=True)
    for name in ('curves.png', 'before_after.png', 'matches.png'):
        with Image.open(tmp_path / 'reports' / name) as image:
            image.verify()
            assert image.format == 'PNG' and min(image.size) > 200
    with Image.open(tmp_path / 'reports' / 'matches.png') as sprite:  # 6 rows (a query per digit): query + top 5
        width, height = sprite.size
        assert width > 6 * 96 and height > 6 * 96
    # the same example results as JSON (for every modality): the final model's top 5 of a query per digit
    examples = json.loads((tmp_path / 'reports' / 'examples.json').read_text())
    assert sorted(e['query']['label'] for e in examples) == ['0', '1', '2', '3', '4', '5']
    for example in examples:
        matches = example['matches']
        scores = [m['score'] for m in matches]
        assert len(matches) == 5 and scores == sorted(scores, reverse=True) and -1 <= scores[-1] <= scores[0] <= 1
        assert [m['relevant'] for m in matches] == [m['label'] == example['query']['label'] for m in matches]
        assert example['query']['name'] not in [m['name'] for m in matches]  # a query never matches itself


def test_early_stopping_with_a_baseline_stops_when_its_patience_is_spent(tmp_path, caplog):
    """A baseline no epoch can better (a loss below 0): every epoch counts against the patience, from the first."""
    small = {**SMALL, 'batch_size': 10, 'num_items_per_class': 2}  # 20 digits, 2 steps an epoch
    options = dict(epochs=10, early_stopping_patience=2, early_stopping_baseline=0.0, monitor='train_loss')
    with caplog.at_level('INFO', logger='executor.tuning.callbacks'):
        result = fit(train_data=digits_items(per_class=2, size=32), output_dir=tmp_path, **options, **small)
    assert [h['epoch'] for h in result.history] == [1, 2] and all(h['train_loss'] > 0 for h in result.history)
    assert 'early stopping: train_loss did not improve for 2 epochs' in caplog.text
    history = [json.loads(line) for line in (tmp_path / 'history.jsonl').read_text().splitlines()]
    assert [row['epoch'] for row in history] == [1, 2]
    assert torch.load(tmp_path / 'checkpoints' / 'last.pt', weights_only=False)['epoch'] == 2


def test_arcface_trains_its_own_parameters(tmp_path, train_items):
    trainer = Trainer(TrainConfig(train_data=train_items, epochs=1, loss='ArcFaceLoss', output_dir=tmp_path, **SMALL))
    assert trainer.loss_optimizer is not None
    before = trainer.loss.module.W.detach().clone()
    trainer.fit()
    assert not torch.equal(before, trainer.loss.module.W)


def test_bad_training_data_is_refused_with_the_fix(tmp_path, train_items):
    with pytest.raises(DataError, match='at least 2'):
        Trainer(TrainConfig(train_data=train_items[:1], output_dir=tmp_path, **SMALL))
    unlabelled = [dataclasses.replace(it) for it in train_items[:8]]
    unlabelled[3].label = None
    with pytest.raises(DataError, match='have no label'):
        Trainer(TrainConfig(train_data=unlabelled, output_dir=tmp_path, **SMALL))
    single = digits_items(per_class=2, size=32)[:-1]  # digit 9 keeps one item
    with pytest.raises(DataError, match=r"classes \['9'\] have a single item"):
        Trainer(TrainConfig(train_data=single, output_dir=tmp_path, **SMALL))
    with pytest.raises(ValueError, match='margn'):
        Trainer(TrainConfig(train_data=train_items, loss_options={'margn': 1}, output_dir=tmp_path, **SMALL))
    with pytest.raises(ValueError, match='Extra inputs'):
        TrainConfig(train_data=train_items, epoch=3)
    with pytest.raises(ValueError, match='device'):
        TrainConfig(device='gpu')
