"""Finetuner's own ``finetuner.fit(...)`` calls, run through ``FinetunerClient`` with only the connect line changed.

The calls are those of Finetuner's documentation and tutorials at its last release (jina-ai/finetuner v0.8.1, the
same in v0.7.8): ``README.md`` has none; ``docs/`` (its notebooks' ``.md`` twins hold the same calls as their
``.ipynb``) has 24 ``finetuner.fit(`` calls. One is the page template's placeholder ``finetuner.fit(...)``
(``docs/_templates/template_ft_in_action.md``), not a call, which leaves 23, in ``CALLS`` below with their file and
line. Ten of those are snippets that show a few arguments and ``...`` for the rest of the call; here ``...`` is a
base call on the offline default model (``BASE``, one epoch on 16 digits at 64 px), the snippet's own arguments
unchanged. The data sets they name on Jina AI Cloud (``'finetuner/tll-train-data'`` ...) are folders and CSV files of
those names under the service's data root, made here from scikit-learn's digits.

``finetuner.login()`` becomes ``client = FinetunerClient('grpc://127.0.0.1:<port>')`` and ``finetuner.fit`` is
``client.fit``; nothing else changes. Of the 23 calls, 8 train (the sampler snippet in its three variants; the one
that continues a run trains Finetuner's default 5 epochs, so it is marked slow), 11 are refused with a message
saying what to use, and 4 start a run that fails, its error saying why (models whose weights are not on this
machine; ``device='cuda'`` without a GPU). Measured here: 25 cases passed in 338 s on 2 shared cores.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from jina import Deployment
from PIL import Image

from executor.client import (
    CSVOptions,
    EarlyStopping,
    EvaluationCallback,
    FinetunerClient,
    Run,
    ServiceError,
    WandBLogger,
    WiSEFTCallback,
)

ROOT = Path(__file__).resolve().parents[2]
BASE = {'model': 'efficientnet_lite0', 'train_data': 'finetuner/tll-train-data', 'epochs': 1, 'batch_size': 8}
BASE['image_size'] = 64  # the ``...`` of a snippet: what the rest of the call is here
GPU = torch.cuda.is_available()
NO_WEIGHTS = "model '{}' was asked for pretrained, but no weights are reachable offline"
NO_CUDA = "device='cuda' but no CUDA device is visible"
runs: dict[str, Run] = {}  # the runs that trained, for the call that continues one (model_artifact)


def call_run_job_artifact(finetuner: Any) -> Run:
    run = runs['basic-concepts.md:33']  # the docs continue the run of the page before; here the last one trained
    return finetuner.fit(model='efficientnet_b0', train_data=train_data, model_artifact=run.artifact_id)


train_data, eval_data = 'finetuner/tll-train-data', 'finetuner/tll-test-query-data'
# (where, the call, what it gets: 'trains', ('refused', message) or ('fails', message))
CALLS: list[Any] = [
    *[
        (
            f'advanced-losses-optimizers-and-poolers.md:42 sampler={sampler}',
            lambda f, sampler=sampler: f.fit(**BASE, loss='ArcFaceLoss', sampler=sampler),
            'trains',
        )
        for sampler in ('random', 'class', 'auto')
    ],
    (
        'advanced-losses-optimizers-and-poolers.md:62',
        lambda f: f.fit(
            **BASE, loss='ArcFaceLoss', loss_optimizer='Adam', loss_optimizer_options={'weight_decay': 0.01}
        ),
        'trains',
    ),
    (
        'advanced-losses-optimizers-and-poolers.md:105',
        lambda f: f.fit(**BASE, model_options={'pooler': 'GeM', 'pooler_options': {'p': 2.4, 'eps': 1e-5}}),
        ('refused', 'the GeM pooler here learns its p, starting from 3 .* drop pooler_options'),
    ),
    (
        'linear-probe.md:46',
        lambda f: f.fit(**{**BASE, 'model': 'resnet50'}, freeze=True, output_dim=1024),
        ('fails', NO_WEIGHTS.format('resnet50')),
    ),
    (
        'negative-mining.md:67',
        lambda f: f.fit(
            **BASE,
            loss='TripleMarginLoss',
            miner='TripletMarginMiner',
            miner_options={'margin': 0.3, 'type_of_triplets': 'hard'},
        ),
        ('refused', "unknown loss 'TripleMarginLoss'; did you mean 'TripletMarginLoss'"),
    ),
    (
        'using-callbacks.md:8',
        lambda f: f.fit(
            **BASE,
            callbacks=[
                EvaluationCallback(query_data='finetuner/tll-test-query-da', index_data='finetuner/tll-test-index-da')
            ],
        ),
        'trains',
    ),
    (
        'using-callbacks.md:135',
        lambda f: f.fit(
            model='openai/clip-vit-base-patch32',
            run_name='clip-fashion-early',
            train_data='finetuner/fashion-train-data-clip',
            epochs=10,
            learning_rate=1e-5,
            loss='CLIPLoss',
            device='cuda',
            callbacks=[EarlyStopping(monitor='train_loss', mode='min', patience=2, min_delta=1, baseline=1.5)],
        ),
        ('refused', "Finetuner's 'openai/clip-vit-base-patch32' is a CLIP model"),
    ),
    (
        'using-callbacks.md:194',
        lambda f: f.fit(
            model='resnet50',
            run_name='resnet-tll-early-6',
            train_data='finetuner/tll-train-da',
            epochs=5,
            learning_rate=1e-6,
            callbacks=[
                EvaluationCallback(query_data='finetuner/tll-test-query-da', index_data='finetuner/tll-test-index-da'),
                WandBLogger(),
            ],
        ),
        ('fails', NO_WEIGHTS.format('resnet50')),  # WandBLogger taken (loggers=['tensorboard', 'wandb'])
    ),
    (
        'data_synthesis.md:142',
        lambda f: f.fit(
            model='sbert-base-en',
            train_data='finetuner/xmarket-gpl-train',
            loss='MarginMSELoss',
            optimizer='Adam',
            learning_rate=1e-5,
            epochs=3,
            callbacks=[
                EvaluationCallback(
                    query_data='finetuner/xmarket-gpl-eval-queries',
                    index_data='finetuner/xmarket-gpl-eval-index',
                    batch_size=32,
                )
            ],
        ),
        ('refused', "Finetuner's 'sbert-base-en' is Hugging Face's 'sentence-transformers/msmarco-distilbert-base-v3'"),
    ),
    (
        'image_to_image.md:87',
        lambda f: f.fit(
            model='resnet-base',
            train_data='finetuner/tll-train-data',
            batch_size=128,
            epochs=5,
            learning_rate=1e-4,
            device='cuda',
            callbacks=[
                EvaluationCallback(
                    query_data='finetuner/tll-test-query-data', index_data='finetuner/tll-test-index-data'
                )
            ],
        ),
        ('refused', "'resnet-base' is torchvision's ResNet50 .* or use model='efficientnet_lite0'"),
    ),
    (
        'image_to_image_arcface.md:90',
        lambda f: f.fit(
            model='resnet-base',
            train_data='finetuner/stanford-cars-train',
            batch_size=128,
            epochs=5,
            learning_rate=1e-3,
            loss='ArcFaceLoss',
            device='cuda',
            sampler='random',
            callbacks=[
                EvaluationCallback(
                    query_data='finetuner/stanford-cars-query', index_data='finetuner/stanford-cars-index'
                )
            ],
        ),
        ('refused', "'resnet-base' is torchvision's ResNet50"),
    ),
    (
        'mesh_to_mesh.md:101',
        lambda f: f.fit(
            model='pointnet-base',
            train_data='finetuner/modelnet40-train',
            epochs=10,
            batch_size=64,
            learning_rate=5e-4,
            loss='TripletMarginLoss',
            device='cuda',
            callbacks=[
                EvaluationCallback(
                    query_data='finetuner/modelnet40-queries', index_data='finetuner/modelnet40-index', batch_size=64
                )
            ],
        ),
        ('refused', "'pointnet-base' is a 3D mesh \\(point cloud\\) model"),
    ),
    (
        'multilingual_text_to_image.md:86',
        lambda f: f.fit(
            model='clip-base-multi',
            train_data='finetuner/DE-Fashion-Image-Text-Multimodal-train',
            epochs=5,
            learning_rate=1e-6,
            loss='CLIPLoss',
            device='cuda',
            callbacks=[
                EvaluationCallback(
                    query_data='finetuner/DE-Fashion-Image-Text-Multimodal-query',
                    index_data='finetuner/DE-Fashion-Image-Text-Multimodal-index',
                    model='clip-text',
                    index_model='clip-vision',
                ),
                WandBLogger(),
            ],
        ),
        ('refused', "Finetuner's 'clip-base-multi' is a CLIP model"),
    ),
    (
        'text_to_image.md:86',
        lambda f: f.fit(
            model='clip-base-en',
            train_data='finetuner/fashion-train-data-clip',
            eval_data='finetuner/fashion-eval-data-clip',
            epochs=5,
            learning_rate=1e-7,
            loss='CLIPLoss',
            device='cuda',
            callbacks=[
                EvaluationCallback(
                    model='clip-text',
                    index_model='clip-vision',
                    query_data='finetuner/fashion-eval-data-queries',
                    index_data='finetuner/fashion-eval-data-index',
                )
            ],
        ),
        ('refused', "Finetuner's 'clip-base-en' is a CLIP model"),
    ),
    (
        'text_to_image.md:226',
        lambda f: f.fit(**{**BASE, 'model': 'clip-base-en'}, loss='CLIPLoss', callbacks=[WiSEFTCallback(alpha=0.5)]),
        ('refused', "Finetuner's 'clip-base-en' is a CLIP model"),
    ),
    (
        'text_to_text.md:109',
        lambda f: f.fit(
            model='bert-base-en',
            train_data='finetuner/quora-train-da',
            loss='TripletMarginLoss',
            optimizer='Adam',
            learning_rate=1e-5,
            epochs=3,
            batch_size=128,
            device='cuda',
            callbacks=[
                EvaluationCallback(
                    query_data='finetuner/quora-test-query-da',
                    index_data='finetuner/quora-test-index-da',
                    batch_size=32,
                )
            ],
        ),
        ('refused', "Finetuner's 'bert-base-en' is Hugging Face's 'bert-base-cased'"),
    ),
    (
        'basic-concepts.md:33',
        lambda f: f.fit(**BASE, experiment_name='quora-qa-finetune', run_name='quora-qa-finetune-bert'),
        'trains',
    ),
    (
        'create-training-data.md:47',
        lambda f: f.fit(**{**BASE, 'train_data': 'your-data.csv'}, csv_options=CSVOptions(is_labeled=True)),
        'trains',
    ),
    (
        'index.md:31',
        lambda f: f.fit(model='resnet50', train_data=train_data, epochs=5, batch_size=128),
        ('fails', NO_WEIGHTS.format('resnet50')),
    ),
    (
        'run-job.md:19',
        lambda f: f.fit(model='efficientnet_b0', train_data=train_data),
        ('fails', NO_WEIGHTS.format('efficientnet_b0')),
    ),
    pytest.param('run-job.md:49', call_run_job_artifact, 'trains', marks=pytest.mark.slow),  # 5 epochs: ~45 s
    (
        'run-job.md:79',
        lambda f: f.fit(
            model='efficientnet_b0',
            train_data=train_data,
            eval_data=eval_data,
            run_name='finetune-flickr-dataset-efficientnet-1',
            description='this is a trial run on flickr8k dataset with efficientnet b0.',
            experiment_name='finetune-flickr-dataset',
            model_options={},
            loss='TripletMarginLoss',
            miner='TripletMarginMiner',
            miner_options={'margin': 0.2},
            scheduler='linear',
            scheduler_options={},
            optimizer='Adam',
            optimizer_options={'weight_decay': 0.01},
            learning_rate=1e-4,
            epochs=5,
            batch_size=128,
            scheduler_step='batch',
            freeze=False,
            output_dim=512,
            device='cuda',
            num_workers=4,
            to_onnx=False,
            csv_options=CSVOptions(),
            public=False,
            num_items_per_class=4,
        ),
        ('fails', NO_WEIGHTS.format('efficientnet_b0') if GPU else NO_CUDA),
    ),
    (
        'run-job.md:165',
        lambda f: f.fit(**BASE, optimizer='Adam', optimizer_options={'layer_wise_lr_decay': 0.98}),
        ('refused', 'layer_wise_lr_decay .* is not taken here; drop it, .* freeze=<number of leading layers>'),
    ),
]
# make test runs every refused call and a few that train or fail (a CSV, callbacks, W&B, a GPU asked for); the
# other runs, about 15 s each, are in make test-slow
SLOW_CASES = {
    'advanced-losses-optimizers-and-poolers.md:42 sampler=class',
    'advanced-losses-optimizers-and-poolers.md:42 sampler=auto',
    'advanced-losses-optimizers-and-poolers.md:62',
    'linear-probe.md:46',
    'basic-concepts.md:33',
    'index.md:31',
    'run-job.md:19',
}
CALLS = [
    pytest.param(*c, marks=pytest.mark.slow) if not hasattr(c, 'values') and c[0] in SLOW_CASES else c for c in CALLS
]
# the sampler snippet counts once: 23 calls
WHERE = [c.values[0] if hasattr(c, 'values') else c[0] for c in CALLS]
assert SLOW_CASES <= set(WHERE)
assert len({where.split(' ')[0] for where in WHERE}) == 23


def digit_folder(root: Path, per_class: int, offset: int) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(4):
        images = digits.images[digits.target == label][offset : offset + per_class]
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            pixels = (image / 16 * 255).astype(np.uint8)
            Image.fromarray(pixels).resize((32, 32)).convert('RGB').save(root / str(label) / f'{i}.png')


@pytest.fixture(scope='module')
def client(tmp_path_factory: pytest.TempPathFactory, free_port: Callable[[], int]) -> Iterator[FinetunerClient]:
    root = tmp_path_factory.mktemp('finetuner-data')
    for name in ('tll-train-data', 'tll-train-da'):
        digit_folder(root / 'finetuner' / name, 4, 0)
    for name in ('tll-test-query-da', 'tll-test-index-da', 'tll-test-query-data', 'tll-test-index-data'):
        digit_folder(root / 'finetuner' / name, 2, 10 if 'query' in name else 20)
    with open(root / 'your-data.csv', 'w', newline='') as fh:  # Finetuner's CSV: no header, item,label
        csv.writer(fh).writerows(
            [p.relative_to(root).as_posix(), p.parent.name] for p in sorted(root.glob('finetuner/tll-train-data/*/*'))
        )
    port = free_port()
    with Deployment(
        uses=str(ROOT / 'config.yml'),
        workspace=str(tmp_path_factory.mktemp('ws')),
        host='127.0.0.1',
        port=port,
        uses_with={'data_roots': [str(root)]},
        env={'FINETUNER_PROGRESS': '0'},
    ):
        yield FinetunerClient(f'grpc://127.0.0.1:{port}')  # the connect line: finetuner.login() before


@pytest.mark.parametrize(('where', 'call', 'expected'), CALLS, ids=WHERE)
def test_finetuner_doc_call(client: FinetunerClient, where: str, call: Callable[[Any], Run], expected: Any):
    finetuner = SimpleNamespace(fit=client.fit)
    if expected == 'trains':
        run = call(finetuner).wait(timeout=600)
        info = run.info()
        assert info.status == 'FINISHED', info.error
        print(f'{where}: FINISHED, metrics {info.metrics}')
        assert 'train_loss' in info.metrics
        runs[where.split(' ')[0]] = run
        if where == 'using-callbacks.md:8':
            assert {'hit@1', 'ndcg@10', 'precision_at_k'} <= set(info.metrics)
        if where == 'basic-concepts.md:33':
            assert run.name == 'quora-qa-finetune-bert'
        return
    kind, message = expected
    if kind == 'refused':
        with pytest.raises(ServiceError, match=message) as refusal:
            call(finetuner)
        print(f'{where}: refused: {refusal.value}')
        return
    info = call(finetuner).wait(timeout=600).info()
    print(f'{where}: {info.status}: {info.error}')
    assert info.status == 'FAILED' and message in info.error
