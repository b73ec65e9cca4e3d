"""VectorIndexer's backends: one contract (base.py) over docarray's document indexes, chosen by ``backend`` in
uses_with (settings.py); ``create_backend`` builds the one named. Nothing is imported here eagerly: executor.params
reads base.py's filter fields, and settings.py builds on executor.params."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from executor.indexing.base import IndexBackend
    from executor.indexing.settings import IndexerConfig


def create_backend(settings: IndexerConfig, workspace: str) -> IndexBackend:
    """The backend ``settings.backend`` names; an engine's client is imported only when it is chosen."""
    if settings.backend == 'qdrant':
        from executor.indexing.qdrant import QdrantBackend

        return QdrantBackend(settings, workspace)
    if settings.backend == 'milvus':
        from executor.indexing.milvus import MilvusBackend

        return MilvusBackend(settings, workspace)
    from executor.indexing.hnsw import HnswBackend

    return HnswBackend(settings, workspace)
