"""Classification (linear probe, full fine-tune) and SimCLR self-supervised training on real digits."""

from __future__ import annotations

import pytest
import torch

from executor.tuning import fit, load_model
from executor.tuning.data import Item
from executor.tuning.data.digits import digits_items
from executor.tuning.models import build_model

COMMON = dict(model='efficientnet_lite0', image_size=64, tensorboard=False, seed=0)


@pytest.mark.slow  # 1.5-3 min: a result on real digits; test_service's lifecycle trains a classifier in make test
def test_linear_probe_and_full_fine_tune(tmp_path):
    train, held_out = digits_items(per_class=20, size=32), digits_items(per_class=10, offset=100, size=32)
    probe = fit(
        train_data=train,
        eval_data=held_out,
        loss='CrossEntropyLoss',
        freeze=True,
        epochs=10,
        output_dir=tmp_path / 'probe',
        **COMMON,
    )
    full = fit(
        train_data=train,
        eval_data=held_out,
        loss='CrossEntropyLoss',
        freeze=2,
        epochs=5,
        learning_rate=1e-4,
        output_dir=tmp_path / 'full',
        **COMMON,
    )
    probe_acc, full_acc = probe.metrics_after['accuracy'], full.metrics_after['accuracy']
    # Measured: probe 0.64, full fine-tune 0.72 on 100 held-out digits (chance 0.10).
    assert probe_acc >= 0.6, probe_acc
    assert full_acc >= probe_acc, (full_acc, probe_acc)
    assert 'accuracy/7' in probe.metrics_after
    model = load_model(probe.artifact)
    assert model.class_names == [str(d) for d in range(10)] and model.classifier.out_features == 10
    # the probe trained only the head: the backbone is the pre-trained one, bit for bit
    pretrained = build_model('efficientnet_lite0')
    for (name, a), b in zip(pretrained.backbone.state_dict().items(), model.backbone.state_dict().values()):
        assert torch.equal(a, b), name


def test_simclr_on_unlabelled_images_then_supervised_from_its_weights(tmp_path):
    unlabelled = [Item(id=it.id, tensor=it.tensor) for it in digits_items(per_class=8, size=32)]
    before = build_model('efficientnet_lite0').eval()
    ssl = fit(train_data=unlabelled, loss='NTXentLoss', epochs=1, batch_size=40, output_dir=tmp_path / 'ssl', **COMMON)
    state = torch.load(ssl.artifact, weights_only=True)['state_dict']
    assert not any('ssl_head' in k or 'projection' in k for k in state)  # the projection head is dropped
    assert ssl.model.embed_dim == 1280
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(before(x), ssl.model.eval()(x), atol=1e-4)  # the embedding changed
    # stage two: supervised fine-tuning that starts from the SimCLR weights
    labelled = digits_items(per_class=4, size=32)
    second = fit(
        train_data=labelled,
        model=str(ssl.artifact),
        epochs=1,
        batch_size=20,
        output_dir=tmp_path / 'stage2',
        **{k: v for k, v in COMMON.items() if k != 'model'},
    )
    assert second.model.config['name'] == 'efficientnet_lite0' and second.artifact.is_file()


def test_one_function_decides_the_task_and_each_task_fills_its_defaults():
    from executor.tuning.config import TrainConfig
    from executor.tuning.data import DataError, Item
    from executor.tuning.data.digits import digits_items
    from executor.tuning.tasks import (
        Classification,
        LinearProbe,
        MetricLearning,
        PairTraining,
        SelfSupervised,
        decide_task,
    )

    def task(labelled: bool = True, **options):
        items = [Item(id=str(i), text=f'sentence {i}', label=str(i % 2) if labelled else None) for i in range(4)]
        return decide_task(TrainConfig(**options), items)

    assert type(task(loss='CrossEntropyLoss')) is Classification
    probe = task(loss='CrossEntropyLoss', freeze=True)
    assert type(probe) is LinearProbe and probe.config.learning_rate == 1e-2 and probe.config.epochs == 20
    assert type(task(False, loss='NTXentLoss')) is SelfSupervised
    assert type(task(True, loss='NTXentLoss')) is MetricLearning  # labelled: supervised NT-Xent
    metric = task(False, loss='TripletMarginLoss', learning_rate=3e-5)
    assert type(metric) is MetricLearning and metric.config.learning_rate == 3e-5 and metric.config.batch_size == 64
    assert task(device='cpu', num_devices=3).config.batch_size == 66  # the default global batch divides evenly
    unlabelled = [it.__class__(id=it.id, tensor=it.tensor) for it in digits_items(per_class=2, size=16)]
    with pytest.raises(DataError, match='have no label.*NTXentLoss'):
        metric.check_data(unlabelled)
    assert metric.monitor == 'ndcg@10' and probe.monitor == 'accuracy'
    assert task().config.loss == 'TripletMarginLoss'  # the default loss on labels
    # sentence pairs, triplets and scored pairs: pair training, each with its default loss and one view per column
    pairs = [Item(id='0', columns=('a', 'b')), Item(id='1', columns=('c', 'd'))]
    scored = [Item(id='0', columns=('a', 'b'), score=4.0), Item(id='1', columns=('c', 'd'), score=1.0)]
    triplets = [Item(id='0', columns=('a', 'b', 'c'))]
    for items, loss, views in (
        (pairs, 'MultipleNegativesRankingLoss', 2),
        (scored, 'CoSENTLoss', 2),
        (triplets, 'MultipleNegativesRankingLoss', 3),
    ):
        chosen = decide_task(TrainConfig(), items)
        assert type(chosen) is PairTraining and chosen.config.loss == loss and chosen.views == views
        assert chosen.config.learning_rate == 2e-5 and chosen.config.batch_size == 32
    with pytest.raises(DataError, match='is not shaped like'):
        decide_task(TrainConfig(), [*pairs, *triplets])
    with pytest.raises(DataError, match='MultipleNegativesRankingLoss trains on sentence pairs'):
        task(loss='MultipleNegativesRankingLoss')


def test_what_can_be_checked_before_a_run_is_checked_there(tmp_path):
    """Issue 21: a junk .pt model, unreadable weights, a CSV row with a URL and invalid loss options were CREATED
    and then FAILED in the training process (`KeyError: 101`, `EOFError`); optimizer_options' lr was overridden."""
    from executor.tuning.config import TrainConfig
    from executor.tuning.data import DataError
    from executor.tuning.data.digits import write_digits_folder
    from executor.tuning.plan import plan_run

    folder = write_digits_folder(tmp_path / 'digits', per_class=2, size=8)
    junk = tmp_path / 'junk.pt'
    junk.write_bytes(b'\x80\x04not a pickle at all')
    good = dict(train_data=str(folder), data_roots=[str(tmp_path)])
    assert len(plan_run(TrainConfig(**good)).items) == 20
    with pytest.raises(ValueError, match=r"'junk.pt' cannot be read as a model artifact \(\w+\)"):
        plan_run(TrainConfig(**good, model=str(junk)))
    with pytest.raises(ValueError, match=r"weights file 'junk.pt' cannot be read"):
        plan_run(TrainConfig(**good, weights=str(junk)))
    with pytest.raises(ValueError, match=r'TripletMarginLoss has no option \[.margn.\]'):
        plan_run(TrainConfig(**good, loss_options={'margn': 0.1}))
    with pytest.raises(ValueError, match=r"optimizer Adam option 'betas' takes a value like its default \(0.9, 0.999"):
        plan_run(TrainConfig(**good, optimizer_options={'betas': 3}))
    with pytest.raises(ValueError, match=r'optimizer_options holds lr=0.5, which learning_rate would override'):
        TrainConfig(**good, optimizer_options={'lr': 0.5})
    csv = tmp_path / 'remote.csv'
    csv.write_text(
        'uri,label\n'
        + ''.join(f'{p},{p.parent.name}\n' for p in sorted(folder.rglob('*.png'))[:4])
        + 'https://example.com/cat.jpg,cat\n'
    )
    with pytest.raises(
        DataError, match=r"remote.csv line 6: uri 'https://example.com/cat.jpg' is a URL.*never downloads"
    ):
        plan_run(TrainConfig(train_data=str(csv), data_roots=[str(tmp_path)]))
