"""Text models through the service: a real Deployment of config.yml serving all-MiniLM-L6-v2 (on onnxruntime, the
default runtime) over gRPC and HTTP, docarray's own TextDoc and plain JSON, truncate_dim, /evaluate on scored pairs,
a run trained on sentence pairs, bad text input named; and a text search through flows/search.yml."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from docarray import DocList
from docarray.documents import ImageDoc, TextDoc
from jina import Client, Deployment, Flow

from executor.client import FinetunerClient, ServiceError
from executor.tuning.inference import TorchEncoder
from executor.tuning.models import build_model
from tests.helpers import http, write_csv

ROOT = Path(__file__).resolve().parents[2]
SENTENCES = [
    'A man is playing a guitar.',
    'A woman is slicing an onion in the kitchen.',
    'Two dogs are running on the beach.',
    'The stock market fell sharply today.',
]
PAIRS = [
    ('A man is playing a guitar.', 'Someone plays an acoustic guitar.', 4.6),
    ('A woman is slicing an onion.', 'A person cuts an onion in the kitchen.', 4.2),
    ('Two dogs run on the beach.', 'A cat sleeps on the sofa.', 0.4),
    ('A child reads a book.', 'A kid is reading.', 4.8),
    ('The stock market fell today.', 'A plane takes off.', 0.1),
    ('A plane takes off.', 'An aircraft is leaving the runway.', 4.5),
    ('A cat sleeps on the sofa.', 'A kitten naps on the couch.', 4.4),
    ('Someone is cooking pasta.', 'A child reads a book.', 0.5),
]


@pytest.fixture(scope='module')
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp('text-data')
    write_csv(root / 'sts.csv', ['sentence1', 'sentence2', 'score'], PAIRS)
    write_csv(root / 'pairs.csv', ['anchor', 'positive'], [(a, b) for a, b, score in PAIRS if score > 4])
    return root


@pytest.fixture(scope='module')
def served(
    data_root: Path, tmp_path_factory: pytest.TempPathFactory, model_cache: str, free_port: Callable[[], int]
) -> Iterator[tuple[int, int]]:
    ports = [free_port(), free_port()]
    with Deployment(
        uses=str(ROOT / 'config.yml'),
        workspace=str(tmp_path_factory.mktemp('ws')),
        protocol=['grpc', 'http'],
        host='127.0.0.1',
        port=ports,
        uses_with={'data_roots': [str(data_root)], 'model': 'all-MiniLM-L6-v2', 'model_cache': model_cache},
    ):
        yield ports[0], ports[1]


@pytest.fixture(scope='module')
def reference() -> TorchEncoder:
    return TorchEncoder(build_model('all-MiniLM-L6-v2'), device='cpu')


def test_encode_text_over_grpc_and_http(served: tuple[int, int], reference: TorchEncoder):
    grpc_port, http_port = served
    want = reference.encode(SENTENCES)
    docs = Client(host='127.0.0.1', port=grpc_port).post(
        '/encode', DocList[TextDoc]([TextDoc(text=s) for s in SENTENCES]), return_type=DocList[TextDoc]
    )
    got = np.stack([d.embedding for d in docs])
    assert got.shape == (4, 384) and np.min(np.sum(got * want, axis=1)) >= 0.9999  # onnxruntime vs torch
    plain = http(http_port, '/encode', [{'text': s} for s in SENTENCES])  # plain JSON, no ids
    assert np.allclose(np.array([d['embedding'] for d in plain]), got, atol=1e-5)
    short = http(http_port, '/encode', [{'text': s} for s in SENTENCES], {'truncate_dim': 64})
    short = np.array([d['embedding'] for d in short])
    cut = want[:, :64] / np.linalg.norm(want[:, :64], axis=1, keepdims=True)
    assert short.shape == (4, 64) and np.allclose(short, cut, atol=1e-4)


def test_bad_text_requests_name_the_document(served: tuple[int, int]):
    grpc_port, http_port = served
    with pytest.raises(ServiceError, match=r"document 'b' is an image .*but this model embeds text; send each as text"):
        http(http_port, '/encode', [{'id': 'a', 'text': 'fine'}, {'id': 'b', 'tensor': [[0, 1], [1, 0]]}])
    with pytest.raises(ServiceError, match=r"400: .*document 'blank': text is empty"):
        http(http_port, '/encode', [{'id': 'blank', 'text': '   '}])
    with pytest.raises(ServiceError, match=r"truncate_dim=512 is more than the model's 384 dimensions"):
        http(http_port, '/encode', [{'text': 'fine'}], {'truncate_dim': 512})
    image = ImageDoc(tensor=np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(Exception, match='but this model embeds text'):
        Client(host='127.0.0.1', port=grpc_port).post(
            '/encode', DocList[ImageDoc]([image]), return_type=DocList[ImageDoc]
        )


def test_evaluate_scored_pairs_and_train_a_run_on_pairs_with_the_python_client(served: tuple[int, int]):
    grpc_port, _ = served
    client = FinetunerClient(f'grpc://127.0.0.1:{grpc_port}')
    metrics = client.evaluate('sts.csv', matryoshka_dims=[128])
    assert metrics['spearman_cosine'] > 0.7 and 'pearson_cosine' in metrics and 'spearman_cosine_dim128' in metrics
    assert client.evaluate('pairs.csv', limit=5)['hit@1'] >= 0.8  # each anchor finds its own positive first
    run = client.fit(train_data='pairs.csv', eval_data='sts.csv', epochs=1, batch_size=4, wait=True)
    assert run.status()['status'] == 'FINISHED', run.status()['details']
    assert 'spearman_cosine' in run.metrics() and 'train_loss' in run.metrics()
    (doc,) = client.encode([TextDoc(text=SENTENCES[0])], run_id=run.name, runtime='torch')
    assert doc.embedding.shape == (384,) and abs(np.linalg.norm(doc.embedding) - 1) < 1e-4


def test_search_flow_indexes_and_searches_text(tmp_path: Path, free_port: Callable[[], int], monkeypatch):
    monkeypatch.chdir(ROOT)  # the flow names its executors' configs relative to the repository root
    http_port = free_port()
    overrides = {
        'host': '127.0.0.1',
        'port': [free_port(), http_port],
        'protocol': ['grpc', 'http'],
        'workspace': str(tmp_path / 'ws'),
    }
    corpus = [{'id': f'p{i}', 'text': b, 'label': str(i)} for i, (a, b, score) in enumerate(PAIRS) if score > 4]
    queries = [{'id': f'q{i}', 'text': a} for i, (a, b, score) in enumerate(PAIRS) if score > 4]
    model = {'model': 'all-MiniLM-L6-v2', 'runtime': 'torch'}
    with Flow.load_config(str(ROOT / 'flows' / 'search.yml'), uses_with=overrides):
        http(http_port, '/index', corpus, model)
        found = http(http_port, '/search', queries, {**model, 'limit': 3})
        (stats,) = http(http_port, '/count', [])
    assert stats['dim'] == 384 and stats['count'] == len(corpus)
    for query in found:  # each sentence finds its paraphrase first, and the match carries its text back
        best = query['matches'][0]
        assert (
            best['id'] == 'p' + query['id'][1:]
            and best['text'] == corpus[[c['id'] for c in corpus].index(best['id'])]['text']
        )
