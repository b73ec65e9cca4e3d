"""VectorIndexer's contract on every backend, through real Flows on 127.0.0.1 and plain JSON over HTTP: hnsw
(embedded), Qdrant's embedded local mode (``path=`` and ``location=':memory:'``) and a Milvus Lite server that the
module starts and stops itself. Index (with and without ids), search (cosine, best first, as exact search finds),
filter, upsert, delete, count, a restart on the same engine; an engine outage (503 naming the engine while /encode
keeps serving) and bad settings (a clear error at start, in bounded time)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from jina import Deployment, Flow
from jina.excepts import RuntimeFailToStart

from executor.client import ServiceError
from executor.indexer import VectorIndexer
from executor.indexing.base import EngineUnavailable
from executor.indexing.settings import IndexerConfigError
from tests.helpers import cluster_centers, http, unit_rows

ROOT = Path(__file__).resolve().parents[2]
MILVUS_LITE = str(Path(sys.executable).with_name('milvus-lite'))
DIM = 16
CLUSTERS = 3
PER_CLUSTER = 12
SERVER_START_S = 60  # the most a Milvus Lite server may take to listen (seconds on this machine)

pytestmark = pytest.mark.timeout(600)  # one test of this module; a hang fails it instead of the whole run


def _listening(port: int) -> bool:
    try:
        socket.create_connection(('127.0.0.1', port), timeout=0.5).close()
        return True
    except OSError:
        return False


@contextmanager
def milvus_lite(data_dir: Path, port: int) -> Iterator[subprocess.Popen]:
    """A Milvus Lite server on 127.0.0.1:port, in a process group of its own, killed with its group on exit."""
    log = open(data_dir.with_suffix('.log'), 'w')
    server = subprocess.Popen(
        [MILVUS_LITE, 'server', '--data-dir', str(data_dir), '--host', '127.0.0.1', '--port', str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not _listening(port):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f'the Milvus Lite server did not listen on {port}; see {log.name}')
            time.sleep(0.2)
        yield server
    finally:
        stop(server)
        log.close()


def stop(server: subprocess.Popen) -> None:
    """Ends the server's process group: SIGTERM, then SIGKILL after 10 s."""
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)


@pytest.fixture(scope='module')
def milvus_port(tmp_path_factory: pytest.TempPathFactory, free_port: Callable[[], int]) -> Iterator[int]:
    """One Milvus Lite server for the module's contract tests (each uses a collection of its own)."""
    port = free_port()
    with milvus_lite(tmp_path_factory.mktemp('milvus') / 'data', port):
        yield port


@pytest.fixture(scope='module')
def centers() -> np.ndarray:
    return cluster_centers(CLUSTERS, DIM)


@pytest.fixture(scope='module')
def corpus(centers: np.ndarray) -> list[dict]:
    """Plain JSON documents around each center, labelled by cluster; every third has no id (the service gives one)."""
    noise = np.random.default_rng(1).normal(scale=0.2, size=(CLUSTERS, PER_CLUSTER, DIM))
    docs = []
    for c in range(CLUSTERS):
        for i in range(PER_CLUSTER):
            doc = {
                'uri': f'/data/c{c}/{i}.png',
                'text': f'item {i} of cluster {c}',
                'label': f'cluster-{c}',
                'embedding': (centers[c] + noise[c, i]).tolist(),
            }
            docs.append(doc if i % 3 == 0 else {'id': f'c{c}-{i}', **doc})
    return docs


def exact(docs: list[dict], query: np.ndarray, k: int, label: str | None = None) -> list[tuple[str, float]]:
    """Brute-force cosine top-k over ``docs`` (with ``label`` only, if given) as (id, similarity), best first."""
    kept = [d for d in docs if label is None or d['label'] == label]
    similarity = unit_rows(np.array([d['embedding'] for d in kept])) @ unit_rows(query)  # (n,)
    order = np.argsort(-similarity)[:k]
    return [(kept[i]['id'], float(similarity[i])) for i in order]


BACKENDS = ['hnsw', 'qdrant-path', 'qdrant-memory', 'milvus']


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> dict:
    """The indexer's uses_with for the backend the test is parametrized with."""
    name = request.param
    if name == 'hnsw':
        return {'backend': 'hnsw', 'index_dir': str(tmp_path / 'hnsw')}
    if name == 'qdrant-path':
        return {'backend': 'qdrant', 'path': str(tmp_path / 'qdrant')}
    if name == 'qdrant-memory':
        return {'backend': 'qdrant', 'location': ':memory:'}
    port = request.getfixturevalue('milvus_port')
    collection = f'contract_{request.node.name.split("[")[0][-20:]}_{os.getpid()}'
    return {'backend': 'milvus', 'host': '127.0.0.1', 'port': port, 'collection_name': collection}


@contextmanager
def indexer_flow(settings: dict, port: int) -> Iterator[int]:
    """A Flow of the indexer alone behind an HTTP gateway (with executor.rest's answers); yields the port."""
    flow = Flow(protocol='http', port=port, host='127.0.0.1').config_gateway(py_modules=['executor.rest'])
    with flow.add(name='indexer', uses=VectorIndexer, uses_with=settings):
        yield port


def _query(centers: np.ndarray, c: int) -> list[dict]:
    return [{'embedding': centers[c].tolist()}]


def _ids_and_scores(match_lists: list[dict]) -> tuple[list[str], list[float]]:
    return [m['id'] for m in match_lists], [m['score'] for m in match_lists]


@pytest.mark.parametrize('settings', BACKENDS, indirect=True)
def test_the_contract_on_every_backend(
    settings: dict, free_port: Callable[[], int], corpus: list[dict], centers: np.ndarray
):
    with indexer_flow(settings, free_port()) as port:
        assert http(port, '/count')[0]['count'] == 0
        assert http(port, '/search', _query(centers, 0), {'limit': 3})[0]['matches'] == []

        indexed = http(port, '/index', corpus)
        docs = [{**doc, 'id': back['id']} for doc, back in zip(corpus, indexed)]  # the ids the service gave
        assert len({d['id'] for d in docs}) == len(corpus)
        assert [d['id'] for d in docs if not d['id'].startswith('c')] != []  # some had no id of their own
        (stats,) = http(port, '/count')
        assert (stats['count'], stats['dim']) == (len(corpus), DIM)

        by_id = {d['id']: d for d in docs}
        for c in range(CLUSTERS):
            (found,) = http(port, '/search', _query(centers, c), {'limit': 5})
            ids, scores = _ids_and_scores(found['matches'])
            expected = exact(docs, centers[c], 5)
            assert ids == [i for i, _ in expected]
            np.testing.assert_allclose(scores, [s for _, s in expected], atol=1e-4)
            for m in found['matches']:
                assert (m['uri'], m['text'], m['label']) == (
                    by_id[m['id']]['uri'],
                    by_id[m['id']]['text'],
                    f'cluster-{c}',
                )

        # a filter on a stored field: the nearest among those that match, whatever cluster the query is near
        (found,) = http(port, '/search', _query(centers, 0), {'limit': 4, 'filter': {'label': 'cluster-2'}})
        ids, scores = _ids_and_scores(found['matches'])
        expected = exact(docs, centers[0], 4, label='cluster-2')
        assert ids == [i for i, _ in expected]
        np.testing.assert_allclose(scores, [s for _, s in expected], atol=1e-4)
        (found,) = http(port, '/search', _query(centers, 0), {'limit': 50, 'filter': {'label': ['cluster-1', 'x']}})
        assert len(found['matches']) == PER_CLUSTER and {m['label'] for m in found['matches']} == {'cluster-1'}
        (found,) = http(
            port, '/search', _query(centers, 0), {'filter': {'label': 'cluster-1', 'text': 'item 2 of cluster 1'}}
        )
        assert [m['id'] for m in found['matches']] == ['c1-2']
        assert http(port, '/search', _query(centers, 0), {'filter': {'label': 'nobody'}})[0]['matches'] == []
        with pytest.raises(ServiceError, match=r"422: .*filter on 'lable' \(did you mean 'label'\?\)"):
            http(port, '/search', _query(centers, 0), {'filter': {'lable': 'cluster-1'}})

        # upsert by id: the same id moved near another center, its fields replaced, the count unchanged
        http(port, '/index', [{'id': 'c0-1', 'text': 'moved', 'label': 'cluster-1', 'embedding': centers[1].tolist()}])
        assert http(port, '/count')[0]['count'] == len(corpus)
        best = http(port, '/search', _query(centers, 1), {'limit': 1})[0]['matches'][0]
        assert (best['id'], best['text'], best['label']) == ('c0-1', 'moved', 'cluster-1')
        assert best['score'] == pytest.approx(1.0, abs=1e-4)

        deleted = http(port, '/delete', [{'id': 'c1-1'}], {'ids': ['c1-2', 'never-indexed']})
        assert sorted(d['id'] for d in deleted) == ['c1-1', 'c1-2']
        assert http(port, '/count')[0]['count'] == len(corpus) - 2
        matches = http(port, '/search', _query(centers, 1), {'limit': 100})[0]['matches']
        assert len(matches) == len(corpus) - 2 and {'c1-1', 'c1-2'}.isdisjoint(m['id'] for m in matches)
        assert [m['score'] for m in matches] == sorted((m['score'] for m in matches), reverse=True)


@pytest.mark.parametrize('settings', ['hnsw', 'qdrant-path', 'milvus'], indirect=True)
def test_a_restart_serves_the_same_index(
    settings: dict, free_port: Callable[[], int], corpus: list[dict], centers: np.ndarray
):
    """Index, stop the Flow, start it again on the same engine: the same count and the same results.
    (location=':memory:' is left out: Qdrant's in-memory mode keeps nothing by design.)"""
    queries = [{'id': f'q{c}', 'embedding': centers[c].tolist()} for c in range(CLUSTERS)]
    with indexer_flow(settings, free_port()) as port:
        http(port, '/index', corpus)
        http(port, '/delete', [], {'ids': ['c2-1', 'c2-2']})
        before = http(port, '/search', queries, {'limit': 10})
        filtered_before = http(port, '/search', queries[:1], {'limit': 3, 'filter': {'label': 'cluster-2'}})

    with indexer_flow(settings, free_port()) as port:
        (stats,) = http(port, '/count')
        assert (stats['count'], stats['dim']) == (len(corpus) - 2, DIM)
        after = http(port, '/search', queries, {'limit': 10})
        filtered_after = http(port, '/search', queries[:1], {'limit': 3, 'filter': {'label': 'cluster-2'}})
        http(port, '/index', [{'id': 'late', 'embedding': centers[0].tolist()}])
        assert http(port, '/count')[0]['count'] == len(corpus) - 1

    for old, new in zip(before + filtered_before, after + filtered_after):
        old_ids, old_scores = _ids_and_scores(old['matches'])
        new_ids, new_scores = _ids_and_scores(new['matches'])
        assert new_ids == old_ids and len(new_ids) in (10, 3)
        np.testing.assert_allclose(new_scores, old_scores, atol=1e-5)
        assert {'c2-1', 'c2-2'}.isdisjoint(new_ids)


def test_an_engine_outage_is_a_503_naming_the_engine_while_the_encoder_serves(
    tmp_path: Path, free_port: Callable[[], int], monkeypatch: pytest.MonkeyPatch
):
    """flows/search-milvus.yml (text model, Milvus): the Milvus server stops; the index's endpoints answer 503 naming
    milvus and the address, /encode keeps answering with embeddings, and the search works again once it is back."""
    monkeypatch.chdir(ROOT)  # the flow names its executors' configs relative to the repository root
    milvus = free_port()
    monkeypatch.setenv('MILVUS_HOST', '127.0.0.1')
    monkeypatch.setenv('MILVUS_PORT', str(milvus))
    http_port = free_port()
    overrides = {'host': '127.0.0.1', 'port': [free_port(), http_port], 'workspace': str(tmp_path / 'ws')}
    model = {'model': 'all-MiniLM-L6-v2', 'runtime': 'torch'}
    texts = [{'id': f't{i}', 'text': t, 'label': t.split()[-1]} for i, t in enumerate(['a red ant', 'a black bee'])]
    with milvus_lite(tmp_path / 'milvus', milvus) as server:
        with Flow.load_config(str(ROOT / 'flows' / 'search-milvus.yml'), uses_with=overrides):
            http(http_port, '/index', texts, model)
            found = http(
                http_port, '/search', [{'text': 'an insect', 'id': 'q'}], {**model, 'filter': {'label': 'ant'}}
            )
            assert [m['id'] for m in found[0]['matches']] == ['t0']

            stop(server)
            for endpoint, params in (('/search', {**model, 'limit': 1}), ('/count', {})):
                with pytest.raises(ServiceError, match=rf'503: EngineUnavailable.*milvus engine at 127.0.0.1:{milvus}'):
                    http(http_port, endpoint, [{'text': 'an insect'}] if endpoint == '/search' else [], params)
            (encoded,) = http(http_port, '/encode', [{'text': 'still serving'}], model)
            assert len(encoded['embedding']) == 384

            with milvus_lite(tmp_path / 'milvus', milvus):  # the same data folder: the index is back
                found = http(http_port, '/search', [{'text': 'an insect'}], {**model, 'limit': 2})
                assert sorted(m['id'] for m in found[0]['matches']) == ['t0', 't1']


def test_bad_settings_stop_the_start_naming_the_setting(tmp_path: Path, free_port: Callable[[], int]):
    nobody = free_port()
    started = time.monotonic()
    with pytest.raises(EngineUnavailable, match=rf'milvus engine at 127.0.0.1:{nobody} did not answer.*host, port'):
        VectorIndexer(backend='milvus', host='127.0.0.1', port=nobody, connect_timeout=2, workspace=str(tmp_path))
    with pytest.raises(EngineUnavailable, match=rf'qdrant engine at 127.0.0.1:{nobody} .*point url'):
        VectorIndexer(backend='qdrant', url=f'http://127.0.0.1:{nobody}', connect_timeout=2, workspace=str(tmp_path))
    assert time.monotonic() - started < 60  # bounded by connect_timeout, not by a client's retries (minutes)
    with pytest.raises(IndexerConfigError, match=r"unknown parameter 'urll' \(did you mean 'url'\?\)"):
        VectorIndexer(backend='qdrant', urll='http://127.0.0.1:6333', workspace=str(tmp_path))
    with pytest.raises(IndexerConfigError, match=r"'url' is a setting of backend 'qdrant', not of backend='milvus'"):
        VectorIndexer(backend='milvus', url='http://127.0.0.1:6333', workspace=str(tmp_path))

    # through jina: the start fails (rather than waiting) although the Deployment would wait for ever
    deployment = Deployment(
        uses=VectorIndexer,
        uses_with={'backend': 'milvus', 'host': '127.0.0.1', 'port': nobody, 'connect_timeout': 2},
        host='127.0.0.1',
        port=free_port(),
        timeout_ready=-1,
    )
    with pytest.raises(RuntimeFailToStart):
        with deployment:
            pass


@pytest.mark.parametrize('name,engine', [('search-qdrant', 'qdrant'), ('search-milvus', 'milvus')])
def test_the_engine_flows_have_no_merger_and_replicate_stateless_indexers(
    name: str, engine: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(ROOT)
    for variable in ('QDRANT_URL', 'MILVUS_HOST', 'MILVUS_PORT'):
        monkeypatch.setenv(variable, '19530' if variable == 'MILVUS_PORT' else 'engine.local')
    nodes = dict(Flow.load_config(str(ROOT / 'flows' / f'{name}.yml')))
    assert [n for n in nodes if n != 'gateway'] == ['encoder', 'indexer']
    indexer = nodes['indexer'].args
    assert (indexer.uses_with['backend'], indexer.shards, indexer.replicas) == (engine, 1, 2)
