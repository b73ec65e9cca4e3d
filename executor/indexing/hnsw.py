"""backend='hnsw': docarray's HnswDocumentIndex (hnswlib's graph and a SQLite table of the stored fields) in the
indexer's own process and folder; one machine, or jina shards of it merged by ShardMerger (flows/k8s.yml)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
from docarray import BaseDoc, DocList
from docarray.index import HnswDocumentIndex
from docarray.typing import NdArray
from pydantic import Field, create_model

from executor.indexing.base import Filter, IndexBackend, Match, Stored, as_values, unit
from executor.indexing.settings import IndexerConfig

logger = logging.getLogger(__name__)

META_FILE = 'vector_indexer.json'  # the embedding size, which hnswlib needs before it can open the graph
# Candidates hnswlib keeps per query (`ef`): docarray sets 10, and a reloaded graph has hnswlib's default (10 too),
# which misses true neighbours of clustered embeddings. As wide as the graph was built (ef_construction) instead.
DEFAULT_EF = 200


def _schema(dim: int, settings: IndexerConfig) -> type[BaseDoc]:
    return create_model(
        f'StoredDoc{dim}',
        __base__=BaseDoc,
        uri=(Optional[str], None),
        text=(Optional[str], None),
        label=(Optional[str], None),
        # With allow_replace_deleted=True (docarray's default) hnswlib refuses to re-add an id that was deleted.
        embedding=(
            NdArray[dim],
            Field(
                space='cosine',
                allow_replace_deleted=False,
                ef_construction=settings.ef_construction,
                M=settings.max_connections,
            ),
        ),
    )


class HnswBackend(IndexBackend):
    name = 'hnsw'

    def __init__(self, settings: IndexerConfig, workspace: str):
        self.settings = settings
        self.dir = Path(settings.index_dir) if settings.index_dir else Path(workspace) / 'hnsw'
        self.ef = settings.ef or DEFAULT_EF
        self._index: Optional[HnswDocumentIndex] = None

    def saved_dim(self) -> Optional[int]:
        meta = self.dir / META_FILE
        return json.loads(meta.read_text())['dim'] if meta.exists() else None

    def open(self, dim: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / META_FILE
        if not meta.exists():
            tmp = meta.with_suffix('.tmp')
            tmp.write_text(json.dumps({'dim': dim}))
            os.replace(tmp, meta)
        self._schema = _schema(dim, self.settings)
        self._index = HnswDocumentIndex[self._schema](work_dir=str(self.dir))
        logger.info('opened a %d-d cosine hnsw index with %d documents in %s', dim, self._index.num_docs(), self.dir)

    def upsert(self, docs: Sequence[Stored]) -> None:
        self._index.index(
            DocList[self._schema](
                self._schema(id=d.id, uri=d.uri, text=d.text, label=d.label, embedding=d.embedding) for d in docs
            )
        )

    def search(self, queries: np.ndarray, limit: int, where: Optional[Filter]) -> list[list[Match]]:
        for graph in self._index._hnsw_indices.values():
            graph.set_ef(self.ef)  # hnswlib widens it to `limit` where that is larger
        limit = min(limit, self.count())  # hnswlib refuses a k larger than the documents it holds
        condition = None
        if where is not None:
            condition = {
                '$and': [
                    {'$or': [{field: {'$eq': value}} for value in values]} for field, values in as_values(where).items()
                ]
            }
        try:
            pairs = self._approximate(queries, limit, condition)
        except RuntimeError:
            # hnswlib found fewer than k neighbours ("Cannot return the results in a contiguous 2D array"): after
            # updates and deletes some nodes are no longer reachable through the graph. Asking for nearly every
            # document, the exact ranking of the stored vectors is the answer, and costs no more than the request.
            logger.info('hnswlib reached fewer than %d documents; ranking the stored ones exactly', limit)
            pairs = self._exact(queries, limit, condition)
        return [
            [
                Match(id=d.id, uri=d.uri, text=d.text, label=d.label, score=float(np.clip(1.0 - distance, -1.0, 1.0)))
                for d, distance in zip(docs, distances)
            ]
            for docs, distances in pairs
        ]

    def _approximate(self, queries: np.ndarray, limit: int, condition: Optional[dict]) -> list[tuple]:
        """(documents, cosine distances) per query from hnswlib's graph."""
        if condition is None:
            found = self._index.find_batched(queries, search_field='embedding', limit=limit)
            return list(zip(found.documents, found.scores))
        # docarray pre-filters on its SQLite table, then hnswlib searches only the ids that passed
        pairs = []
        for query in queries:
            built = (
                self._index.build_query()
                .filter(filter_query=condition)
                .find(query=query, search_field='embedding', limit=limit)
            )
            result = self._index.execute_query(built.build())
            pairs.append((result.documents, result.scores) if len(result.documents) else ([], []))
        return pairs

    def _exact(self, queries: np.ndarray, limit: int, condition: Optional[dict]) -> list[tuple]:
        """(documents, cosine distances) per query, ranked exactly over the stored documents matching ``condition``."""
        every = {'$or': [{'label': {'$exists': True}}, {'label': {'$exists': False}}]}
        stored = self._index.filter(filter_query=condition or every, limit=self.count())
        if not len(stored):
            return [([], []) for _ in queries]
        similarity = unit(queries) @ unit(np.stack([np.asarray(d.embedding) for d in stored])).T  # (queries, stored)
        order = np.argsort(-similarity, axis=1, kind='stable')[:, :limit]
        return [([stored[int(i)] for i in row], 1.0 - similarity[q, row]) for q, row in enumerate(order)]

    def get(self, ids: Sequence[str]) -> list[Stored]:
        try:
            found = self._index[list(ids)]
        except KeyError:  # none of them is in the index
            return []
        return [Stored(d.id, d.uri, d.text, d.label, np.asarray(d.embedding)) for d in found]

    def delete(self, ids: Sequence[str]) -> None:
        del self._index[list(ids)]
        # docarray 0.41 saves the hnswlib graph after adding but not after deleting: without this a restart would
        # bring deleted ids back into the graph (as holes in the results: their rows are gone from SQLite).
        for column, graph in self._index._hnsw_indices.items():
            graph.save_index(self._index._hnsw_locations[column])

    def count(self) -> int:
        return self._index.num_docs() if self._index is not None else 0
