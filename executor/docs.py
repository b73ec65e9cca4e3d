"""Document types the executors exchange with clients (docarray v2), shared by every endpoint.

Every field has a default so that a partly filled document (a query with only an embedding, a run that has not
started yet) serialises over gRPC (protobuf) and HTTP (JSON) alike. `matches` defaults to an empty list rather than
`None`: a Flow's gateway rebuilds document classes from their JSON schema (docarray's `create_base_doc_from_schema`),
which fails on `Optional[DocList[...]]` (KeyError '#/$defs/MatchDoc') and makes a `default_factory` field required.

The pydantic models at the end are the `parameters` of the endpoints. Endpoints declare `parameters: dict` and
validate it with `Model.model_validate(parameters)` themselves rather than through jina's `parameters: Model`
annotation: with the annotation, a Flow's HTTP gateway validates the parameters against one executor's model, drops
unknown keys silently and sends that model's defaults to every executor of the chain, and jina refuses
`@dynamic_batching` on the endpoint.
"""
# No `from __future__ import annotations` here: jina copies these classes into new pydantic models to describe its
# endpoints, and postponed (string) annotations cannot be resolved there ("`FinetunerDoc` is not fully defined").
import difflib
from typing import Any, Literal, Optional

from docarray import BaseDoc, DocList
from docarray.typing import NdArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

RunStatus = Literal['CREATED', 'STARTED', 'FINISHED', 'FAILED', 'CANCELLED']


# ---------------------------------------------------------------------------------------------------------------------
# Data documents: what clients send to /encode, /classify, /train, /index, /search and get back
# ---------------------------------------------------------------------------------------------------------------------


class MatchDoc(BaseDoc):
    """One search result: an indexed document (without its embedding) and how close it is to the query."""

    uri: Optional[str] = None
    text: Optional[str] = None
    label: Optional[str] = None
    score: float = Field(description='cosine similarity to the query, in [-1, 1]; higher is closer')


class FinetunerDoc(BaseDoc):
    """An item to train on, embed, classify, index or search with: an image (`uri`, `blob`, `tensor`) or a text."""

    uri: Optional[str] = None
    # Raw bytes travel over gRPC only: JSON carries `blob` as UTF-8 text, so HTTP clients send images as `uri`/`tensor`.
    blob: Optional[bytes] = None
    tensor: Optional[NdArray] = None
    text: Optional[str] = None
    label: Optional[str] = None
    embedding: Optional[NdArray] = None
    scores: Optional[dict[str, float]] = Field(None, description='classification score per class name')
    matches: DocList[MatchDoc] = Field(DocList[MatchDoc](), description='search results, best first')


class IndexStats(BaseDoc):
    """The size of a vector index: the reply of `/count`."""

    count: int = 0
    dim: Optional[int] = Field(None, description='embedding size; None until the first document is indexed')


# ---------------------------------------------------------------------------------------------------------------------
# Run documents: the replies of /train, /runs*, /export and /evaluate
# ---------------------------------------------------------------------------------------------------------------------


class RunInfo(BaseDoc):
    """The state of one training run. Times are ISO 8601 strings in UTC."""

    run_id: Optional[str] = None
    status: Optional[RunStatus] = None
    created_at: Optional[str] = None
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    epoch: Optional[int] = None
    epochs: Optional[int] = None
    step: Optional[int] = None
    total_steps: Optional[int] = None
    metrics: Optional[dict[str, float]] = Field(None, description='the latest value of each metric')
    error: Optional[str] = None
    artifact: Optional[str] = Field(None, description='path of the run artifact (model or export) on the server')


class RunLogs(BaseDoc):
    """A slice of a run's log: pass `next_since` as `since` to get the lines that follow."""

    run_id: Optional[str] = None
    lines: Optional[list[str]] = None
    next_since: Optional[int] = None


class EvaluationResult(BaseDoc):
    """Metrics of one model on one evaluation set."""

    run_id: Optional[str] = None
    model: Optional[str] = None
    metrics: Optional[dict[str, float]] = None
    confusion_matrix: Optional[NdArray] = Field(None, description='(true class, predicted class) counts')
    class_names: Optional[list[str]] = None


# ---------------------------------------------------------------------------------------------------------------------
# Endpoint parameters
# ---------------------------------------------------------------------------------------------------------------------


class EndpointParams(BaseModel):
    """Base of every endpoint's parameters: a misspelt or unknown key is an error, never silently ignored.

    Also the parameters of endpoints that take none, so that a stray key is reported there too.
    """

    model_config = ConfigDict(extra='forbid')

    @model_validator(mode='before')
    @classmethod
    def _check_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        # jina's client sends `__results__: {}` with requests that have no parameters, and executors that return a
        # dict hand their results downstream under that key: it is jina's, never a user's typo.
        data = {key: value for key, value in data.items() if key != '__results__'}
        allowed = sorted({field.alias or name for name, field in cls.model_fields.items()})
        for key in data:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f' (did you mean {close[0]!r}?)' if close else ''
                raise ValueError(f"unknown parameter {key!r}{hint}; allowed: {', '.join(allowed) or 'none'}")
        return data


class IndexerSearchParams(EndpointParams):
    """Parameters of `VectorIndexer` `/search`."""

    limit: int = Field(10, ge=1, le=10_000, description='number of matches returned per query')


class IndexerDeleteParams(EndpointParams):
    """Parameters of `VectorIndexer` `/delete`: ids to delete, besides the ids of the documents sent."""

    ids: list[str] = Field(default_factory=list)
