"""Runs and models over the API, through a real Deployment of config.yml on 127.0.0.1 (gRPC and HTTP): a run's
artifact downloaded as a zip and served by another Deployment with the same embeddings, its reports shown as
Finetuner's display_metrics / example_results, runs deleted (and refused while in progress), the model catalog."""

from __future__ import annotations

import base64
import hashlib
import io
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from jina import Deployment
from rich.console import Console

from executor.client import FinetunerClient, ServiceError
from executor.docs import FinetunerDoc
from executor.tuning.data.digits import digits, write_digits_folder

CONFIG = Path(__file__).resolve().parents[2] / 'config.yml'
# Tiny training: timm's random-init test_resnet (0.4 M weights) on 32 px digits, one epoch (3 steps of 20 images).
TINY = {'model': 'test_resnet', 'pretrained': False, 'image_size': 32, 'epochs': 1, 'batch_size': 20}
LONG = {**TINY, 'epochs': 1000}  # trains until cancelled


@pytest.fixture(scope='module')
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp('data')
    write_digits_folder(root / 'digits', per_class=6, size=32)
    write_digits_folder(root / 'digits-eval', per_class=2, offset=50, size=32)
    return root


@contextmanager
def deployment(workspace: Path, ports: list[int], data_root: Path, **uses_with: Any) -> Iterator[None]:
    """config.yml behind a gRPC and an HTTP port, serving with torch (the run's model.pt and the zip's are one)."""
    with Deployment(
        uses=str(CONFIG),
        workspace=str(workspace),
        protocol=['grpc', 'http'],
        host='127.0.0.1',
        port=ports,
        uses_with={'data_roots': [str(data_root)], 'runtime': 'torch', **uses_with},
    ):
        yield


@pytest.fixture(scope='module')
def served(
    data_root: Path, tmp_path_factory: pytest.TempPathFactory, model_cache: str, free_port: Callable[[], int]
) -> Iterator[tuple[int, int, Path]]:
    """One Deployment with two finished runs, queued together: 'tiny' (with evaluation data) and 'spare' (logged to
    MLflow too); its gRPC and HTTP ports and workspace."""
    ports, workspace = [free_port(), free_port()], tmp_path_factory.mktemp('ws')
    with deployment(workspace, ports, data_root, model_cache=model_cache):
        client = FinetunerClient(f'grpc://127.0.0.1:{ports[0]}')
        client.fit(train_data='digits', eval_data='digits-eval', run_name='tiny', **TINY)
        client.fit(train_data='digits', run_name='spare', loggers=['tensorboard', 'mlflow'], **TINY)
        for run_id in ('tiny', 'spare'):
            assert client.get_run(run_id).wait(timeout=300).info().status == 'FINISHED', client.get_run(run_id).logs()
        yield ports[0], ports[1], workspace


def http(port: int, endpoint: str, parameters: dict | None = None, status: int = 200) -> Any:
    reply = requests.post(f'http://127.0.0.1:{port}{endpoint}', json={'data': [], 'parameters': parameters or {}})
    assert reply.status_code == status, reply.text
    return reply.json()['data'] if status == 200 else reply.json()['detail']


def queries() -> list[FinetunerDoc]:
    images, labels = digits(per_class=1, offset=80, size=32)
    return [FinetunerDoc(id=f'q{i}', tensor=img, label=label) for i, (img, label) in enumerate(zip(images, labels))]


def test_a_downloaded_artifact_zip_serves_the_same_embeddings(
    served: tuple[int, int, Path], data_root: Path, tmp_path: Path, free_port: Callable[[], int]
):
    grpc_port, http_port, workspace = served
    client = FinetunerClient(f'grpc://127.0.0.1:{grpc_port}')
    run = client.get_run('tiny')
    path = run.save_artifact(tmp_path / 'downloads')
    with zipfile.ZipFile(path) as zf:
        members = sorted(zf.namelist())
    print(f'{path.name}: {path.stat().st_size} bytes, {members}')
    assert path == tmp_path / 'downloads' / 'tiny.zip'
    assert {'model.pt', 'preprocessing.json', 'config.json', 'history.jsonl', 'reports/examples.json'} <= set(members)
    assert not [m for m in members if m.startswith(('checkpoints/', 'tensorboard/')) or m.endswith('.log')]
    # over HTTP the same zip comes as base64 in the JSON
    (reply,) = http(http_port, '/runs/artifact', {'run_id': 'tiny'})
    data = base64.b64decode(reply['blob'])
    assert (
        data == path.read_bytes()
        and hashlib.sha256(data).hexdigest() == reply['sha256'] == hashlib.sha256(path.read_bytes()).hexdigest()
    )
    assert (reply['name'], reply['size']) == ('tiny.zip', len(data))

    docs = queries()
    on_server = np.stack(client.encode(docs, run_id='tiny').embedding)
    ports = [free_port(), free_port()]
    with deployment(tmp_path / 'elsewhere', ports, data_root, artifact=str(path)):  # another server, the zip only
        from_zip = np.stack(FinetunerClient(f'grpc://127.0.0.1:{ports[0]}').encode(docs).embedding)
    print(f'embeddings {on_server.shape}: largest difference {np.abs(on_server - from_zip).max()}')
    np.testing.assert_allclose(from_zip, on_server, rtol=0, atol=1e-6)

    with pytest.raises(ServiceError, match="unknown run_id 'nope'"):
        client.get_run('nope').save_artifact(tmp_path)
    assert "unknown run_id 'nope'" in http(http_port, '/runs/artifact', {'run_id': 'nope'}, status=404)


def test_display_metrics_and_example_results_show_the_runs_reports(served: tuple[int, int, Path]):
    grpc_port, http_port, _ = served
    run = FinetunerClient(f'grpc://127.0.0.1:{grpc_port}').get_run('tiny')
    console = Console(file=io.StringIO(), width=120)
    shown = run.display_metrics(console=console)
    examples = run.example_results(console=console)
    text = console.file.getvalue()
    print(text[:1500])
    assert set(shown['before']) == set(shown['after']) and 'ndcg@10' in shown['after']
    assert 'pre-trained' in text and 'ndcg@10' in text and f'{shown["after"]["ndcg@10"]:.4f}' in text
    assert len(examples) == 6 and all(len(e['matches']) == 5 for e in examples)
    assert f'query: {examples[0]["query"]["name"]}' in text
    (report,) = http(http_port, '/runs/reports', {'run_id': 'tiny'})
    assert report['metrics_after'] == pytest.approx(shown['after'])
    assert [(e['name'], e['label']) for e in report['examples']] == [
        (e['query']['name'], e['query']['label']) for e in examples
    ]
    assert [m['score'] for m in report['examples'][0]['matches']] == [m['score'] for m in examples[0]['matches']]
    assert {'curves.png', 'matches.png', 'examples.json', 'metrics_before_after.json'} <= set(report['files'])
    assert len(report['history']) == 1 and report['history'][0]['metrics']['epoch'] == 1

    spare = FinetunerClient(f'grpc://127.0.0.1:{grpc_port}').get_run('spare')  # trained without evaluation data
    assert spare.display_metrics(console=console) == {'before': {}, 'after': {}}
    assert 'it had no evaluation data' in console.file.getvalue()


def test_runs_are_deleted_once_ended_and_refused_while_in_progress(served: tuple[int, int, Path]):
    grpc_port, http_port, workspace = served
    client = FinetunerClient(f'grpc://127.0.0.1:{grpc_port}')
    (folder,) = workspace.rglob('runs/spare')
    assert (folder / 'mlruns').is_dir()  # loggers reached the training process
    deleted = client.delete_run('spare')
    assert (deleted.run_id, deleted.status) == ('spare', 'FINISHED') and not folder.exists()
    assert 'spare' not in [r.name for r in client.list_runs()]
    with pytest.raises(ServiceError, match=r"unknown run_id 'spare'; known runs \(latest\): .*'tiny'"):
        client.delete_run('spare')
    assert "unknown run_id 'nope'" in http(http_port, '/runs/delete', {'run_id': 'nope'}, status=404)

    training = client.fit(train_data='digits', run_name='training', **LONG)
    queued = client.fit(train_data='digits', run_name='queued', **TINY)
    deadline = time.monotonic() + 120
    while training.info().status != 'STARTED':
        assert time.monotonic() < deadline, training.logs()
        time.sleep(0.2)
    with pytest.raises(
        ServiceError, match=r"run 'training' is STARTED \(training\); cancel it first with /runs/cancel"
    ):
        training.delete()
    detail = http(http_port, '/runs/delete', {'run_id': 'queued'}, status=400)
    assert "run 'queued' is CREATED (queued); cancel it first" in detail
    with pytest.raises(ServiceError, match="run 'queued' is CREATED, it has no model to serve yet"):
        queued.save_artifact('unused')
    queued.cancel()
    training.cancel()
    assert training.delete().status == 'CANCELLED' and queued.delete().status == 'CANCELLED'
    assert [r.name for r in client.list_runs()] == ['tiny']
    assert sorted(p.name for p in folder.parent.iterdir()) == ['.deleted', 'tiny']


def test_models_lists_the_offline_models_first_over_grpc_and_http(served: tuple[int, int, Path]):
    grpc_port, http_port, _ = served
    client = FinetunerClient(f'grpc://127.0.0.1:{grpc_port}')
    started = time.perf_counter()
    models = client.describe_models()
    seconds = time.perf_counter() - started
    local = [m for m in models if m.weights_local]
    print(f'/models: {len(models)} models in {seconds:.2f} s, local first: {[(m.name, m.output_dim) for m in local]}')
    assert models[: len(local)] == local and len(models) > 1000
    first = {m.name: m for m in local}
    assert (first['efficientnet_lite0'].modality, first['efficientnet_lite0'].output_dim) == ('image', 1280)
    assert (first['all-MiniLM-L6-v2'].modality, first['all-MiniLM-L6-v2'].output_dim) == ('text', 384)
    assert first['efficientnet_lite0'].options == {'pooler': 'avg', 'image_size': 224}
    assert client.list_models()[: len(local)] == [m.name for m in local]

    plain = http(http_port, '/models', {'local_only': True})
    assert [m['name'] for m in plain] == [m.name for m in local] and all(m['weights_local'] for m in plain)
    assert plain[0]['output_dim'] == 1280 and plain[0]['options'] == {'pooler': 'avg', 'image_size': 224}
    (resnet,) = http(http_port, '/models', {'names': ['resnet50']})
    assert (resnet['weights_local'], resnet['output_dim'], resnet['family']) == (False, 2048, 'timm')
    assert "unknown parameter 'local'" in http(http_port, '/models', {'local': True}, status=422)
    assert "unknown model 'resnet5'" in http(http_port, '/models', {'names': ['resnet5']}, status=400)


def test_bad_loggers_are_refused_before_a_run_exists(served: tuple[int, int, Path]):
    grpc_port, http_port, _ = served
    detail = http(http_port, '/train', {**TINY, 'train_data': 'digits', 'loggers': ['wandbb']}, status=422)
    assert "unknown logger 'wandbb' (did you mean 'wandb'?); allowed: 'tensorboard', 'wandb', 'mlflow'" in detail
    with pytest.raises(ServiceError, match="unknown logger 'comet'"):
        FinetunerClient(f'grpc://127.0.0.1:{grpc_port}').fit(train_data='digits', loggers=['comet'], **TINY)
