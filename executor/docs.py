"""Document types the executors exchange with clients (docarray v2), shared by every endpoint.

Every field has a default so that a partly filled document (a query with only an embedding, a run that has not
started yet) serialises over gRPC (protobuf) and HTTP (JSON) alike. `matches` defaults to an empty list rather than
`None`: a Flow's gateway rebuilds document classes from their JSON schema (docarray's `create_base_doc_from_schema`),
which fails on `Optional[DocList[...]]` (KeyError '#/$defs/MatchDoc') and makes a `default_factory` field required.

The endpoints' `parameters` are pydantic models too, in `executor.params`.
"""
# No `from __future__ import annotations` here: jina copies these classes into new pydantic models to describe its
# endpoints, and postponed (string) annotations cannot be resolved there ("`FinetunerDoc` is not fully defined").
from typing import Literal, Optional

from docarray import BaseDoc, DocList
from docarray.typing import ID, NdArray
from pydantic import Field, TypeAdapter

RunStatus = Literal['CREATED', 'STARTED', 'FINISHED', 'FAILED', 'CANCELLED']

_ID_ADAPTER = TypeAdapter(ID)


def _id_from_protobuf(cls: type, pb_msg: str) -> ID:
    """docarray 0.41's ``ID.from_protobuf`` is ``parse_obj_as(cls, pb_msg)``, which builds a new pydantic TypeAdapter
    on every call: ~0.5 ms of each document's ~1 ms to parse, paid on every hop of a Flow. This is the same
    validation with one adapter built once (docs/design-notes.md, "Document parsing")."""
    return (_ID_ADAPTER if cls is ID else TypeAdapter(cls)).validate_python(pb_msg)


ID.from_protobuf = classmethod(_id_from_protobuf)


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
