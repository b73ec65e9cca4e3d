"""VectorIndexer: a persistent nearest-neighbour index executor (docarray's HnswDocumentIndex over hnswlib, cosine).

Endpoints: `/index` (upsert by id), `/search` (`limit` matches per query, best first), `/delete` (by id), `/count`.
The index lives in `index_dir` (default `<workspace>/hnsw`): hnswlib's graph plus docarray's SQLite table of the
stored fields (`id`, `uri`, `text`, `label`, `embedding`), and `vector_indexer.json` holding the embedding size, which
hnswlib needs before it can open the graph. A restart on the same folder serves the same index.

Scores are cosine similarities (higher is closer): hnswlib's cosine space returns the distance `1 - cos`.

ShardMerger follows a sharded VectorIndexer in a Flow (flows/k8s.yml), or serves as its `uses_after`: it keeps each
query's best `limit` matches over all shards and sums the shards' counts.
"""

# No `from __future__ import annotations` here: jina reads the endpoints' annotations (`docs`, `parameters`,
# the return type) as live objects to build its request schemas, and postponed annotations are only strings.
import functools
import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
from docarray import BaseDoc, DocList
from docarray.base_doc import AnyDoc
from docarray.index import HnswDocumentIndex
from docarray.typing import NdArray
from jina import Executor, requests
from pydantic import Field, create_model

from executor import rest  # noqa: F401  (typed OpenAPI and 4xx answers on the HTTP port)
from executor.docs import FinetunerDoc, IndexStats, MatchDoc, ensure_ids, label_of, uri_of
from executor.params import DeleteParams, EndpointParams, IndexParams, SearchParams, executor_names, parse

logger = logging.getLogger(__name__)

_META_FILE = 'vector_indexer.json'
# Candidates hnswlib keeps per query (`ef`): docarray sets 10, and a reloaded graph has hnswlib's default (10 too),
# which misses true neighbours of clustered embeddings. As wide as the graph was built (ef_construction) instead.
_SEARCH_EF = 200


def _stored_doc_schema(dim: int) -> type[BaseDoc]:
    """The index's schema: the fields of a `FinetunerDoc` worth keeping, with the embedding size fixed."""
    return create_model(
        f'StoredDoc{dim}',
        __base__=BaseDoc,
        uri=(Optional[str], None),
        text=(Optional[str], None),
        label=(Optional[str], None),
        # With allow_replace_deleted=True (docarray's default) hnswlib refuses to re-add an id that was deleted.
        embedding=(NdArray[dim], Field(space='cosine', allow_replace_deleted=False)),
    )


def _on_index_thread(method):
    """Runs the method on the executor's own index thread.

    docarray's HnswDocumentIndex keeps a SQLite connection that only the thread that opened it may use, while jina
    calls synchronous endpoints from a thread pool.
    """

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        return self._index_thread.submit(method, self, *args, **kwargs).result()

    return run


class VectorIndexer(Executor):
    """Stores embedded documents and finds the nearest ones to query embeddings."""

    def __init__(self, dim: Optional[int] = None, index_dir: Optional[str] = None, **kwargs):
        """
        :param dim: embedding size; by default taken from the first indexed documents (or from the saved index).
        :param index_dir: folder of the index; by default `hnsw` in the executor's workspace.
        """
        super().__init__(**kwargs)
        self.names = executor_names(self)  # what per-executor parameters address it by
        self._dir = Path(index_dir) if index_dir else Path(self.workspace) / 'hnsw'
        self._schema: Optional[type[BaseDoc]] = None
        self._index: Optional[HnswDocumentIndex] = None
        self._dim: Optional[int] = None
        self._index_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix='vector-index')
        saved_dim = self._read_saved_dim()
        if dim is not None and dim < 1:
            raise ValueError(f'dim must be a positive embedding size, got {dim}')
        if dim is not None and saved_dim is not None and dim != saved_dim:
            raise ValueError(
                f'dim={dim} was given but the index in {self._dir} holds {saved_dim}-d embeddings; '
                f'pass dim={saved_dim} (or no dim), or point index_dir to another folder'
            )
        dim = saved_dim or dim
        if dim:
            self._index_thread.submit(self._open, dim).result()

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
        if self._index is None:
            self._open(embeddings.shape[1])
        self._index.index(
            DocList[self._schema](
                self._schema(id=doc.id, uri=uri_of(doc), text=doc.text, label=label_of(doc), embedding=embedding)
                for doc, embedding in zip(docs, embeddings)
            )
        )
        return docs

    @requests(on='/search')
    @_on_index_thread
    def search(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[FinetunerDoc]:
        """Sets each query's `matches`: the `limit` nearest documents, best first, scored by cosine similarity.

        The other parameters choose the model of FinetunerExecutor's `/search`, which embeds the queries before this.
        """
        limit = parse(SearchParams, parameters, '/search', self.names).limit
        if not docs:
            return docs
        queries = self._embeddings(docs, 'query')  # (n, dim)
        if self._index is None or self._index.num_docs() == 0:
            for doc in docs:
                doc.matches = DocList[MatchDoc]()
            return docs
        for graph in self._index._hnsw_indices.values():
            graph.set_ef(_SEARCH_EF)  # hnswlib widens it to `limit` where that is larger
        found = self._index.find_batched(queries, search_field='embedding', limit=limit)
        for doc, neighbours, distances in zip(docs, found.documents, found.scores):
            scores = np.clip(1.0 - distances, -1.0, 1.0)  # hnswlib's cosine distance is 1 - cos, up to rounding
            doc.matches = DocList[MatchDoc](
                MatchDoc(id=n.id, uri=n.uri, text=n.text, label=n.label, score=float(score))
                for n, score in zip(neighbours, scores)
            )
        return docs

    @requests(on='/delete')
    @_on_index_thread
    def delete(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[FinetunerDoc]:
        """Deletes the documents with the ids sent (as documents or `ids`); returns those that were in the index."""
        ids = list(dict.fromkeys(docs.id + parse(DeleteParams, parameters, '/delete', self.names).ids))
        if not ids or self._index is None:
            return DocList[FinetunerDoc]()
        try:
            stored = self._index[ids]
        except KeyError:  # none of them is in the index
            return DocList[FinetunerDoc]()
        del self._index[stored.id]
        self._save_graph()
        logger.info('deleted %d of %d requested documents', len(stored), len(ids))
        return DocList[FinetunerDoc](FinetunerDoc(id=d.id, uri=d.uri, text=d.text, label=d.label) for d in stored)

    @requests(on='/count')
    @_on_index_thread
    def count(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[IndexStats]:
        """Returns one `IndexStats` document: the number of indexed documents and the embedding size."""
        parse(EndpointParams, parameters, '/count', self.names)
        return DocList[IndexStats]([IndexStats(count=self._index.num_docs() if self._index else 0, dim=self._dim)])

    @requests
    def pass_through(self, docs: DocList[AnyDoc], **kwargs) -> DocList[AnyDoc]:
        """Returns the documents of every other endpoint unchanged.

        jina refuses to chain an executor after one that has endpoints it lacks (FinetunerExecutor's /train, /runs,
        ...) unless it has a default endpoint: this one lets the indexer follow the encoder in a Flow.
        """
        return docs

    def close(self) -> None:
        self._index_thread.shutdown()
        super().close()

    def _open(self, dim: int) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        meta = self._dir / _META_FILE
        if not meta.exists():
            tmp = meta.with_suffix('.tmp')
            tmp.write_text(json.dumps({'dim': dim}))
            os.replace(tmp, meta)
        self._schema = _stored_doc_schema(dim)
        self._index = HnswDocumentIndex[self._schema](work_dir=str(self._dir))
        self._dim = dim
        logger.info('opened a %d-d cosine index with %d documents in %s', dim, self._index.num_docs(), self._dir)

    def _read_saved_dim(self) -> Optional[int]:
        meta = self._dir / _META_FILE
        return json.loads(meta.read_text())['dim'] if meta.exists() else None

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

    def _save_graph(self) -> None:
        # docarray 0.41 saves the hnswlib graph after adding but not after deleting: without this a restart would
        # bring deleted ids back into the graph (as holes in the results: their rows are gone from SQLite).
        for column, graph in self._index._hnsw_indices.items():
            graph.save_index(self._index._hnsw_locations[column])


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
