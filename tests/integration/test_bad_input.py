"""Bad input gets a clear error naming the document or parameter, on every path, and the service keeps serving.

Misspelt parameters are checked on the four paths a request can take (a Deployment or a Flow's gateway, gRPC or
HTTP); every other kind of bad input is sent over gRPC, each followed by a good request that must succeed, and a
run finished before them must be intact afterwards.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from jina import Deployment, Flow
from PIL import Image

from executor.client import FinetunerClient, ServiceError
from executor.docs import FinetunerDoc
from executor.tuning.data.digits import digits, write_digits_folder

CONFIG = Path(__file__).resolve().parents[2] / 'config.yml'
TINY = {'model': 'resnet18', 'pretrained': False, 'image_size': 32, 'epochs': 1, 'batch_size': 20}


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format='PNG')
    return buffer.getvalue()


def digit_docs(per_class: int, offset: int = 40, labelled: bool = True) -> list[FinetunerDoc]:
    images, labels = digits(per_class=per_class, offset=offset, size=32)
    return [
        FinetunerDoc(id=f'd{i}', tensor=img, label=label if labelled else None)
        for i, (img, label) in enumerate(zip(images, labels))
    ]


def server(kind: str, protocol: str, port: int, workspace: Path, data_root: Path) -> Any:
    uses_with = {'data_roots': [str(data_root)], 'runtime': 'torch'}
    if kind == 'deployment':
        return Deployment(
            uses=str(CONFIG),
            uses_with=uses_with,
            workspace=str(workspace),
            protocol=protocol,
            host='127.0.0.1',
            port=port,
        )
    return Flow(protocol=protocol, host='127.0.0.1', port=port).add(
        uses=str(CONFIG), uses_with=uses_with, workspace=str(workspace)
    )


def post(protocol: str, port: int, endpoint: str, parameters: dict, docs: list[FinetunerDoc] = ()) -> list:
    """One request over gRPC (jina's client) or HTTP (plain JSON); the service's error as ServiceError."""
    if protocol == 'grpc':
        return list(FinetunerClient(f'grpc://127.0.0.1:{port}').post(endpoint, docs, parameters))
    body = {'data': [{'id': d.id, 'tensor': np.asarray(d.tensor).tolist()} for d in docs], 'parameters': parameters}
    reply = requests.post(f'http://127.0.0.1:{port}{endpoint}', json=body, timeout=120)
    if reply.status_code != 200:
        raise ServiceError(f'{reply.status_code}: {reply.json()["detail"]}')
    return reply.json()['data']


@pytest.mark.parametrize(
    'kind,protocol', [('deployment', 'grpc'), ('deployment', 'http'), ('flow', 'grpc'), ('flow', 'http')]
)
def test_a_misspelt_parameter_is_an_error_on_every_path(
    kind: str, protocol: str, tmp_path: Path, free_port: Callable[[], int]
):
    port = free_port()
    with server(kind, protocol, port, tmp_path, tmp_path):
        with pytest.raises(ServiceError, match=r"unknown parameter 'batchsize' \(did you mean 'batch_size'\?\)"):
            post(protocol, port, '/encode', {'batchsize': 4})
        with pytest.raises(ServiceError, match=r"unknown parameter 'epoch' \(did you mean 'epochs'\?\)"):
            post(protocol, port, '/train', {'epoch': 1, 'train_data': 'x'})
        with pytest.raises(ServiceError, match=r"parameter 'since': Input should be greater than or equal to 0"):
            post(protocol, port, '/runs/logs', {'run_id': 'r', 'since': -1})
        # well-spelt parameters arrive, integers too (gRPC carries every number as a float)
        with pytest.raises(ServiceError, match=r"unknown run_id 'nope'"):
            post(protocol, port, '/runs/logs', {'run_id': 'nope', 'since': 2, 'limit': 10})
        assert post(protocol, port, '/encode', {'batch_size': 4, 'runtime': 'torch'}) == []
        assert post(protocol, port, '/runs', {}) == []
        if protocol == 'http':  # the OpenAPI page lists every endpoint (parameters show as a free-form object)
            paths = requests.get(f'http://127.0.0.1:{port}/openapi.json', timeout=30).json()['paths']
            assert {
                '/train',
                '/runs',
                '/runs/status',
                '/runs/logs',
                '/runs/cancel',
                '/encode',
                '/evaluate',
                '/export',
                '/classify',
            } <= set(paths)


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob('*'))
        if p.is_file()
    }


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """Digits, a few broken files, a symlink leading out of the root, and a folder of one class."""
    root = tmp_path / 'data'
    write_digits_folder(root / 'digits', per_class=3, size=32)
    good_png = png_bytes(np.asarray(digit_docs(per_class=1)[0].tensor))
    (root / 'broken').mkdir()
    (root / 'broken' / 'corrupt.png').write_bytes(good_png[:40])
    (root / 'broken' / 'noise.jpg').write_bytes(np.random.default_rng(0).bytes(500))
    write_digits_folder(root / 'with-corrupt', per_class=3, size=32)
    (root / 'with-corrupt' / '7' / 'zz-truncated.png').write_bytes(good_png[: len(good_png) // 2])
    secret = tmp_path / 'outside' / 'secret.png'
    secret.parent.mkdir()
    secret.write_bytes(good_png)
    (root / 'link.png').symlink_to(secret)
    write_digits_folder(root / 'one-class', per_class=3, size=32)
    for digit in '123456789':
        for png in (root / 'one-class' / digit).iterdir():
            png.unlink()
        (root / 'one-class' / digit).rmdir()
    return root


def test_each_bad_request_is_named_and_the_service_keeps_serving(
    tmp_path: Path, free_port: Callable[[], int], data_root: Path
):
    root = data_root
    image = digit_docs(per_class=1)[0]
    good_png = png_bytes(np.asarray(image.tensor))
    port = free_port()
    with server('deployment', 'grpc', port, tmp_path / 'ws', root):
        client = FinetunerClient(f'grpc://127.0.0.1:{port}')
        reference = np.stack(client.encode([image]).embedding)  # the served default model
        cases: list[tuple[str, list, dict, str]] = [
            # images that cannot be read
            ('/encode', [FinetunerDoc(id='noise', blob=b'\x89PNG not really')], {}, r"document 'noise': cannot decode"),
            ('/encode', [FinetunerDoc(id='cut', blob=good_png[:60])], {}, r"document 'cut': cannot decode the image"),
            ('/encode', [FinetunerDoc(id='empty-blob', blob=b'')], {}, r"document 'empty-blob': blob is empty"),
            (
                '/encode',
                [FinetunerDoc(id='gone', uri=str(root / 'missing.png'))],
                {},
                r"document '/.*missing.png': file .*missing.png' does not exist",
            ),
            (
                '/encode',
                [FinetunerDoc(id='trunc', uri=str(root / 'broken' / 'corrupt.png'))],
                {},
                r"document '/.*broken/corrupt.png': cannot decode",
            ),
            (
                '/encode',
                [FinetunerDoc(id='jpg', uri=str(root / 'broken' / 'noise.jpg'))],
                {},
                r"document '/.*broken/noise.jpg': cannot decode",
            ),
            ('/encode', [FinetunerDoc(id='flat', tensor=np.zeros(7))], {}, r"document 'flat': tensor of shape \(7,\)"),
            ('/encode', [FinetunerDoc(id='nan', tensor=np.full((8, 8), np.nan))], {}, r"document 'nan': .*NaN"),
            ('/encode', [FinetunerDoc(id='words', text='a cat')], {}, r"document 'words' is text only"),
            ('/encode', [FinetunerDoc(id='blank', text='  ')], {}, r"document 'blank': text is empty"),
            ('/encode', [FinetunerDoc(id='nothing')], {}, r"document 'nothing': has no content"),
            ('/classify', [image], {}, r'no classifier head: /classify needs'),
            # paths outside the data roots, symlinks resolved
            (
                '/encode',
                [FinetunerDoc(id='etc', uri='/etc/hostname')],
                {},
                r"document '/etc/hostname'.* outside the data roots",
            ),
            (
                '/encode',
                [FinetunerDoc(id='link', uri=str(root / 'link.png'))],
                {},
                r"document '/.*link.png'.*resolves to .*secret.png', outside the data roots",
            ),
            ('/train', [], {'train_data': '/etc', **TINY}, r"train_data.*'/etc'.* outside the data roots"),
            ('/train', [], {'train_data': '../outside', **TINY}, r'outside the data roots'),
            ('/train', [], {'train_data': 'digits', 'weights': '/etc/passwd'}, r'weights: .* outside the data roots'),
            ('/evaluate', [], {'data': '/tmp'}, r'outside the data roots'),
            # training data that cannot train
            (
                '/train',
                digit_docs(2, labelled=False),
                TINY,
                r'20 training items have no label .* the loss is supervised',
            ),
            ('/train', digit_docs(1)[:1], TINY, r'training data has 1 item; training needs at least 2'),
            ('/train', digit_docs(1), TINY, r"classes \['0', '1', .*\] have a single item"),
            ('/train', [], {'train_data': 'one-class', **TINY}, r'training data has 1 class'),
            ('/train', [], {'train_data': 'no-such-folder', **TINY}, r"image folder .*no-such-folder' does not exist"),
            ('/train', [], TINY, r'no training data: send labelled documents'),
            (
                '/train',
                [*digit_docs(2)[:19], FinetunerDoc(id='bad', blob=b'junk', label='9')],
                TINY,
                r"document 'bad': cannot decode",
            ),
            ('/train', digit_docs(2), {'train_data': 'digits', **TINY}, r'got documents and train_data'),
            # unknown names, bad values
            ('/train', [], {'train_data': 'digits', 'model': 'resnet5'}, r"unknown model 'resnet5'; did you mean"),
            ('/train', [], {'train_data': 'digits', 'loss': 'TripletLoss'}, r"unknown loss 'TripletLoss'"),
            ('/train', [], {'train_data': 'digits', 'miner': 'HardMiner'}, r"unknown miner 'HardMiner'"),
            ('/train', [], {'train_data': 'digits', 'optimiser': 'SGD'}, r"unknown parameter 'optimiser'"),
            ('/train', [], {'train_data': 'digits', 'epochs': -1}, r"parameter 'epochs': .*greater than or equal to 1"),
            ('/train', [], {'train_data': 'digits', 'batch_size': 10**9}, r"'batch_size': .*less than or equal"),
            ('/train', [], {'train_data': 'digits', 'learning_rate': -0.1}, r"'learning_rate': .*greater than 0"),
            ('/train', [], {'train_data': 'digits', 'device': 'tpu'}, r"device must be 'auto', 'cpu', 'cuda'"),
            ('/encode', [image], {'model': 'resnet5'}, r"unknown model 'resnet5'"),
            ('/encode', [image], {'run_id': 'r', 'model': 'resnet18'}, r'give run_id or model, not both'),
            ('/encode', [image], {'batch_size': 0}, r"'batch_size': .*greater than or equal to 1"),
            ('/encode', [image], {'runtime': 'tensorflow'}, r"'runtime': Input should be 'onnx' or 'torch'"),
            ('/export', [], {'run_id': 'r', 'fp16': True, 'quantize': True}, r'choose fp16=true or quantize=true'),
            ('/evaluate', digit_docs(1, labelled=False), {}, r"document 'd0' has no label"),
            # unknown runs
            ('/runs/status', [], {'run_id': 'nope'}, r"unknown run_id 'nope'; known runs \(latest\): none yet"),
            ('/runs/logs', [], {'run_id': 'nope'}, r"unknown run_id 'nope'"),
            ('/runs/cancel', [], {'run_id': 'nope'}, r"unknown run_id 'nope'"),
            ('/encode', [image], {'run_id': 'nope'}, r"unknown run_id 'nope'"),
            ('/export', [], {'run_id': 'nope'}, r"unknown run_id 'nope'"),
            ('/train', [], {'resume': 'nope'}, r"unknown run_id 'nope'"),
            (
                '/train',
                [],
                {'resume': 'nope', 'epochs': 3, 'learning_rate': 0.1},
                r"continues that run with its own options; drop \['learning_rate'\]",
            ),
            ('/train', [], {'resume': 'nope', 'epochs': 3}, r"unknown run_id 'nope'"),
            ('/runs/status', [], {'run_id': '../nope'}, r"'run_id': String should match pattern"),
        ]
        for endpoint, docs, parameters, expected in cases:
            with pytest.raises(ServiceError, match=expected):
                client.post(endpoint, docs, parameters)
            good = np.stack(client.encode([image]).embedding)  # a good request right after
            assert np.allclose(good, reference, atol=1e-5), (endpoint, parameters)

        assert client.list_runs() == []  # no bad request created a run
        assert not list((tmp_path / 'ws').rglob('runs/*/*'))  # nor left files behind
        for endpoint in ('/encode', '/classify', '/evaluate'):  # an empty request has an empty result
            assert len(client.post(endpoint, [], {})) == 0


@pytest.mark.slow
def test_bad_training_data_fails_its_run_and_spares_earlier_runs(
    tmp_path: Path, free_port: Callable[[], int], data_root: Path
):
    image = digit_docs(per_class=1)[0]
    port = free_port()
    with server('deployment', 'grpc', port, tmp_path / 'ws', data_root):
        client = FinetunerClient(f'grpc://127.0.0.1:{port}')
        done = client.fit(train_data='digits', run_name='done', wait=True, **TINY)
        assert done.status()['status'] == 'FINISHED'
        run_folder = Path(done.artifact).parent
        before = folder_digest(run_folder)
        reference = np.stack(client.encode([image], run_id='done').embedding)

        for parameters, expected in [
            ({'resume': 'done'}, r"run 'done' is FINISHED and cannot be resumed"),
            ({'train_data': 'digits', 'run_name': 'done'}, r"a run named 'done' exists already"),
        ]:
            with pytest.raises(ServiceError, match=expected):
                client.post('/train', [], parameters)
        with pytest.raises(ServiceError, match=r'no classifier head'):
            client.classify([image], run_id='done')

        # a corrupt file found while training fails that run only, naming the file
        failed = client.fit(
            train_data='with-corrupt', wait=True, loss='CrossEntropyLoss', **{**TINY, 'batch_size': 31}
        ).info()  # one batch holds every image
        assert failed.status == 'FAILED' and 'zz-truncated.png' in failed.error and 'cannot decode' in failed.error
        assert folder_digest(run_folder) == before
        assert np.allclose(np.stack(client.encode([image], run_id='done').embedding), reference, atol=1e-5)
