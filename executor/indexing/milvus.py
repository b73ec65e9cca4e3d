"""backend='milvus': docarray's MilvusDocumentIndex on a Milvus server or cluster (``host``, ``port``), which shards
and replicates the collection itself; the tests start a Milvus Lite server (``milvus-lite server``, a pip package).

docarray's Milvus index knows the L2 and inner-product metrics only: embeddings are stored and searched L2-normalised
with the inner product, which is the cosine. Milvus keeps no NULL in a string column: a missing ``uri``, ``text`` or
``label`` is stored as ``''`` and read back as missing."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
from docarray import BaseDoc, DocList
from docarray.index import MilvusDocumentIndex
from docarray.typing import NdArray
from pydantic import Field, create_model
from pymilvus import Collection, connections, utility

from executor.indexing.base import Filter, IndexBackend, Match, Stored, as_values, probe, unit
from executor.indexing.settings import IndexerConfig

logger = logging.getLogger(__name__)

DEFAULT_COLLECTION = 'finetuner'
ALIAS = 'default'  # the connection docarray's Milvus index uses
DEFAULT_INDEX_PARAMS = {'HNSW': {'M': 16, 'efConstruction': 200}, 'FLAT': {}}
DEFAULT_SEARCH_PARAMS = {'HNSW': {'ef': 200}, 'FLAT': {}}
IVF_INDEX_PARAMS, IVF_SEARCH_PARAMS = {'nlist': 1024}, {'nprobe': 32}


def _schema(dim: int, index_type: str, index_params: dict[str, Any]) -> type[BaseDoc]:
    return create_model(
        f'MilvusDoc{dim}',
        __base__=BaseDoc,
        uri=(str, ''),
        text=(str, ''),
        label=(str, ''),
        embedding=(
            NdArray[dim],
            Field(is_embedding=True, dim=dim, index_type=index_type, params=index_params, space='IP'),
        ),
    )


def _missing(value: str) -> Optional[str]:
    return value or None


class MilvusBackend(IndexBackend):
    name = 'milvus'

    def __init__(self, settings: IndexerConfig, workspace: str):
        self.settings = settings
        self.collection = settings.collection_name or DEFAULT_COLLECTION
        self.host, self.port = settings.host or 'localhost', settings.port or 19530
        kind = settings.index_type
        self.index_params = settings.index_params or DEFAULT_INDEX_PARAMS.get(kind, IVF_INDEX_PARAMS)
        self.search_params = settings.search_params or DEFAULT_SEARCH_PARAMS.get(kind, IVF_SEARCH_PARAMS)
        self._index: Optional[MilvusDocumentIndex] = None
        probe('milvus', self.host, self.port, settings.connect_timeout, 'host, port')
        # connected here with a bounded wait; docarray's own connect (same alias and address) then reuses it
        connections.connect(
            alias=ALIAS,
            host=self.host,
            port=self.port,
            token=settings.token or '',
            timeout=settings.connect_timeout,
        )

    def saved_dim(self) -> Optional[int]:
        if not utility.has_collection(self.collection, using=ALIAS, timeout=int(self.settings.connect_timeout)):
            return None
        fields = Collection(self.collection, using=ALIAS).schema.fields
        return next(int(f.params['dim']) for f in fields if f.name == 'embedding')

    def open(self, dim: int) -> None:
        self._schema = _schema(dim, self.settings.index_type, self.index_params)
        self._index = MilvusDocumentIndex[self._schema](
            index_name=self.collection,
            host=self.host,
            port=self.port,
            token=self.settings.token or '',
            search_params={'params': self.search_params},
            consistency_level=self.settings.consistency_level,
        )
        logger.info(
            'opened Milvus collection %r at %s:%d (%d-d, %s, inner product of unit vectors, %d documents)',
            self.collection,
            self.host,
            self.port,
            dim,
            self.settings.index_type,
            self.count(),
        )

    def check_reachable(self) -> None:
        probe('milvus', self.host, self.port, self.settings.connect_timeout, 'host, port')

    def upsert(self, docs: Sequence[Stored]) -> None:
        ids = [d.id for d in docs]
        del self._index[ids]  # Milvus's insert keeps both rows of a repeated primary key
        self._index.index(
            DocList[self._schema](
                self._schema(
                    id=d.id, uri=d.uri or '', text=d.text or '', label=d.label or '', embedding=unit(d.embedding)
                )
                for d in docs
            )
        )

    def search(self, queries: np.ndarray, limit: int, where: Optional[Filter]) -> list[list[Match]]:
        queries = unit(queries)
        if where is None:
            found = self._index.find_batched(queries, search_field='', limit=limit)
            pairs = zip(found.documents, found.scores)
        else:
            # Milvus's boolean expression; json.dumps writes each value as a quoted, escaped string literal
            expr = ' and '.join(f'{field} in {json.dumps(values)}' for field, values in as_values(where).items())
            pairs = []
            for query in queries:
                built = self._index.build_query().find(query=query, limit=limit).filter(filter_query=expr).build()
                result = self._index.execute_query(built)
                pairs.append((result.documents, result.scores))
        return [
            [
                Match(d.id, _missing(d.uri), _missing(d.text), _missing(d.label), float(min(score, 1.0)))
                for d, score in zip(docs, scores)
            ]
            for docs, scores in pairs
        ]

    def get(self, ids: Sequence[str]) -> list[Stored]:
        try:
            found = self._index[list(ids)]
        except KeyError:
            return []
        return [
            Stored(d.id, _missing(d.uri), _missing(d.text), _missing(d.label), np.asarray(d.embedding)) for d in found
        ]

    def delete(self, ids: Sequence[str]) -> None:
        del self._index[list(ids)]

    def count(self) -> int:
        return self._index.num_docs() if self._index is not None else 0

    def close(self) -> None:
        connections.disconnect(ALIAS)
