"""Finetuner's fit() arguments and CSV files: what each maps to, and the message of each refused one."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from executor.params import ParameterError, TrainParams, parse, train_config
from executor.tuning.config import TrainConfig
from executor.tuning.data import DataError, load_items
from executor.tuning.data.finetuner_csv import CSVOptions
from executor.tuning.finetuner_callbacks import (
    BestModelCheckpoint,
    EarlyStopping,
    EvaluationCallback,
    TrainingCheckpoint,
    WandBLogger,
    WiSEFTCallback,
)
from executor.tuning.finetuner_compat import finetuner_config
from executor.tuning.optim import OPTIMIZERS, REFUSED
from executor.tuning.plan import evaluation_items, plan_run


def train(**params):
    """What the service makes of /train's parameters: parsed (Finetuner's names translated), then one TrainConfig."""
    given = parse(TrainParams, {'train_data': 'train.csv', **params}, '/train').config_dict()
    train_config(given)
    return given


def refused(message: str, **params) -> None:
    with pytest.raises(ParameterError, match=message):
        train(**params)


def test_model_options_callbacks_and_renamed_arguments_map_to_the_options_here():
    config = finetuner_config(
        train_data='train.csv',
        model_options={'freeze': 2, 'pooler': 'GeM', 'output_dim': 128},
        callbacks=[
            EvaluationCallback(query_data='q', index_data='i', limit=10, batch_size=16),
            BestModelCheckpoint(monitor='hit@5'),
            EarlyStopping(monitor='hit@5', mode='max', patience=3, min_delta=0.01, baseline=0.2),
            TrainingCheckpoint(),
            WiSEFTCallback(alpha=0.5),
        ],
        scheduler='linear',
        scheduler_step='epoch',
        description='a trial',
        experiment_name='tll',
        public=False,
        cpu=True,
        optimizer='RMSprop',
        loss_optimizer=None,
        miner_options=None,
        run_name='tll-1',
    )
    assert (config.freeze, config.pooler, config.output_dim) == (2, 'gem', 128)
    assert (config.query_data, config.index_data, config.limit) == ('q', 'i', 10)
    assert (config.monitor, config.save_best, config.early_stopping_patience) == ('hit@5', True, 3)
    assert (config.early_stopping_min_delta, config.early_stopping_baseline, config.wise_ft_alpha) == (0.01, 0.2, 0.5)
    assert config.scheduler_options.scheduler_step == 'epoch' and config.device == 'cpu'
    assert (config.description, config.experiment_name, config.optimizer) == ('a trial', 'tll', 'RMSprop')
    assert str(config.output_dir) == 'runs/tll-1' and config.loss_optimizer == 'Adam'
    # over the API the same, as dicts; an EvaluationCallback without index_data: the queries search each other
    given = train(callbacks=[{'name': 'EvaluationCallback', 'query_data': 'q'}, {'name': 'EarlyStopping'}])
    assert given == {'train_data': 'train.csv', 'eval_data': 'q', 'early_stopping_patience': 2}
    assert train(model_artifact='run-1', model='efficientnet_b0')['model'] == 'run-1'  # Finetuner: the artifact wins


@pytest.mark.parametrize('name', sorted(set(OPTIMIZERS) - set(REFUSED)))
def test_every_torch_optimizer_by_name(name):
    assert train(optimizer=name, loss_optimizer=name)['optimizer'] == name


@pytest.mark.parametrize(
    ('params', 'message'),
    [
        ({'optimizer': 'LBFGS'}, "optimizer='LBFGS' cannot train here: it re-evaluates the loss .* use one of ASGD"),
        ({'optimizer': 'SparseAdam'}, "optimizer='SparseAdam' cannot train here: it takes sparse gradients"),
        ({'loss_optimizer': 'Muon'}, "loss_optimizer='Muon' cannot train here: it optimizes 2-D"),
        ({'optimizer': 'Adamm'}, "unknown optimizer 'Adamm' \\(did you mean 'Adam'\\?\\)"),
        (
            {'callbacks': [WandBLogger(wandb_args={'project': 'p'})]},
            r'callbacks\[0\] \(WandBLogger\): wandb_args=.*WANDB_PROJECT',
        ),
        ({'callbacks': [{'name': 'EarlyStoping'}]}, "unknown callback 'EarlyStoping' \\(did you mean 'EarlyStopping'"),
        ({'callbacks': [{'name': 'EarlyStopping', 'patiense': 2}]}, "unknown argument 'patiense' .*'patience'"),
        (
            {'callbacks': [{'name': 'EarlyStopping', 'monitor': 'val_loss'}]},
            "monitor='val_loss': runs here compute no validation",
        ),
        ({'callbacks': [BestModelCheckpoint(monitor='ndcg@10', mode='min')]}, "mode='min', but 'ndcg@10' is better"),
        ({'callbacks': [TrainingCheckpoint(last_k_epochs=3)]}, "last_k_epochs=3: a run keeps its last epoch's"),
        ({'callbacks': [WiSEFTCallback(alpha=2)]}, 'alpha must be a number from 0 to 1, got 2'),
        ({'callbacks': [EvaluationCallback('q', model='clip-text')]}, "model='clip-text' is not taken here"),
        ({'callbacks': [EvaluationCallback('q', distance='euclidean')]}, 'retrieval is by cosine similarity here'),
        ({'callbacks': [EvaluationCallback('q'), EvaluationCallback('r')]}, 'one EvaluationCallback per run here'),
        ({'callbacks': [EvaluationCallback('q')], 'eval_data': 'e'}, 'evaluation data is given twice'),
        ({'model_options': {'pooler_options': {'p': 2.4}}}, 'the GeM pooler here learns its p'),
        ({'model_options': {'preprocess_options': {}}}, 'set image_size \\(pixels\\)'),
        ({'model_options': {'frezze': True}}, "unknown model option 'model_options.frezze' \\(did you mean 'freeze'"),
        ({'model_options': {'freeze': True}, 'freeze': False}, "parameter 'freeze' is given twice"),
        ({'optimizer_options': {'layer_wise_lr_decay': 0.98}}, 'layer_wise_lr_decay .* is not taken here'),
        ({'public': True}, "parameter 'public': there is no shared cloud here"),
        ({'model': 'resnet-base'}, "'resnet-base' is torchvision's ResNet50 .* here model='torchvision/resnet50'"),
        ({'model': 'efficientnet-base'}, "torchvision's EfficientNet-B4 .* model='torchvision/efficientnet_b4'"),
        ({'model': 'bert-base-en'}, "'bert-base-en' is Hugging Face's 'bert-base-cased', which is not in this"),
        ({'model': 'sbert-base-en'}, "'sentence-transformers/msmarco-distilbert-base-v3', which is not in"),
        ({'model': 'clip-base-en'}, "'clip-base-en' is a CLIP model .* text_model='all-MiniLM-L6-v2'"),
        ({'model': 'pointnet-base'}, "'pointnet-base' is a 3D mesh"),
        ({'model': 'jina-embedding-s-en-v1'}, 'is a T5 encoder'),
        ({'epochz': 1}, "unknown parameter 'epochz' \\(did you mean 'epochs'\\?\\)"),
        ({'csv_options': {'is_labelled': True}}, 'csv_options.is_labelled'),
        ({'csv_options': {'dialect': 'tabs'}}, "unknown dialect 'tabs'"),
        ({'val_split': 1.0}, 'val_split'),
    ],
)
def test_each_refused_argument_says_what_to_use(params, message):
    refused(message, **params)


def test_a_mapped_image_model_with_weights_given(tmp_path):
    assert train(model='resnet-base', weights='w.pth')['model'] == 'torchvision/resnet50'
    assert train(model='efficientnet-large', pretrained=False)['model'] == 'torchvision/efficientnet_b7'


def write(path: Path, rows: list[list[str]], delimiter: str = ',') -> Path:
    with open(path, 'w', newline='') as fh:
        csv.writer(fh, delimiter=delimiter).writerows(rows)
    return path


def images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(folder / f'{i}.png')
    return [f'img/{i}.png' for i in range(count)]


def test_headerless_csvs_read_as_finetuner_read_them(tmp_path):
    names = images(tmp_path / 'img', 5)
    labelled = write(tmp_path / 'labelled.csv', [[names[0], 'cat'], [names[1], 'dog'], ['a sentence', 'x']][:2])
    items = load_items(labelled, [tmp_path], CSVOptions(is_labeled=True))
    assert [(Path(i.uri).name, i.label, i.name) for i in items] == [
        ('0.png', 'cat', 'labelled.csv line 1'),
        ('1.png', 'dog', 'labelled.csv line 2'),
    ]
    texts = load_items(
        write(tmp_path / 't.tsv', [['hello world', 'greeting']], '\t'), None, CSVOptions(is_labeled=True)
    )
    assert (texts[0].text, texts[0].label) == ('hello world', 'greeting')  # tab sniffed; any file is a CSV
    # pairs (is_labeled=False, Finetuner's default): images one class per pair, a later pair joining a seen image
    pairs = write(tmp_path / 'pairs.csv', [[names[0], names[1]], [names[2], names[3]], [names[1], names[4]]])
    items = load_items(pairs, [tmp_path])  # no csv_options: a first row that is no header is data
    assert [(Path(i.uri).name, i.label) for i in items] == [
        ('0.png', 'pair-0'),
        ('1.png', 'pair-0'),
        ('2.png', 'pair-1'),
        ('3.png', 'pair-1'),
        ('4.png', 'pair-0'),
    ]
    sentences = load_items(write(tmp_path / 's.csv', [['how old are you', 'what is your age']]))
    assert sentences[0].columns == ('how old are you', 'what is your age') and sentences[0].label is None
    scored = load_items(write(tmp_path / 'sc.csv', [['a', 'b', '0.5']]))
    assert (scored[0].columns, scored[0].score) == (('a', 'b'), 0.5)
    rows = [[f'sentence {i}', f'other {i}'] for i in range(50)]
    sampled = load_items(write(tmp_path / 'many.csv', rows), None, CSVOptions(sampling_rate=0.5, size=10))
    again = load_items(tmp_path / 'many.csv', None, CSVOptions(sampling_rate=0.5, size=10))
    assert len(sampled) == 10 and [i.columns for i in sampled] == [i.columns for i in again] != rows[:10]


@pytest.mark.parametrize(
    ('rows', 'options', 'message'),
    [
        ([['a', 'x'], ['b', 'y', 'z']], {'is_labeled': True}, 'bad.csv line 2: 3 columns; a CSV without a header'),
        ([['a', 'x'], ['b', '']], {'is_labeled': True}, 'bad.csv line 2: column 2 is empty'),
        ([['img/0.png', 'x'], ['a sentence', 'y']], {'is_labeled': True}, "bad.csv line 2: 'a sentence' \\(text\\)"),
        ([['img/0.png', 'a caption']], {}, 'bad.csv line 1: an image and a text in one row make a text-to-image'),
        ([['a', 'b', 'high']], {}, "bad.csv line 1: score 'high' is not a number"),
        ([['a', 'b', 'c', 'd']], {}, 'bad.csv line 1: 4 columns'),
    ],
)
def test_bad_rows_of_a_headerless_csv_are_named_by_file_and_line(tmp_path, rows, options, message):
    images(tmp_path / 'img', 1)
    with pytest.raises(DataError, match=message):
        load_items(write(tmp_path / 'bad.csv', rows), [tmp_path], CSVOptions(**options))


def test_a_misnamed_header_is_still_an_error(tmp_path):
    images(tmp_path / 'img', 1)  # a header of unknown names reads as a first row of data, which the next rows belie
    with pytest.raises(DataError, match="h.csv line 2: 'img/0.png' \\(image\\).* if the first line is a header"):
        load_items(write(tmp_path / 'h.csv', [['path', 'class'], ['img/0.png', 'cat']]), [tmp_path])
    with pytest.raises(DataError, match="found \\['label', 'path'\\]"):
        load_items(write(tmp_path / 'h2.csv', [['path', 'label'], ['a', 'b']]))


def test_val_split_holds_out_a_share_of_each_class(tmp_path):
    rows = [[f'sentence {i}', f'c{i % 3}'] for i in range(30)]
    path = write(tmp_path / 'train.csv', rows)
    config = TrainConfig(
        train_data=str(path),
        model='all-MiniLM-L6-v2',
        val_split=0.2,
        csv_options={'is_labeled': True},
        loss='TripletMarginLoss',
    )
    plan = plan_run(config)
    train_items, (held, index) = plan.items, plan.evaluation
    assert index is None and len(train_items) == 24 and len(held) == 6
    assert sorted(i.label for i in held) == ['c0', 'c0', 'c1', 'c1', 'c2', 'c2']
    assert not {i.id for i in held} & {i.id for i in train_items}
    assert [i.id for i in plan_run(config).evaluation[0]] == [i.id for i in held]  # the same split every time
    assert evaluation_items(config) is None  # the held-out items come from train_data, given no evaluation data
    with pytest.raises(ValidationError, match='val_split'):
        TrainConfig(train_data='x.csv', val_split=-0.1)


def test_early_stopping_baseline_and_wise_ft(tmp_path):
    from types import SimpleNamespace

    from executor.tuning.callbacks import EarlyStopping as Stopping

    stop = Stopping('hit@1', patience=2, baseline=0.5)
    trainer = SimpleNamespace(should_stop=False)
    for value in (0.4, 0.45):  # never above the baseline: stops after patience epochs
        stop.on_epoch_end(trainer, {'hit@1': value})
    assert trainer.should_stop
    # WiSE-FT with alpha=0 keeps the weights training started from (a tiny random timm net, 2 steps)
    from executor.tuning import fit

    folder = tmp_path / 'data'
    for label in 'ab':
        images(folder / label, 4)
    kwargs = dict(
        model='resnet10t',
        pretrained=False,
        train_data=str(folder),
        epochs=1,
        batch_size=4,
        num_items_per_class=2,
        image_size=32,
        tensorboard=False,
        learning_rate=0.1,
        seed=3,
    )
    tuned = fit(**kwargs, output_dir=str(tmp_path / 'tuned')).model
    kept = fit(**kwargs, output_dir=str(tmp_path / 'kept'), callbacks=[WiSEFTCallback(alpha=0.0)]).model
    start = fit(**{**kwargs, 'epochs': 1, 'learning_rate': 1e-12}, output_dir=str(tmp_path / 'start')).model
    weight = next(k for k, v in start.state_dict().items() if k.startswith('backbone.') and v.dim() == 4)
    states = [m.state_dict()[weight] for m in (tuned, kept, start)]
    assert not torch.allclose(states[0], states[1]) and torch.allclose(states[1], states[2], atol=1e-6)


def test_a_per_epoch_schedule_moves_the_rate_at_epoch_ends():
    from executor.tuning.config import SchedulerOptions
    from executor.tuning.schedulers import build_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    options = SchedulerOptions(scheduler_step='epoch')
    scheduler = build_scheduler('linear', optimizer, 12, options, steps_per_epoch=4)  # 3 epochs of 4 batches
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([1.0] * 4 + [2 / 3] * 4 + [1 / 3] * 4)


def test_finetuners_callbacks_are_the_cores_own_classes():
    """Issue 28: Finetuner's EvaluationCallback, EarlyStopping, BestModelCheckpoint and WandBLogger were a second set
    of classes beside the core's; now the run builds the very classes a user gives (from the options they stand for)."""
    from executor import client
    from executor.tuning import callbacks, trackers

    assert client.EarlyStopping is callbacks.EarlyStopping and client.EvaluationCallback is callbacks.EvaluationCallback
    assert client.BestModelCheckpoint is callbacks.BestModelCheckpoint and client.WandBLogger is trackers.WandBLogger
    given = EarlyStopping(monitor='hit@1', patience=3, baseline=0.2)
    assert given.to_dict() == {'name': 'EarlyStopping', 'monitor': 'hit@1', 'patience': 3, 'baseline': 0.2}
    as_object = finetuner_config(train_data='t.csv', eval_data='e.csv', callbacks=[given, WandBLogger()])
    as_dicts = finetuner_config(
        train_data='t.csv', eval_data='e.csv', callbacks=[given.to_dict(), {'name': 'WandBLogger'}]
    )
    assert as_object == as_dicts and as_object.callbacks == []  # translated into options, never kept as objects
    assert (as_object.monitor, as_object.early_stopping_patience, as_object.early_stopping_baseline) == (
        'hit@1',
        3,
        0.2,
    )
    assert as_object.loggers == ['tensorboard', 'wandb']
    with pytest.raises(ValueError, match=r'callbacks\[0\] \(EvaluationCallback\): query_data is missing'):
        finetuner_config(train_data='t.csv', callbacks=[{'name': 'EvaluationCallback', 'limit': 5}])
