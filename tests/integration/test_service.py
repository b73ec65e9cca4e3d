"""FinetunerExecutor served by a real Deployment of config.yml on 127.0.0.1: the whole run lifecycle over gRPC (the
Python client) and over HTTP (plain JSON), concurrent requests for different models, and fine-tuning that helps."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from jina import Deployment
from PIL import Image

from executor.client import FinetunerClient, ServiceError
from executor.docs import FinetunerDoc
from executor.tuning.data.digits import digits, write_digits_folder
from executor.tuning.models import load_model
from tests.helpers import retrieval_by_hand

CONFIG = Path(__file__).resolve().parents[2] / 'config.yml'
# Tiny training: random-init resnet18 on 32 px digits, one epoch (3 steps of 20 images).
TINY = {'model': 'resnet18', 'pretrained': False, 'image_size': 32, 'epochs': 1, 'batch_size': 20}
LONG = {**TINY, 'epochs': 1000}  # trains until cancelled


@pytest.fixture(scope='module')
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding `digits/<digit>/*.png`: 6 training images of each digit."""
    root = tmp_path_factory.mktemp('data')
    write_digits_folder(root / 'digits', per_class=6, size=32)
    return root


def held_out(per_class: int = 2, size: int = 32, offset: int = 50) -> list[FinetunerDoc]:
    """Digits the folder runs never train on, as labelled tensor documents."""
    images, labels = digits(per_class=per_class, offset=offset, size=size)
    return [FinetunerDoc(id=f'q{i}', tensor=img, label=label) for i, (img, label) in enumerate(zip(images, labels))]


@pytest.fixture
def serve(model_cache: str) -> Callable[..., Any]:
    """A Deployment of config.yml on 127.0.0.1 (its registry models' ONNX exports in the session's cache)."""

    @contextmanager
    def start(protocol: str, workspace: Path, port: int, data_root: Path, **uses_with: Any) -> Iterator[int]:
        with Deployment(
            uses=str(CONFIG),
            workspace=str(workspace),
            protocol=protocol,
            host='127.0.0.1',
            port=port,
            uses_with={'data_roots': [str(data_root)], 'model_cache': model_cache, **uses_with},
        ):
            yield port

    return start


def wait_for(client: FinetunerClient, run_id: str, statuses: set[str], timeout: float = 240) -> Any:
    deadline = time.monotonic() + timeout
    while (info := client.get_run(run_id).info()).status not in statuses:
        assert time.monotonic() < deadline, f'run {run_id} still {info.status} after {timeout} s'
        time.sleep(0.2)
    return info


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_lifecycle_grpc(tmp_path: Path, free_port: Callable[[], int], data_root: Path, serve: Callable[..., Any]):
    queries = held_out()
    with serve('grpc', tmp_path, free_port(), data_root) as port:
        client = FinetunerClient(f'grpc://127.0.0.1:{port}')
        labels = [q.label for q in queries]
        before = client.evaluate(queries, model='efficientnet_lite0')
        # the queries search each other: the metrics are those of the embeddings /encode gives, computed by hand
        pretrained = np.stack(client.encode(queries, model='efficientnet_lite0').embedding)
        assert before == pytest.approx({**before, **retrieval_by_hand(pretrained, labels)}, abs=1e-4)
        assert 'accuracy' not in before

        run = client.fit(train_data='digits', loss='CrossEntropyLoss', run_name='tiny', **TINY)
        assert run.name == 'tiny' and run.status()['status'] in ('CREATED', 'STARTED')
        info = run.wait(timeout=240).info()
        assert (info.status, info.epoch, info.epochs, info.error) == ('FINISHED', 1, 1, None)
        assert info.step == info.total_steps == 3 and 'train_loss' in info.metrics
        assert info.created_at <= info.started_at <= info.finished_at
        assert load_model(info.artifact).class_names == [str(d) for d in range(10)]
        assert 'epoch 1/1' in run.logs()
        assert list(run.stream_logs(interval=0.1)) == run.logs().splitlines()
        assert [r.name for r in client.list_runs()] == ['tiny']

        torch_emb = np.stack(client.encode(queries, run_id='tiny').embedding)
        assert torch_emb.shape == (len(queries), 512) and np.isfinite(torch_emb).all()
        # the client leaves the images it sent out of the reply unless asked to keep them
        dropped = client.encode(queries[:2], run_id='tiny')
        kept = client.encode(queries[:2], run_id='tiny', drop_image_content=False)
        assert dropped.id == kept.id == [q.id for q in queries[:2]] and dropped.label == kept.label
        assert dropped.tensor == [None, None] and all(t is not None for t in kept.tensor)
        after = client.evaluate(queries, run_id='tiny')
        # (the run's retrieval is not checked by hand: a random-init resnet18 after 3 steps embeds every digit in
        # one direction, nearest neighbours 1e-7 apart in cosine, below float32's resolution, so the order is noise)
        assert set(before) <= set(after) and sum(k.startswith('accuracy/') for k in after) == 10
        classified = client.classify(queries, run_id='tiny')
        assert {d.label for d in classified} <= {str(d) for d in range(10)}
        assert all(
            abs(sum(d.scores.values()) - 1) < 1e-4 and d.label == max(d.scores, key=d.scores.get) for d in classified
        )
        # accuracy, overall and per class, is that of the labels /classify gives
        right = [d.label == label for d, label in zip(classified, labels)]
        assert after['accuracy'] == pytest.approx(sum(right) / len(right), abs=1e-6)
        for digit in map(str, range(10)):
            mine = [ok for ok, label in zip(right, labels) if label == digit]
            assert after[f'accuracy/{digit}'] == pytest.approx(sum(mine) / len(mine), abs=1e-6), digit

        exported = run.export()
        assert exported.endswith('tiny/model.onnx') and Path(exported).is_file()
        onnx_emb = np.stack(client.encode(queries, run_id='tiny').embedding)  # runtime 'onnx' now that it exists
        assert cosine(onnx_emb, torch_emb).min() > 0.999
        assert len(client.encode([], run_id='tiny')) == 0

        # concurrent requests for different models: each gets its own model's embeddings
        reference = np.stack(client.encode(queries[:4], model='efficientnet_lite0').embedding)
        with ThreadPoolExecutor(6) as pool:
            jobs = [
                pool.submit(
                    client.encode, queries[:4], **({'run_id': 'tiny'} if i % 2 else {'model': 'efficientnet_lite0'})
                )
                for i in range(6)
            ]
            results = [np.stack(job.result().embedding) for job in jobs]
        for i, emb in enumerate(results):
            expected = onnx_emb[:4] if i % 2 else reference
            assert emb.shape == expected.shape and cosine(emb, expected).min() > 0.999

        # the device queue: a second run waits CREATED while the first trains; both can be cancelled
        long = client.fit(train_data='digits', run_name='long', **LONG)
        queued = client.fit(train_data='digits', run_name='queued', **TINY)
        wait_for(client, 'long', {'STARTED'})
        assert queued.status()['status'] == 'CREATED'
        assert queued.cancel().info().status == 'CANCELLED'
        cancelled = long.cancel().info()
        assert cancelled.status == 'CANCELLED' and cancelled.finished_at
        with pytest.raises(ServiceError, match="run 'tiny' is FINISHED already; there is nothing to cancel"):
            run.cancel()
        time.sleep(0.5)
        assert queued.status()['status'] == 'CANCELLED'  # the queue skipped it


def http(port: int, endpoint: str, parameters: dict | None = None, data: list | None = None) -> list[dict]:
    body = {'data': data or [], 'parameters': parameters or {}}
    reply = requests.post(f'http://127.0.0.1:{port}{endpoint}', json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply.json()['data']


def as_json(doc: FinetunerDoc) -> dict[str, Any]:
    return {'id': doc.id, 'tensor': np.asarray(doc.tensor).tolist(), 'label': doc.label}


def png_bytes(doc: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(doc['tensor'], dtype=np.uint8)).save(buffer, format='PNG')
    return buffer.getvalue()


@pytest.mark.slow  # 90 s; the same lifecycle as test_lifecycle_grpc, and plain HTTP is driven by many fast tests
def test_lifecycle_http(tmp_path: Path, free_port: Callable[[], int], data_root: Path, serve: Callable[..., Any]):
    queries = [as_json(d) for d in held_out()]
    train_docs = [as_json(d) for d in held_out(per_class=4, offset=60)]
    with serve('http', tmp_path, free_port(), data_root) as port:
        # training documents sent with the request, and wait=true
        (run,) = http(
            port,
            '/train',
            {**TINY, 'loss': 'CrossEntropyLoss', 'to_onnx': True, 'wait': True, 'run_name': 'sent'},
            train_docs,
        )
        assert (run['run_id'], run['status'], run['epoch'], run['error']) == ('sent', 'FINISHED', 1, None)
        assert len(list(tmp_path.rglob('runs/sent/train_docs/*.png'))) == len(train_docs)

        assert http(port, '/runs/status', {'run_id': 'sent'})[0]['status'] == 'FINISHED'
        assert [r['run_id'] for r in http(port, '/runs')] == ['sent']
        (logs,) = http(port, '/runs/logs', {'run_id': 'sent'})
        (tail,) = http(port, '/runs/logs', {'run_id': 'sent', 'since': 1})
        assert logs['lines'][1:] == tail['lines'] and tail['next_since'] == logs['next_since'] == len(logs['lines'])

        encoded = http(port, '/encode', {'run_id': 'sent'}, queries)  # on onnxruntime: the run exported itself
        assert [d['id'] for d in encoded] == [q['id'] for q in queries]
        assert np.array(encoded[0]['embedding']).shape == (512,) and encoded[0]['tensor'] is not None
        png = {'id': 'png', 'uri': 'data:image/png;base64,' + base64.b64encode(png_bytes(queries[0])).decode()}
        path = {'id': 'path', 'uri': str(next((data_root / 'digits').rglob('*.png')))}
        slim, named = http(port, '/encode', {'run_id': 'sent', 'drop_image_content': True}, [png, path])
        assert (slim['id'], slim['uri'], slim['tensor']) == ('png', None, None) and len(slim['embedding']) == 512
        assert named['uri'] == path['uri'] and len(named['embedding']) == 512  # a path names the image: it stays
        assert http(port, '/encode', {'run_id': 'sent'}) == []
        (before,) = http(port, '/evaluate', {'model': 'efficientnet_lite0', 'limit': 5}, queries)
        (after,) = http(port, '/evaluate', {'run_id': 'sent', 'limit': 5}, queries)
        assert before['model'] == 'efficientnet_lite0' and after['run_id'] == 'sent'
        assert set(before['metrics']) < set(after['metrics']) and 'precision_at_k' in after['metrics']
        assert len(after['class_names']) == 10 and np.array(after['confusion_matrix']).sum() == len(queries)

        classified = http(port, '/classify', {'run_id': 'sent'}, queries)
        assert all(d['label'] in d['scores'] and len(d['scores']) == 10 for d in classified)
        (exported,) = http(port, '/export', {'run_id': 'sent', 'format': 'onnx', 'quantize': True})
        assert exported['artifact'].endswith('sent/model-int8.onnx') and exported['status'] == 'FINISHED'

        (long,) = http(port, '/train', {**LONG, 'train_data': 'digits'})
        assert long['status'] in ('CREATED', 'STARTED')
        deadline = time.monotonic() + 240
        while http(port, '/runs/status', {'run_id': long['run_id']})[0]['status'] != 'STARTED':
            assert time.monotonic() < deadline
            time.sleep(0.2)
        (cancelled,) = http(port, '/runs/cancel', {'run_id': long['run_id']})
        assert cancelled['status'] == 'CANCELLED'


@pytest.mark.slow
def test_fine_tuning_the_default_model_improves_retrieval(
    tmp_path: Path, free_port: Callable[[], int], data_root: Path, serve: Callable[..., Any]
):
    queries = held_out(per_class=4, size=64)
    with serve('grpc', tmp_path, free_port(), data_root) as port:
        client = FinetunerClient(f'grpc://127.0.0.1:{port}')
        before = client.evaluate(queries)  # the served default: pre-trained efficientnet_lite0
        run = client.fit(
            train_data='digits',
            image_size=64,
            epochs=3,
            batch_size=30,
            loss='TripletMarginLoss',
            miner='MultiSimilarityMiner',
            to_onnx=True,
            wait=True,
        )
        assert run.status()['status'] == 'FINISHED', run.logs()
        after = client.evaluate(queries, run_id=run.name)
        assert after['ndcg@10'] > before['ndcg@10'] + 0.05, (before, after)
