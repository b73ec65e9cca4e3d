"""VectorIndexer's settings (its ``uses_with``): the backend and that backend's own connection and scale settings,
declared once with their defaults and meanings; a misspelt key, or a setting of another backend, stops the start
naming the key and what is allowed."""

from __future__ import annotations

import re
import sys
from typing import Any, Literal, Optional

from pydantic import Field, ValidationError, model_validator

from executor.params import EndpointParams, describe_errors

Backend = Literal['hnsw', 'qdrant', 'milvus']
MilvusIndexType = Literal['FLAT', 'IVF_FLAT', 'IVF_SQ8', 'IVF_PQ', 'HNSW']

UNSET_VARIABLE = re.compile(r'\$([A-Za-z_][A-Za-z0-9_]*)')
# Which settings each backend reads; the others are refused there, so that a setting never silently does nothing.
COMMON = ('backend', 'dim', 'connect_timeout', 'request_timeout')
BACKEND_SETTINGS: dict[str, tuple[str, ...]] = {
    'hnsw': ('index_dir', 'ef_construction', 'max_connections', 'ef'),
    'qdrant': (
        'url',
        'path',
        'location',
        'api_key',
        'collection_name',
        'shard_number',
        'replication_factor',
        'on_disk',
        'quantization',
        'quantization_rescore',
        'quantization_oversampling',
        'ef',
    ),
    'milvus': (
        'host',
        'port',
        'token',
        'collection_name',
        'index_type',
        'index_params',
        'search_params',
        'consistency_level',
    ),
}


class IndexerConfigError(ValueError):
    """VectorIndexer's ``uses_with`` is invalid; the message names each bad setting and what it accepts."""


class IndexerConfig(EndpointParams):
    """VectorIndexer's ``uses_with``: every setting, its default and its meaning."""

    backend: Backend = Field(
        'hnsw',
        description="'hnsw' (hnswlib in the indexer's process, one machine), 'qdrant' or 'milvus' (an engine that "
        'stores, shards and replicates the index itself)',
    )
    dim: Optional[int] = Field(
        None, ge=1, description='embedding size; by default taken from the first indexed documents or the saved index'
    )
    connect_timeout: float = Field(
        10.0, gt=0, le=300, description='seconds to reach the engine at start before the start fails (qdrant, milvus)'
    )
    request_timeout: float = Field(
        30.0,
        gt=0,
        le=3600,
        description='seconds a call to a Qdrant server may take; an engine found unreachable (within '
        'connect_timeout) is answered 503',
    )
    # hnsw
    index_dir: Optional[str] = Field(None, description='folder of the index (default: <workspace>/hnsw)')
    ef_construction: int = Field(200, ge=1, description="hnswlib's build-time candidate list")
    max_connections: int = Field(16, ge=2, description="hnswlib's M, links per node")
    ef: Optional[int] = Field(
        None,
        ge=1,
        description="candidates kept per query (hnswlib's ef, default 200; Qdrant's hnsw_ef, default "
        "the collection's); widened to `limit` where that is larger",
    )
    # qdrant
    url: Optional[str] = Field(None, description="a Qdrant server or cluster, e.g. 'http://qdrant:6333'")
    path: Optional[str] = Field(None, description="a folder for Qdrant's embedded local mode (no server)")
    location: Optional[str] = Field(None, description="':memory:' for Qdrant's embedded mode in memory")
    api_key: Optional[str] = Field(None, description="the server's API key")
    collection_name: Optional[str] = Field(
        None,
        description="the collection (default 'finetuner'); created on the first /index if missing, found again on "
        'restart',
    )
    shard_number: Optional[int] = Field(None, ge=1, description='shards of a new collection (a server)')
    replication_factor: Optional[int] = Field(
        None, ge=1, description='copies of each shard of a new collection (a cluster)'
    )
    on_disk: Optional[bool] = Field(
        None, description="keep a new collection's vectors and payload on disk (memory-mapped)"
    )
    quantization: Optional[Literal['int8', 'binary']] = Field(
        None,
        description="a new collection's quantization: 'int8' (scalar, 4x smaller) or 'binary' (32x); the "
        "original vectors stay for rescoring. Qdrant's embedded local mode does not quantize (a server does)",
    )
    quantization_rescore: bool = Field(True, description='re-score the quantized candidates with the original vectors')
    quantization_oversampling: Optional[float] = Field(
        None, ge=1.0, description='fetch limit x this many quantized candidates before rescoring'
    )
    # milvus
    host: Optional[str] = Field(None, description="the Milvus server's host (default 'localhost')")
    port: Optional[int] = Field(None, ge=1, le=65535, description="the Milvus server's port (default 19530)")
    token: Optional[str] = Field(None, description="'user:password' or an API token")
    index_type: MilvusIndexType = Field('HNSW', description='the vector index of a new collection')
    index_params: Optional[dict[str, Any]] = Field(
        None,
        description="the index's build params (default HNSW {'M': 16, 'efConstruction': 200}, IVF_* {'nlist': 1024})",
    )
    search_params: Optional[dict[str, Any]] = Field(
        None, description="search params (default HNSW {'ef': 200}, IVF_* {'nprobe': 32})"
    )
    consistency_level: Literal['Strong', 'Bounded', 'Session', 'Eventually'] = Field(
        'Strong',
        description="Milvus's read consistency; 'Strong' (default) lets every replica of the indexer read what another "
        "just wrote, 'Session' only the writer itself",
    )

    @model_validator(mode='before')
    @classmethod
    def _backend_settings(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for key, value in data.items():
            unset = UNSET_VARIABLE.fullmatch(value) if isinstance(value, str) else None
            if unset:  # jina leaves `${{ ENV.X }}` of a Flow YAML as '$X' when X is not set
                raise ValueError(
                    f'{key}={value!r}: the Flow YAML takes {key} from the environment variable {unset.group(1)}, '
                    f'which is not set; export {unset.group(1)}=... before starting the Flow'
                )
        backend = data.get('backend', 'hnsw')
        if backend not in BACKEND_SETTINGS:
            return data  # the field's own check names the allowed backends
        allowed = COMMON + BACKEND_SETTINGS[backend]
        for key, value in data.items():
            if key in cls.model_fields and key not in allowed and value is not None:
                owners = [name for name, keys in BACKEND_SETTINGS.items() if key in keys]
                raise ValueError(
                    f'{key!r} is a setting of backend {" or ".join(map(repr, owners))}, not of backend={backend!r}; '
                    f'remove it or set backend to {owners[0]!r}'
                )
        return data

    @model_validator(mode='after')
    def _qdrant_location(self) -> IndexerConfig:
        if self.backend == 'qdrant':
            given = [name for name in ('url', 'path', 'location') if getattr(self, name) is not None]
            if len(given) != 1:
                raise ValueError(
                    'backend=qdrant takes exactly one of url (a Qdrant server), path (embedded, on disk) or location '
                    f"(':memory:'); got {', '.join(given) or 'none'}"
                )
        return self


def load_settings(uses_with: dict[str, Any]) -> IndexerConfig:
    """``uses_with`` validated; every problem named by its setting, as ``IndexerConfigError``."""
    try:
        return IndexerConfig.model_validate(uses_with)
    except ValidationError as err:
        raise IndexerConfigError(f'invalid VectorIndexer settings (uses_with): {describe_errors(err)}') from None


def markdown_table() -> str:
    """docs/service.md's table of VectorIndexer's ``uses_with``, from the fields above."""
    rows = ['| name | backend | default | meaning |', '|---|---|---|---|']
    for name, field in IndexerConfig.model_fields.items():
        owners = [backend for backend, keys in BACKEND_SETTINGS.items() if name in keys] or ['all']
        default = field.get_default(call_default_factory=True)
        rows.append(f'| `{name}` | {", ".join(owners)} | `{default!r}` | {field.description} |')
    return '\n'.join(rows) + '\n'


if __name__ == '__main__':
    sys.stdout.write(markdown_table())
