"""VectorIndexer served by a real jina Deployment on 127.0.0.1, called over gRPC (jina Client) and HTTP (plain JSON),
and sharded in a Flow whose ShardMerger merges the shards' replies."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import requests
from docarray import DocList
from jina import Client, Deployment, Flow
from jina.excepts import BadServer

from executor.docs import FinetunerDoc, IndexStats, MatchDoc
from executor.indexer import ShardMerger, VectorIndexer
from tests.helpers import cluster_centers, unit_rows

DIM = 16
CLUSTERS = 3
PER_CLUSTER = 16


class ServiceError(Exception):
    """An error the service answered with, whatever the protocol."""


def _doc_json(doc: FinetunerDoc) -> dict[str, Any]:
    fields = doc.model_dump(include={'id', 'uri', 'text', 'label'}, exclude_none=True)
    if doc.embedding is not None:
        fields['embedding'] = np.asarray(doc.embedding).tolist()
    return fields


class Caller:
    """Posts documents to one endpoint over `protocol` and returns the reply's documents as `doc_type`."""

    def __init__(self, protocol: str, port: int):
        self.protocol = protocol
        self.port = port
        self.client = Client(host='127.0.0.1', port=port, protocol='grpc') if protocol == 'grpc' else None

    def __call__(
        self, endpoint: str, docs: list[FinetunerDoc], parameters: Optional[dict] = None, doc_type=FinetunerDoc
    ) -> DocList:
        if self.protocol == 'grpc':
            try:
                return self.client.post(
                    endpoint, DocList[FinetunerDoc](docs), parameters=parameters, return_type=DocList[doc_type]
                )
            except BadServer as error:
                raise ServiceError(error.args[0].status.description) from None  # args[0]: the reply header
        body = {'data': [_doc_json(doc) for doc in docs], 'parameters': parameters or {}}
        reply = requests.post(f'http://127.0.0.1:{self.port}{endpoint}', json=body, timeout=30)
        if reply.status_code != 200:
            raise ServiceError(f'{reply.status_code} {reply.json()["detail"]}')
        return DocList[doc_type]([doc_type.model_validate(doc) for doc in reply.json()['data']])

    def count(self) -> IndexStats:
        return self('/count', [], doc_type=IndexStats)[0]


@contextmanager
def serve(protocol: str, workspace: Path, port: int) -> Iterator[Caller]:
    with Deployment(uses=VectorIndexer, workspace=str(workspace), protocol=protocol, host='127.0.0.1', port=port):
        yield Caller(protocol, port)


@pytest.fixture(scope='module')
def centers() -> np.ndarray:
    return cluster_centers(CLUSTERS, DIM)


@pytest.fixture(scope='module')
def corpus(centers: np.ndarray) -> list[FinetunerDoc]:
    """PER_CLUSTER documents around each center, labelled by cluster."""
    noise = np.random.default_rng(1).normal(scale=0.15, size=(CLUSTERS, PER_CLUSTER, DIM))
    return [
        FinetunerDoc(
            id=f'c{c}-{i}',
            uri=f'/data/c{c}/{i}.png',
            text=f'item {i} of cluster {c}',
            label=f'cluster-{c}',
            embedding=(centers[c] + noise[c, i]).astype(np.float32),
        )
        for c in range(CLUSTERS)
        for i in range(PER_CLUSTER)
    ]


def _exact_neighbours(corpus: list[FinetunerDoc], query: np.ndarray, k: int) -> list[tuple[str, float]]:
    """Brute-force cosine top-k as (id, similarity), best first."""
    vectors = unit_rows(np.stack([doc.embedding for doc in corpus]))  # (n, dim)
    similarity = vectors @ unit_rows(query)  # (n,)
    order = np.argsort(-similarity)[:k]
    return [(corpus[i].id, float(similarity[i])) for i in order]


def _queries(centers: np.ndarray) -> list[FinetunerDoc]:
    return [FinetunerDoc(id=f'q{c}', embedding=centers[c]) for c in range(CLUSTERS)]


@pytest.mark.parametrize('protocol', ['grpc', 'http'])
def test_index_search_upsert_delete_count(
    protocol: str, tmp_path: Path, free_port: Callable[[], int], corpus: list[FinetunerDoc], centers: np.ndarray
):
    with serve(protocol, tmp_path, free_port()) as call:
        assert call.count().count == 0
        empty = call('/search', _queries(centers), {'limit': 3})
        assert [len(doc.matches) for doc in empty] == [0, 0, 0]
        assert len(call('/index', [])) == 0
        assert len(call('/search', [])) == 0

        assert len(call('/index', corpus)) == len(corpus)
        stats = call.count()
        assert (stats.count, stats.dim) == (len(corpus), DIM)

        by_id = {doc.id: doc for doc in corpus}
        for query in call('/search', _queries(centers), {'limit': 5}):
            expected = _exact_neighbours(corpus, centers[int(query.id[1:])], 5)
            assert [m.id for m in query.matches] == [doc_id for doc_id, _ in expected]
            np.testing.assert_allclose([m.score for m in query.matches], [s for _, s in expected], atol=1e-5)
            assert all(m.label == f'cluster-{query.id[1:]}' for m in query.matches)
            assert all((m.uri, m.text) == (by_id[m.id].uri, by_id[m.id].text) for m in query.matches)
        assert len(call('/search', _queries(centers)[:1], {'limit': 1000})[0].matches) == len(corpus)

        moved = FinetunerDoc(id='c0-0', text='moved', label='cluster-1', embedding=centers[1])
        call('/index', [moved])
        assert call.count().count == len(corpus)
        best = call('/search', [FinetunerDoc(id='q', embedding=centers[1])], {'limit': 1})[0].matches[0]
        assert (best.id, best.text, best.label) == ('c0-0', 'moved', 'cluster-1')
        assert best.score == pytest.approx(1.0, abs=1e-5)

        deleted = call('/delete', [FinetunerDoc(id='c1-1')], {'ids': ['c1-2', 'never-indexed']})
        assert sorted(doc.id for doc in deleted) == ['c1-1', 'c1-2']
        assert call.count().count == len(corpus) - 2
        matches = call('/search', [FinetunerDoc(id='q', embedding=centers[1])], {'limit': 1000})[0].matches
        assert {'c1-1', 'c1-2'}.isdisjoint(m.id for m in matches)
        assert len(matches) == len(corpus) - 2

        call('/index', [by_id['c1-1']])  # a deleted id can come back
        assert call.count().count == len(corpus) - 1


@pytest.mark.parametrize('protocol', ['grpc', 'http'])
def test_bad_requests_are_reported_and_the_service_keeps_serving(
    protocol: str, tmp_path: Path, free_port: Callable[[], int], corpus: list[FinetunerDoc], centers: np.ndarray
):
    with serve(protocol, tmp_path, free_port()) as call:
        call('/index', corpus[:4])

        with pytest.raises(ServiceError, match=r"document 'no-vector' has no embedding"):
            call('/index', [corpus[5], FinetunerDoc(id='no-vector', text='not embedded')])
        with pytest.raises(ServiceError, match=r"query 'short' has an embedding of shape \(3,\), expected \(16,\)"):
            call('/search', [FinetunerDoc(id='short', embedding=np.ones(3, dtype=np.float32))])
        with pytest.raises(ServiceError, match=r"unknown parameter 'limt' \(did you mean 'limit'\?\)"):
            call('/search', _queries(centers), {'limt': 3})
        with pytest.raises(ServiceError, match='greater than or equal to 1'):
            call('/search', _queries(centers), {'limit': 0})
        with pytest.raises(ServiceError, match=r"unknown parameter 'id'.*allowed: ids"):
            call('/delete', [], {'id': ['c0-0']})
        with pytest.raises(ServiceError, match='appear more than once'):
            call('/index', [corpus[6], corpus[6]])

        assert call.count().count == 4  # nothing of the failed requests was indexed
        assert len(call('/search', _queries(centers)[:1], {'limit': 2})[0].matches) == 2
        # in flows/search.yml FinetunerExecutor's parameters reach the indexer too: accepted, and left to it
        encoder_params = {'model': 'efficientnet_lite0', 'runtime': 'torch', 'batch_size': 4}
        call('/index', corpus[4:5], encoder_params)
        assert len(call('/search', _queries(centers)[:1], {'limit': 2, **encoder_params})[0].matches) == 2
        with pytest.raises(
            ServiceError, match=r"/index: unknown parameter 'limit'; allowed: batch_size, drop_image_content, model"
        ):
            call('/index', corpus[5:6], {'limit': 2})


def test_other_endpoints_pass_documents_through(tmp_path: Path, free_port: Callable[[], int]):
    """The default endpoint lets the indexer follow FinetunerExecutor (and its /train, /encode, ...) in a Flow."""
    with serve('grpc', tmp_path, free_port()) as call:
        doc = FinetunerDoc(id='x', text='hello', tensor=np.arange(6.0).reshape(2, 3), scores={'a': 0.25})
        (back,) = call('/encode', [doc])
        assert (back.id, back.text, back.scores) == ('x', 'hello', {'a': 0.25})
        np.testing.assert_array_equal(back.tensor, doc.tensor)


def test_restart_on_the_same_workspace_serves_the_same_index(
    tmp_path: Path, free_port: Callable[[], int], corpus: list[FinetunerDoc], centers: np.ndarray
):
    queries = _queries(centers)
    with serve('grpc', tmp_path, free_port()) as call:
        call('/index', corpus)
        call('/delete', [], {'ids': ['c2-0', 'c2-1']})
        before = call('/search', queries, {'limit': 10})

    with serve('grpc', tmp_path, free_port()) as call:
        assert call.count().count == len(corpus) - 2
        after = call('/search', queries, {'limit': 10})
        call('/index', [FinetunerDoc(id='late', embedding=centers[0])])
        assert call.count().count == len(corpus) - 1

    for old, new in zip(before, after):
        assert [m.id for m in new.matches] == [m.id for m in old.matches]
        np.testing.assert_allclose([m.score for m in new.matches], [m.score for m in old.matches], atol=1e-6)
        assert len(new.matches) == 10  # deleted ids did not come back as holes in the results
        assert {'c2-0', 'c2-1'}.isdisjoint(m.id for m in new.matches)


def test_dim_is_kept_with_the_index(tmp_path: Path, corpus: list[FinetunerDoc]):
    indexer = VectorIndexer(workspace=str(tmp_path))
    indexer.index(docs=DocList[FinetunerDoc](corpus[:2]), parameters={})
    indexer.close()

    with pytest.raises(ValueError, match=f'holds {DIM}-d embeddings; pass dim={DIM}'):
        VectorIndexer(dim=DIM + 1, workspace=str(tmp_path))
    reopened = VectorIndexer(dim=DIM, workspace=str(tmp_path))
    assert reopened.count(docs=DocList[FinetunerDoc](), parameters={})[0].count == 2
    reopened.close()


def _match(doc_id: str, score: float) -> MatchDoc:
    return MatchDoc(id=doc_id, score=score)


def test_shard_merger_keeps_the_best_matches_of_every_shard():
    merger = ShardMerger()
    # a head's reduce: one document per query, the shards' matches one after the other
    reduced = DocList[FinetunerDoc](
        [
            FinetunerDoc(
                id='q',
                matches=DocList[MatchDoc]([_match('a', 0.9), _match('b', 0.5), _match('c', 0.95), _match('d', 0.1)]),
            )
        ]
    )
    (merged,) = merger.search(docs=reduced, parameters={'limit': 3})
    assert [(m.id, m.score) for m in merged.matches] == [('c', 0.95), ('a', 0.9), ('b', 0.5)]
    # a head with this as its uses_after: each shard's copy of each query
    copies = DocList[FinetunerDoc](
        [
            FinetunerDoc(id='q1', matches=DocList[MatchDoc]([_match('a', 0.2)])),
            FinetunerDoc(id='q2', matches=DocList[MatchDoc]([_match('b', 0.4)])),
            FinetunerDoc(id='q1', matches=DocList[MatchDoc]([_match('c', 0.3)])),
        ]
    )
    merged = merger.search(docs=copies, parameters={'limit': 10})
    assert [(d.id, [m.id for m in d.matches]) for d in merged] == [('q1', ['c', 'a']), ('q2', ['b'])]

    stats = DocList[IndexStats]([IndexStats(count=3, dim=DIM), IndexStats(count=0), IndexStats(count=4, dim=DIM)])
    assert [(s.count, s.dim) for s in merger.count(docs=stats, parameters={})] == [(7, DIM)]
    with pytest.raises(ValueError, match=r"unknown parameter 'limt' \(did you mean 'limit'\?\)"):
        merger.search(docs=reduced, parameters={'limt': 3})


@pytest.mark.slow  # about a minute: three shards and a merger; the unsharded index is tested in make test
def test_a_sharded_index_searches_every_shard(
    tmp_path: Path, free_port: Callable[[], int], corpus: list[FinetunerDoc], centers: np.ndarray
):
    """The topology of flows/k8s.yml: one shard stores each document, every shard answers each query."""
    port = free_port()
    polling = {'/index': 'ANY', '/search': 'ALL', '/delete': 'ALL', '/count': 'ALL', '*': 'ANY'}
    flow = (
        Flow(host='127.0.0.1', port=port)
        .add(name='indexer', uses=VectorIndexer, shards=2, polling=polling, workspace=str(tmp_path))
        .add(name='merger', uses=ShardMerger)
    )
    with flow:
        call = Caller('grpc', port)
        for start in range(0, len(corpus), 8):  # several requests, so that both shards get documents
            call('/index', corpus[start : start + 8])
        shard_counts = [len(list((tmp_path / 'VectorIndexer' / str(shard)).glob('hnsw/*.bin'))) for shard in (0, 1)]
        assert shard_counts == [1, 1]
        assert (call.count().count, call.count().dim) == (len(corpus), DIM)
        for query in call('/search', _queries(centers), {'limit': 7}):
            expected = _exact_neighbours(corpus, centers[int(query.id[1:])], 7)
            assert [m.id for m in query.matches] == [doc_id for doc_id, _ in expected]
        deleted = call('/delete', [], {'ids': [doc.id for doc in corpus[:10]]})
        assert sorted(doc.id for doc in deleted) == sorted(doc.id for doc in corpus[:10])
        assert call.count().count == len(corpus) - 10
