"""VectorIndexer: a persistent nearest-neighbour index executor over one of several engines, through docarray's
document indexes (executor/indexing/): ``backend: hnsw`` (default; hnswlib in this process, the index in the
workspace), ``qdrant`` (a Qdrant server or cluster, or Qdrant's embedded local mode) or ``milvus`` (a Milvus server or
cluster). Each backend's own settings are passed by name in ``uses_with`` (executor/indexing/settings.py).

Endpoints, the same on every backend: `/index` (upsert by id), `/search` (`limit` matches per query, best first,
scored by cosine similarity, optionally only those whose stored fields match `filter`), `/delete` (by id), `/count`.
The index survives a restart: hnsw keeps it in `index_dir`, the engines in their collection.

An engine that cannot be reached at start stops the start within `connect_timeout`, naming the setting; one that
stops later answers each request with `EngineUnavailable` (HTTP 503) naming the engine, and the executors beside the
indexer in the Flow keep serving.

ShardMerger follows a sharded hnsw VectorIndexer in a Flow (flows/k8s.yml), or serves as its `uses_after`: it keeps
each query's best `limit` matches over all shards and sums the shards' counts. Qdrant and Milvus shard themselves:
their flows have no merger.
"""

# No `from __future__ import annotations` here: jina reads the endpoints' annotations (`docs`, `parameters`,
# the return type) as live objects to build its request schemas, and postponed annotations are only strings.
import functools
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
from docarray import DocList
from docarray.base_doc import AnyDoc
from jina import Executor, requests

from executor import rest  # noqa: F401  (typed OpenAPI and 4xx answers on the HTTP port)
from executor.docs import FinetunerDoc, IndexStats, MatchDoc, ensure_ids, label_of, uri_of
from executor.indexing import create_backend
from executor.indexing.base import Stored, calling
from executor.indexing.settings import load_settings
from executor.params import DeleteParams, EndpointParams, IndexParams, SearchParams, executor_names, parse

logger = logging.getLogger(__name__)


def _on_index_thread(method):
    """Runs the method on the executor's own index thread.

    docarray's HnswDocumentIndex keeps a SQLite connection that only the thread that opened it may use, Qdrant's
    embedded mode is not thread-safe either, and jina calls synchronous endpoints from a thread pool.
    """

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        return self._index_thread.submit(method, self, *args, **kwargs).result()

    return run


class VectorIndexer(Executor):
    """Stores embedded documents and finds the nearest ones to query embeddings, in the engine `backend` names."""

    def __init__(self, backend: str = 'hnsw', **kwargs):
        """
        :param backend: 'hnsw' (default), 'qdrant' or 'milvus'; the other keyword arguments the executor does not take
            itself are that backend's settings (executor/indexing/settings.py, docs/service.md): a misspelt one, or
            one of another backend, stops the start.
        """
        own = {name: kwargs.pop(name) for name in list(kwargs) if name not in _EXECUTOR_KWARGS}
        super().__init__(**kwargs)
        self.settings = load_settings({'backend': backend, **own})
        self.names = executor_names(self)  # what per-executor parameters address it by
        self._index_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix='vector-index')
        self._dim: Optional[int] = None
        self._opened = False
        self._backend = self._index_thread.submit(create_backend, self.settings, self.workspace).result()
        self._index_thread.submit(self._open_saved).result()

    def _open_saved(self) -> None:
        dim, saved = self.settings.dim, self._backend.saved_dim()
        if dim is not None and saved is not None and dim != saved:
            raise ValueError(
                f'dim={dim} was given but the {self.settings.backend} index holds {saved}-d embeddings; '
                f'pass dim={saved} (or no dim), or point the indexer at another index'
            )
        if saved or dim:
            self._open(saved or dim)

    def _open(self, dim: int) -> None:
        self._backend.open(dim)
        self._dim, self._opened = dim, True

    def _ready(self) -> bool:
        """Whether an index is open; opens the one another replica created in the engine since this one started."""
        if not self._opened and self.settings.backend != 'hnsw':
            calling(self._backend, self._open_saved)
        return self._opened

    @requests(on='/index')
    @_on_index_thread
    def index(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[FinetunerDoc]:
        """Adds the documents, replacing those with the same id. Each needs an `embedding`.

        The parameters are those of FinetunerExecutor's `/index`, which embeds the documents before this in a Flow.
        """
        parse(IndexParams, parameters, '/index', self.names)
        if not docs:
            return docs
        duplicates = sorted(i for i, n in Counter(ensure_ids(docs).id).items() if n > 1)
        if duplicates:
            raise ValueError(f'documents {duplicates} appear more than once in the request; send each id once')
        embeddings = self._embeddings(docs, 'document')  # (n, dim)
        if not self._ready():
            calling(self._backend, self._open, embeddings.shape[1])
        stored = [
            Stored(id=doc.id, uri=uri_of(doc), text=doc.text, label=label_of(doc), embedding=embedding)
            for doc, embedding in zip(docs, embeddings)
        ]
        calling(self._backend, self._backend.upsert, stored)
        return docs

    @requests(on='/search')
    @_on_index_thread
    def search(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[FinetunerDoc]:
        """Sets each query's `matches`: the `limit` nearest documents (those matching `filter`), best first, scored by
        cosine similarity.

        The other parameters choose the model of FinetunerExecutor's `/search`, which embeds the queries before this.
        """
        params = parse(SearchParams, parameters, '/search', self.names)
        if not docs:
            return docs
        queries = self._embeddings(docs, 'query')  # (n, dim)
        if not self._ready() or calling(self._backend, self._backend.count) == 0:
            for doc in docs:
                doc.matches = DocList[MatchDoc]()
            return docs
        found = calling(self._backend, self._backend.search, queries, params.limit, params.filter)
        for doc, matches in zip(docs, found):
            doc.matches = DocList[MatchDoc](
                MatchDoc(id=m.id, uri=m.uri, text=m.text, label=m.label, score=m.score) for m in matches
            )
        return docs

    @requests(on='/delete')
    @_on_index_thread
    def delete(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[FinetunerDoc]:
        """Deletes the documents with the ids sent (as documents or `ids`); returns those that were in the index."""
        ids = list(dict.fromkeys(docs.id + parse(DeleteParams, parameters, '/delete', self.names).ids))
        if not ids or not self._ready():
            return DocList[FinetunerDoc]()
        stored = calling(self._backend, self._backend.get, ids)
        if stored:
            calling(self._backend, self._backend.delete, [d.id for d in stored])
        logger.info('deleted %d of %d requested documents', len(stored), len(ids))
        return DocList[FinetunerDoc](FinetunerDoc(id=d.id, uri=d.uri, text=d.text, label=d.label) for d in stored)

    @requests(on='/count')
    @_on_index_thread
    def count(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[IndexStats]:
        """Returns one `IndexStats` document: the number of indexed documents and the embedding size."""
        parse(EndpointParams, parameters, '/count', self.names)
        count = calling(self._backend, self._backend.count) if self._ready() else 0
        return DocList[IndexStats]([IndexStats(count=count, dim=self._dim)])

    @requests
    def pass_through(self, docs: DocList[AnyDoc], **kwargs) -> DocList[AnyDoc]:
        """Returns the documents of every other endpoint unchanged.

        jina refuses to chain an executor after one that has endpoints it lacks (FinetunerExecutor's /train, /runs,
        ...) unless it has a default endpoint: this one lets the indexer follow the encoder in a Flow.
        """
        return docs

    def close(self) -> None:
        self._index_thread.submit(self._backend.close).result()
        self._index_thread.shutdown()
        super().close()

    def _embeddings(self, docs: DocList[FinetunerDoc], role: str) -> np.ndarray:
        """The documents' embeddings as one (n, dim) float32 array; each must be 1-d and of the index's size."""
        missing = [doc.id for doc in docs if doc.embedding is None]
        if missing:
            raise ValueError(
                f'{role} {missing[0]!r} has no embedding ({len(missing)} of {len(docs)} without one); '
                f'embed them first (FinetunerExecutor /encode) or set `embedding`'
            )
        dim = self._dim or np.size(docs[0].embedding)
        for doc in docs:
            shape = np.shape(doc.embedding)
            if shape != (dim,):
                raise ValueError(
                    f'{role} {doc.id!r} has an embedding of shape {shape}, expected ({dim},): embeddings must be 1-d '
                    f'and as long as the indexed ones; embed queries and documents with the same model'
                )
        return np.stack([np.asarray(doc.embedding, dtype=np.float32) for doc in docs])


# jina's own keyword arguments of an Executor; every other one is a backend setting
_EXECUTOR_KWARGS = ('metas', 'requests', 'runtime_args', 'workspace', 'dynamic_batching')


class ShardMerger(Executor):
    """Merges the replies of a sharded VectorIndexer: the next executor of the Flow, or the indexer's `uses_after`."""

    def __init__(self, indexer: str = 'indexer', **kwargs):
        """
        :param indexer: the name of the indexer it merges for: parameters addressed to it (`{"indexer": {"limit":
            3}}`) are the merger's too, so that it keeps as many matches as each shard found.
        """
        super().__init__(**kwargs)
        self.names = (*executor_names(self), indexer)

    @requests(on='/search')
    def search(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[FinetunerDoc]:
        """One document per query holding its `limit` best matches over all shards, best first.

        Each shard found its own `limit` matches. The indexer's head concatenates them into one document per query,
        or, with this as its `uses_after`, hands over each shard's copy of the query: both shapes are merged here.
        """
        limit = parse(SearchParams, parameters, '/search', self.names).limit
        queries: dict[str, FinetunerDoc] = {}
        found: dict[str, list[MatchDoc]] = {}
        for doc in docs:
            queries.setdefault(doc.id, doc)
            found.setdefault(doc.id, []).extend(doc.matches)
        for doc_id, doc in queries.items():
            best = sorted(found[doc_id], key=lambda match: match.score, reverse=True)[:limit]
            doc.matches = DocList[MatchDoc](best)
        return DocList[FinetunerDoc](queries.values())

    @requests(on='/count')
    def count(self, docs: DocList[IndexStats], parameters: dict, **kwargs) -> DocList[IndexStats]:
        """Sums the shards' counts into one `IndexStats`; the size is that of any shard holding documents."""
        parse(EndpointParams, parameters, '/count', self.names)
        dim = next((stats.dim for stats in docs if stats.dim is not None), None)
        return DocList[IndexStats]([IndexStats(count=sum(stats.count for stats in docs), dim=dim)])

    @requests
    def pass_through(self, docs: DocList[AnyDoc], **kwargs) -> DocList[AnyDoc]:
        """Returns the documents of every other endpoint as the head merged them (`/index`, `/delete`: by id)."""
        return docs
