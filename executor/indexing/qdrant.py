"""backend='qdrant': docarray's QdrantDocumentIndex on a Qdrant server or cluster (``url``), which shards and
replicates the collection itself, or Qdrant's embedded local mode (``path``, ``location=':memory:'``), no server.

Qdrant's cosine distance normalises the stored vectors, so its scores are cosines. A filtered or tuned search
(``ef``, quantization) goes through docarray's native-query passthrough, which returns documents without scores: their
score is then the cosine of the query with the stored (normalised, unquantized) vector, which is what Qdrant ranks by
(after rescoring, when the collection is quantized)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Optional
from urllib.parse import urlparse

import numpy as np
from docarray import BaseDoc, DocList
from docarray.index import QdrantDocumentIndex
from docarray.typing import NdArray
from pydantic import Field, create_model
from qdrant_client import QdrantClient
from qdrant_client.http import models as rest

from executor.indexing.base import Filter, IndexBackend, Match, Stored, as_values, probe, unit
from executor.indexing.settings import IndexerConfig

logger = logging.getLogger(__name__)

DEFAULT_COLLECTION = 'finetuner'
GRPC_PORT = 6334  # docarray talks to a Qdrant server over gRPC (prefer_grpc), on Qdrant's default gRPC port


def _schema(dim: int) -> type[BaseDoc]:
    return create_model(
        f'QdrantDoc{dim}',
        __base__=BaseDoc,
        uri=(Optional[str], None),
        text=(Optional[str], None),
        label=(Optional[str], None),
        embedding=(NdArray[dim], Field(space='cosine')),
    )


def quantization_config(kind: Optional[str]) -> Optional[rest.QuantizationConfig]:
    """Qdrant's quantization of a new collection: the quantized vectors in RAM, the originals kept for rescoring."""
    if kind == 'int8':
        return rest.ScalarQuantization(
            scalar=rest.ScalarQuantizationConfig(type=rest.ScalarType.INT8, quantile=0.99, always_ram=True)
        )
    if kind == 'binary':
        return rest.BinaryQuantization(binary=rest.BinaryQuantizationConfig(always_ram=True))
    return None


class QdrantBackend(IndexBackend):
    name = 'qdrant'

    def __init__(self, settings: IndexerConfig, workspace: str):
        self.settings = settings
        self.collection = settings.collection_name or DEFAULT_COLLECTION
        self._index: Optional[QdrantDocumentIndex] = None
        self._address: Optional[tuple[str, int]] = None
        if settings.url:
            parsed = urlparse(settings.url if '://' in settings.url else f'http://{settings.url}')
            if not parsed.hostname:
                raise ValueError(f"url={settings.url!r} names no host; write e.g. url='http://qdrant:6333'")
            self._address = (parsed.hostname, GRPC_PORT)
            for port in (parsed.port or 6333, GRPC_PORT):
                probe('qdrant', parsed.hostname, port, settings.connect_timeout, 'url')
        self._tuned = settings.ef is not None or settings.quantization is not None

    def _connection(self) -> dict[str, Any]:
        s = self.settings
        if s.url:
            return {'url': s.url, 'api_key': s.api_key, 'timeout': int(s.request_timeout), 'prefer_grpc': True}
        return {'path': s.path} if s.path else {'location': s.location}

    def saved_dim(self) -> Optional[int]:
        client = QdrantClient(**self._connection())
        try:
            if not client.collection_exists(self.collection):
                return None
            vectors = client.get_collection(self.collection).config.params.vectors
            return vectors['embedding'].size
        finally:
            client.close()  # the embedded mode locks its folder to one client at a time

    def open(self, dim: int) -> None:
        s = self.settings
        scale: dict[str, Any] = {
            'shard_number': s.shard_number,
            'replication_factor': s.replication_factor,
            'quantization_config': quantization_config(s.quantization),
        }
        if s.on_disk:
            scale.update(
                on_disk_payload=True,
                hnsw_config=rest.HnswConfigDiff(on_disk=True),
                optimizers_config=rest.OptimizersConfigDiff(memmap_threshold=20_000),
            )
        if s.quantization and not s.url:
            logger.warning(
                "Qdrant's embedded local mode does not quantize: quantization=%r takes effect on a server (url)",
                s.quantization,
            )
        self._schema = _schema(dim)
        self._index = QdrantDocumentIndex[self._schema](collection_name=self.collection, **self._connection(), **scale)
        logger.info('opened Qdrant collection %r (%d-d, cosine, %d documents)', self.collection, dim, self.count())

    def check_reachable(self) -> None:
        if self._address:
            probe('qdrant', *self._address, self.settings.connect_timeout, 'url')

    def upsert(self, docs: Sequence[Stored]) -> None:
        self._index.index(
            DocList[self._schema](
                self._schema(id=d.id, uri=d.uri, text=d.text, label=d.label, embedding=d.embedding) for d in docs
            )
        )

    def _search_params(self, limit: int) -> Optional[dict[str, Any]]:
        s = self.settings
        params: dict[str, Any] = {}
        if s.ef is not None:
            params['hnsw_ef'] = max(s.ef, limit)
        if s.quantization is not None:
            params['quantization'] = {'rescore': s.quantization_rescore, 'oversampling': s.quantization_oversampling}
        return params or None

    def search(self, queries: np.ndarray, limit: int, where: Optional[Filter]) -> list[list[Match]]:
        if where is None and not self._tuned:
            found = self._index.find_batched(queries, search_field='embedding', limit=limit)
            return [
                [Match(d.id, d.uri, d.text, d.label, float(score)) for d, score in zip(docs, scores)]
                for docs, scores in zip(found.documents, found.scores)
            ]
        native_filter = None
        if where is not None:
            native_filter = {
                'must': [{'key': field, 'match': {'any': values}} for field, values in as_values(where).items()]
            }
        results = []
        for query in unit(queries):
            docs = self._index.execute_query(
                {
                    'vector': ('embedding', query.tolist()),
                    'filter': native_filter,
                    'params': self._search_params(limit),
                    'limit': limit,
                    'with_payload': True,
                    'with_vectors': True,
                }
            )
            results.append(
                [Match(d.id, d.uri, d.text, d.label, float(np.dot(query, unit(np.asarray(d.embedding))))) for d in docs]
            )
        return results

    def get(self, ids: Sequence[str]) -> list[Stored]:
        try:
            found = self._index[list(ids)]
        except KeyError:
            return []
        return [Stored(d.id, d.uri, d.text, d.label, np.asarray(d.embedding)) for d in found]

    def delete(self, ids: Sequence[str]) -> None:
        del self._index[list(ids)]

    def count(self) -> int:
        return self._index.num_docs() if self._index is not None else 0

    def close(self) -> None:
        if self._index is not None:
            self._index._client.close()  # docarray keeps the client and never closes it: the local mode's lock
