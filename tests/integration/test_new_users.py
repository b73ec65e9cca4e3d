"""What a Jina or docarray user sends first, through a real Deployment of config.yml on 127.0.0.1 (gRPC and HTTP):
docarray's own ImageDoc/TextDoc, plain JSON without ids, Finetuner's tags['finetuner_label'], a corrupt file named by
its uri, the default registry model on onnxruntime with no run, and resume with other epochs."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from docarray import DocList
from docarray.documents import ImageDoc, TextDoc
from jina import Client, Deployment, Flow
from PIL import Image

from executor.client import FinetunerClient, ServiceError
from executor.docs import FinetunerDoc
from executor.tuning.data.digits import digits, write_digits_folder
from executor.tuning.export import export_onnx
from executor.tuning.models import build_model
from tests.helpers import http

CONFIG = Path(__file__).resolve().parents[2] / 'config.yml'
TINY = {'model': 'resnet18', 'pretrained': False, 'image_size': 32, 'batch_size': 20}


@pytest.fixture(scope='module')
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`digits/<digit>/*.png` (3 of each) and a truncated PNG, `broken/cut.png`."""
    root = tmp_path_factory.mktemp('data')
    write_digits_folder(root / 'digits', per_class=3, size=32)
    (root / 'broken').mkdir()
    (root / 'broken' / 'cut.png').write_bytes((root / 'digits' / '0' / '0000.png').read_bytes()[:70])
    return root


@contextmanager
def deployment(workspace: Path, ports: list[int], data_root: Path, **uses_with: Any) -> Iterator[None]:
    """config.yml behind a gRPC and an HTTP port."""
    with Deployment(
        uses=str(CONFIG),
        workspace=str(workspace),
        protocol=['grpc', 'http'],
        host='127.0.0.1',
        port=ports,
        uses_with={'data_roots': [str(data_root)], **uses_with},
    ):
        yield


@pytest.fixture(scope='module')
def served(
    data_root: Path, tmp_path_factory: pytest.TempPathFactory, model_cache: str, free_port: Callable[[], int]
) -> Iterator[tuple[int, int]]:
    """One Deployment for the tests that only send requests (runtime 'torch'): its gRPC and HTTP ports."""
    ports = [free_port(), free_port()]
    with deployment(tmp_path_factory.mktemp('ws'), ports, data_root, runtime='torch', model_cache=model_cache):
        yield ports[0], ports[1]


def unit(rows: Any) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def test_a_relative_uri_is_found_under_the_data_roots_not_the_servers_folder(served: tuple[int, int], data_root: Path):
    """Issue 21: `{"uri": "digits/3/0009.png"}`, as the README writes it, was looked up in the server's working
    folder and failed."""
    grpc_port, http_port = served
    relative = 'digits/3/0009.png'
    assert (data_root / relative).is_file() and not Path(relative).exists()
    (row,) = http(http_port, '/encode', [{'uri': relative}])
    absolute = http(http_port, '/encode', [{'uri': str(data_root / relative)}])[0]
    assert row['uri'] == relative and np.allclose(row['embedding'], absolute['embedding'], atol=1e-5)
    with pytest.raises(ServiceError, match=r"400: .*document 'digits/3/none.png'.* does not exist"):
        http(http_port, '/encode', [{'uri': 'digits/3/none.png'}])
    with pytest.raises(ServiceError, match=r'400: .*outside the data roots'):
        http(http_port, '/encode', [{'uri': '../../../etc/hostname'}])


def test_a_batch_size_above_the_services_bound_is_refused_naming_it(served: tuple[int, int], data_root: Path):
    """Issue 21: 2000 tiny tensors with batch_size=4096 went through as one forward pass at 224 px and the kernel
    killed the worker; now the service's max_batch_size (uses_with, default 128) bounds a request's batch_size."""
    grpc_port, http_port = served
    docs = [{'tensor': [[1, 2, 3], [4, 5, 6], [7, 8, 9]]} for _ in range(3)]
    with pytest.raises(ServiceError, match=r'422: .*batch_size=4096 is more than .*max_batch_size=128'):
        http(http_port, '/encode', docs, {'batch_size': 4096})
    with pytest.raises(ServiceError, match=r'max_batch_size=128'):
        FinetunerClient(f'grpc://127.0.0.1:{grpc_port}').evaluate(
            [FinetunerDoc(tensor=np.zeros((8, 8, 3), np.uint8), label=str(i % 2)) for i in range(4)], batch_size=129
        )
    assert len(http(http_port, '/encode', docs, {'batch_size': 128})) == 3  # at the bound, and still serving


def test_train_requests_that_would_fail_are_refused_before_a_run_exists(served: tuple[int, int], data_root: Path):
    """Issue 21: these answered CREATED, then the run FAILED in its training process."""
    grpc_port, http_port = served
    (data_root / 'junk.pt').write_bytes(b'\x80\x04junk')
    (data_root / 'remote.csv').write_text('uri,label\nhttps://example.com/a.jpg,a\nhttps://example.com/b.jpg,b\n')
    before = len(http(http_port, '/runs', []))
    refused = {
        'a junk model file': ({'train_data': 'digits', 'model': 'junk.pt'}, r"400: .*'junk.pt' cannot be read"),
        'junk weights': ({'train_data': 'digits', 'weights': 'junk.pt'}, r"400: .*weights file 'junk.pt' cannot be"),
        'a CSV of URLs': ({'train_data': 'remote.csv'}, r"400: .*remote.csv line 2: uri 'https://.* is a URL"),
        'a misspelt loss option': ({'train_data': 'digits', 'loss_options': {'margn': 1}}, r'400: .*no option'),
        'lr in optimizer_options': ({'train_data': 'digits', 'optimizer_options': {'lr': 1}}, r'422: .*learning_rate'),
    }
    for parameters, error in refused.values():  # keyed by what each request gets wrong
        with pytest.raises(ServiceError, match=error):
            http(http_port, '/train', [], {**TINY, 'epochs': 1, **parameters})
    assert len(http(http_port, '/runs', [])) == before  # no run was created for any of them
    assert len(http(http_port, '/encode', [{'uri': 'digits/3/0009.png'}])) == 1  # and the service still serves


def test_an_image_bomb_is_refused_naming_the_document_and_the_bound(served: tuple[int, int], data_root: Path):
    """Issue 21: a small PNG of a huge image was decoded whatever its size (max_image_pixels: 40 Mpx by default)."""
    grpc_port, http_port = served
    Image.new('L', (7000, 7000)).save(data_root / 'bomb.png')  # 49 Mpx in ~50 KB
    assert (data_root / 'bomb.png').stat().st_size < 200_000
    with pytest.raises(ServiceError, match=r"400: .*document 'bomb.png': the image is 7000 x 7000 = 49 Mpx, more than"):
        http(http_port, '/encode', [{'uri': 'bomb.png'}, {'uri': 'digits/3/0009.png'}])
    assert len(http(http_port, '/encode', [{'uri': 'digits/3/0009.png'}])) == 1


def test_invalid_base64_is_named_and_a_broken_served_artifact_stops_the_start(served: tuple[int, int], tmp_path: Path):
    """Issue 21: invalid base64 in a data: URI was reported as "blob is empty"; a broken artifact= was found only by
    the first request."""
    from executor.executor import FinetunerExecutor

    grpc_port, http_port = served
    with pytest.raises(ServiceError, match=r"400: .*document 'b64': its data: URI holds invalid base64"):
        http(http_port, '/encode', [{'id': 'b64', 'uri': 'data:image/png;base64,@@not base64@@'}])
    broken = tmp_path / 'broken'
    broken.mkdir()
    (broken / 'model.pt').write_bytes(b'\x80\x04junk')
    with pytest.raises(ValueError, match=r"'model.pt' cannot be read as a model artifact"):
        FinetunerExecutor(artifact=str(broken), metas={'workspace': str(tmp_path / 'ws')})


def test_docarray_documents_finetuner_tags_and_documents_without_ids(served: tuple[int, int], data_root: Path):
    paths = [data_root / 'digits' / d / f'{int(d) * 3:04d}.png' for d in '012']
    array = np.asarray(Image.open(paths[2]))
    grpc_port, http_port = served
    torch_only = {'runtime': 'torch', 'batch_size': 4}
    ours = FinetunerClient(f'grpc://127.0.0.1:{grpc_port}')
    reference = unit(ours.encode([FinetunerDoc(uri=str(p)) for p in paths], **torch_only).embedding)

    # docarray's ImageDoc over gRPC, answered in the client's own type: url, bytes_ and tensor are read
    client = Client(host=f'grpc://127.0.0.1:{grpc_port}')
    sent = DocList[ImageDoc](
        [ImageDoc(url=str(paths[0])), ImageDoc(bytes_=paths[1].read_bytes()), ImageDoc(tensor=array)]
    )
    got = client.post('/encode', sent, parameters=torch_only, return_type=DocList[ImageDoc])
    assert got.id == sent.id and str(got[0].url) == str(paths[0])
    np.testing.assert_allclose(unit(np.stack(got.embedding)), reference, atol=1e-5)
    with pytest.raises(Exception, match=r'is text only \(1 such\), but this model embeds images'):
        client.post(
            '/encode',
            DocList[TextDoc]([TextDoc(text='a handwritten seven')]),
            parameters=torch_only,
            return_type=DocList[TextDoc],
        )

    # the same as docarray's JSON over HTTP, with no ids: each document gets one, kept in the reply
    as_json = [{'url': str(paths[0])}, {'tensor': array.tolist()}, {'uri': str(paths[1])}]
    replied = http(http_port, '/encode', as_json, torch_only)
    ids = [doc['id'] for doc in replied]
    assert all(isinstance(i, str) and len(i) == 32 for i in ids) and len(set(ids)) == 3
    np.testing.assert_allclose(unit([d['embedding'] for d in replied]), reference[[0, 2, 1]], atol=1e-5)
    with pytest.raises(ServiceError, match=r'is text only'):
        http(http_port, '/encode', [{'text': 'a handwritten seven'}], torch_only)

    # Finetuner's label field: /evaluate needs a label on every document, and tags carry it
    labelled = [{'uri': str(p), 'tags': {'finetuner_label': p.parent.name}} for p in paths * 2]
    (result,) = http(http_port, '/evaluate', labelled, torch_only)
    assert result['metrics']['hit@1'] == 1.0  # each image finds its own copy first
    with pytest.raises(ServiceError, match=r"document '.*0000.png' has no label"):
        http(http_port, '/evaluate', [{'uri': str(paths[0])}, *labelled], torch_only)


def test_errors_name_the_document_by_its_uri(served: tuple[int, int], data_root: Path):
    cut = data_root / 'broken' / 'cut.png'
    good = str(data_root / 'digits' / '1' / '0003.png')
    grpc_port, http_port = served
    client = FinetunerClient(f'grpc://127.0.0.1:{grpc_port}')
    expected = rf"document '{cut}': cannot decode the image"
    with pytest.raises(ServiceError, match=expected):
        client.encode([FinetunerDoc(id='good', uri=good), FinetunerDoc(id='x1', uri=str(cut))])
    with pytest.raises(ServiceError, match=expected):
        http(http_port, '/encode', [{'uri': good}, {'uri': str(cut)}])
    with pytest.raises(ServiceError, match=r"document 'no-uri': cannot decode the image"):
        client.encode([FinetunerDoc(id='no-uri', blob=cut.read_bytes())])  # no uri: named by its id
    with pytest.raises(ServiceError, match=rf"document '{cut}': cannot decode the image"):
        http(http_port, '/train', [{'uri': good, 'label': '1'}, {'uri': str(cut), 'label': '1'}], TINY)
    assert len(http(http_port, '/encode', [{'uri': good}])[0]['embedding']) == 1280  # still serving


def test_the_default_model_with_no_run_is_served_by_onnxruntime_from_a_cached_export(
    tmp_path: Path, data_root: Path, free_port: Callable[[], int]
):
    cache = tmp_path / 'models'
    docs = [FinetunerDoc(uri=str(p)) for p in sorted((data_root / 'digits').rglob('*.png'))[:6]]
    with deployment(tmp_path / 'ws', [free_port(), http_port := free_port()], data_root, model_cache=str(cache)):
        as_json = [{'uri': d.uri} for d in docs]
        onnx_rows = unit([d['embedding'] for d in http(http_port, '/encode', as_json)])  # the default: 'onnx'
        (exported,) = cache.glob('efficientnet_lite0-*/model.onnx')  # exported on first use, named by its weights
        torch_rows = unit([d['embedding'] for d in http(http_port, '/encode', as_json, {'runtime': 'torch'})])
    assert (onnx_rows * torch_rows).sum(-1).min() > 0.9999

    # after a restart the cached file answers, in onnxruntime, and is not exported again: put another model's export
    # in its place, and that model's embeddings come back
    export_onnx(build_model('resnet18', pretrained=False), exported)
    swapped_at = exported.stat().st_mtime_ns
    with deployment(tmp_path / 'ws', [port := free_port(), free_port()], data_root, model_cache=str(cache)):
        swapped = np.stack(FinetunerClient(f'grpc://127.0.0.1:{port}').encode(docs).embedding)
    assert swapped.shape == (len(docs), 512)  # resnet18's width; efficientnet_lite0 gives 1280
    assert list(cache.glob('*/model.onnx')) == [exported] and exported.stat().st_mtime_ns == swapped_at


def test_resume_with_more_or_fewer_epochs_over_grpc_and_http(served: tuple[int, int], data_root: Path):
    grpc_port, http_port = served
    client = FinetunerClient(f'grpc://127.0.0.1:{grpc_port}')
    client.fit(train_data='digits', epochs=1, run_name='short', **TINY).wait(timeout=240)
    (info,) = http(http_port, '/train', [], {'resume': 'short', 'epochs': 3, 'wait': True})
    assert (info['status'], info['epoch'], info['epochs']) == ('FINISHED', 3, 3)
    with pytest.raises(ServiceError, match=r"run 'short' has done 3 epochs already, so it cannot end after 2"):
        client.post('/train', [], {'resume': 'short', 'epochs': 2})
    with pytest.raises(ServiceError, match=r"continues that run with its own options; drop \['learning_rate'\]"):
        http(http_port, '/train', [], {'resume': 'short', 'epochs': 4, 'learning_rate': 0.1})
    assert client.get_run('short').info().epoch == 3


STRANGER = '''
from typing import Optional

from docarray import BaseDoc, DocList
from docarray.base_doc import AnyDoc
from jina import Executor, requests


class Note(BaseDoc):
    text: Optional[str] = None


class Tagger(Executor):
    """Someone else's executor: it reads its own parameter, `mode`, from what is addressed to it, and passes the
    documents of other endpoints through (jina chains an executor only after one whose endpoints it has)."""

    @requests
    def pass_through(self, docs: DocList[AnyDoc], **kwargs) -> DocList[AnyDoc]:
        return docs

    @requests(on='/tag')
    def tag(self, docs: DocList[Note], parameters: dict, **kwargs) -> DocList[Note]:
        for doc in docs:
            doc.text = f"{doc.text} ({parameters.get('mode')})"
        return docs
'''


def test_the_search_flow_with_someone_elses_executor_over_http_and_grpc(tmp_path: Path, free_port: Callable[[], int]):
    """flows/search.yml plus a third executor: id-less JSON documents index over HTTP, parameters addressed to one
    executor reach it alone, a misspelt key is still an error (422 over HTTP), and the OpenAPI page is typed."""
    (tmp_path / 'stranger.py').write_text(STRANGER)
    grpc_port, http_port = free_port(), free_port()
    overrides = {
        'host': '127.0.0.1',
        'port': [grpc_port, http_port],
        'protocol': ['grpc', 'http'],
        'workspace': str(tmp_path / 'ws'),
    }
    images, labels = digits(per_class=1, size=32)
    as_json = [{'tensor': image.tolist(), 'label': label} for image, label in zip(images, labels)]  # no ids
    torch_only = {'runtime': 'torch', 'batch_size': 4}
    flow = Flow.load_config(str(CONFIG.with_name('flows') / 'search.yml'), uses_with=overrides)
    with flow.add(name='tagger', uses='Tagger', py_modules=[str(tmp_path / 'stranger.py')]):
        indexed = http(http_port, '/index', as_json, torch_only)
        ids = [doc['id'] for doc in indexed]
        assert len(set(ids)) == 10 and all(ids)
        (stats,) = http(http_port, '/count', [])
        assert stats['count'] == 10

        for parameters, expected in (
            ({'indexer': {'limit': 3}}, 3),
            ({'indexer__limit': 2}, 2),
            ({}, 10),
            ({'indexer': {'limit': 4}, 'tagger': {'mode': 'loud'}, 'limit': 6}, 4),
        ):
            (by_http,) = http(http_port, '/search', as_json[:1], {**torch_only, **parameters})
            assert len(by_http['matches']) == expected, parameters
            assert by_http['matches'][0]['id'] == ids[0] and by_http['matches'][0]['label'] == '0'
        client = Client(host=f'grpc://127.0.0.1:{grpc_port}')
        (by_grpc,) = client.post(
            '/search',
            DocList[FinetunerDoc]([FinetunerDoc(tensor=images[0])]),
            parameters={**torch_only, 'indexer': {'limit': 3}, 'tagger': {'mode': 'x'}},
            return_type=DocList[FinetunerDoc],
        )
        assert [m.id for m in by_grpc.matches] == [m['id'] for m in by_http['matches']][:3]
        (tagged,) = http(http_port, '/tag', [{'text': 'hello'}], {'tagger': {'mode': 'loud'}})
        assert tagged['text'] == 'hello (loud)'

        # misspelt: at the top level, or inside the object addressed to the executor it is meant for
        for parameters, error in (
            ({'limt': 3}, r"unknown parameter 'limt' \(did you mean 'limit'\?\)"),
            ({'indexer': {'limt': 3}}, r"unknown parameter 'limt'"),
            ({'encoder': {'batchsize': 3}}, r"unknown parameter 'batchsize'"),
        ):
            reply = requests.post(
                f'http://127.0.0.1:{http_port}/search',
                timeout=60,
                json={'data': as_json[:1], 'parameters': {**torch_only, **parameters}},
            )
            assert reply.status_code == 422, (parameters, reply.status_code, reply.text)
            assert re.search(error, reply.json()['detail']), reply.text
            with pytest.raises(ServiceError, match=error):
                FinetunerClient(f'grpc://127.0.0.1:{grpc_port}').post(
                    '/search', [FinetunerDoc(tensor=images[0])], {**torch_only, **parameters}
                )

        # other bad input is a 4xx too, and each endpoint's parameters are typed on the OpenAPI page
        reply = requests.post(
            f'http://127.0.0.1:{http_port}/runs/status', json={'data': [], 'parameters': {'run_id': 'nope'}}, timeout=60
        )
        assert reply.status_code == 404 and 'unknown run_id' in reply.json()['detail']
        reply = requests.post(
            f'http://127.0.0.1:{http_port}/encode', json={'data': [{'uri': '/etc/hostname'}]}, timeout=60
        )
        assert reply.status_code == 400 and 'outside the data roots' in reply.json()['detail']
        assert_typed_openapi(requests.get(f'http://127.0.0.1:{http_port}/openapi.json', timeout=60).json())


def assert_typed_openapi(schema: dict) -> None:
    components = schema['components']['schemas']

    def parameters_of(path: str) -> dict:
        ref = schema['paths'][path]['post']['requestBody']['content']['application/json']['schema']['$ref']
        inner = components[ref.rpartition('/')[2]]['properties']['parameters']['$ref']
        return components[inner.rpartition('/')[2]]

    def types(field: dict) -> set[str]:
        return {option.get('type') for option in field.get('anyOf', [field])}

    search = parameters_of('/search')
    assert search['properties']['limit']['default'] == 10 and types(search['properties']['limit']) == {'integer'}
    assert types(search['properties']['batch_size']) == {'integer', 'null'}
    assert search['additionalProperties'] == {'type': 'object'}  # only objects, addressed to other executors
    train = parameters_of('/train')
    assert 'integer' in types(train['properties']['epochs']) and 'number' in types(train['properties']['learning_rate'])
    assert parameters_of('/runs/status')['required'] == ['run_id']


def test_a_deployment_answers_bad_input_4xx_and_types_its_parameters(served: tuple[int, int], data_root: Path):
    grpc_port, http_port = served
    base = f'http://127.0.0.1:{http_port}'
    cases = [
        ('/encode', {'batchsize': 4}, [], 422),
        ('/train', {'train_data': 'digits', 'epoch': 2}, [], 422),
        ('/encode', {}, [{'uri': str(data_root / 'broken' / 'cut.png')}], 400),
        ('/runs/logs', {'run_id': 'nope'}, [], 404),
        ('/train', {'resume': 'nope', 'epochs': 2}, [], 404),
    ]
    for endpoint, parameters, data, status in cases:
        reply = requests.post(base + endpoint, json={'data': data, 'parameters': parameters}, timeout=60)
        assert reply.status_code == status, (endpoint, parameters, reply.status_code, reply.text)
    # the executor's own name in a Deployment is 'executor': addressed keys are its own
    (doc,) = http(
        http_port,
        '/encode',
        [{'uri': str(data_root / 'digits' / '1' / '0003.png')}],
        {'executor': {'batch_size': 2}, 'someone_else': {'x': 1}},
    )
    assert len(doc['embedding']) == 1280
    reply = requests.post(f'{base}/encode', timeout=60, json={'data': [], 'parameters': {'executor': {'batchsize': 2}}})
    assert reply.status_code == 422 and "unknown parameter 'batchsize'" in reply.json()['detail']  # its own key
    assert_typed_openapi(requests.get(f'{base}/openapi.json', timeout=60).json())
