"""Document types the executors exchange with clients (docarray v2), shared by every endpoint.

Every field has a default so that a partly filled document (a query with only an embedding, a run that has not
started yet) serialises over gRPC (protobuf) and HTTP (JSON) alike. `matches` defaults to an empty list rather than
`None`: a Flow's gateway rebuilds document classes from their JSON schema (docarray's `create_base_doc_from_schema`),
which fails on `Optional[DocList[...]]` (KeyError '#/$defs/MatchDoc') and makes a `default_factory` field required.

The endpoints' `parameters` are pydantic models too, in `executor.params`.
"""

# No `from __future__ import annotations` here: jina copies these classes into new pydantic models to describe its
# endpoints, and postponed (string) annotations cannot be resolved there ("`FinetunerDoc` is not fully defined").
import base64
import binascii
import os
import urllib.parse
from typing import Any, Literal, Optional, Union

import numpy as np
from docarray import BaseDoc, DocList
from docarray.typing import ID, NdArray
from pydantic import Field, TypeAdapter

from executor.tuning.errors import DataError

FINETUNER_LABEL = 'finetuner_label'  # Finetuner kept a document's class in tags['finetuner_label']
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
    """An item to train on, embed, classify, index or search with: an image (`uri`, `blob`, `tensor`) or a text.

    docarray's own `ImageDoc` and `TextDoc` fit too: their `url` is read as `uri` and their `bytes_` as `blob`; and a
    label may come as Finetuner's `tags['finetuner_label']`. `uri_of`, `blob_of` and `label_of` read them.
    """

    uri: Optional[str] = None
    # Raw bytes travel over gRPC only: JSON carries `blob` as UTF-8 text, so HTTP clients send images as `uri`/`tensor`.
    blob: Optional[bytes] = None
    tensor: Optional[NdArray] = None
    text: Optional[str] = None
    label: Optional[str] = None
    url: Optional[str] = Field(None, description="docarray ImageDoc/TextDoc's name for uri")
    bytes_: Optional[bytes] = Field(None, description="docarray ImageDoc's name for blob")
    tags: Optional[dict[str, Any]] = Field(
        None, description=f"Finetuner's document tags; tags['{FINETUNER_LABEL}'] is read as label"
    )
    relevant_ids: Optional[list[str]] = Field(
        None,
        description='a judged query (relevance evaluation and training): the ids of its relevant documents; graded '
        "judgements as tags['relevant_ids'] = {id: grade}",
    )
    embedding: Optional[NdArray] = None
    scores: Optional[dict[str, float]] = Field(None, description='classification score per class name')
    matches: DocList[MatchDoc] = Field(DocList[MatchDoc](), description='search results, best first')


def ensure_ids(docs: DocList) -> DocList:
    """Give each document without an id a new one, as docarray does on construction: a Flow's HTTP gateway builds
    documents from JSON with a class rebuilt from their schema, which leaves `id` None when the JSON has none."""
    for doc in docs:
        if not doc.id:
            doc.id = ID(os.urandom(16).hex())
    return docs


def uri_of(doc: FinetunerDoc) -> Optional[str]:
    """The document's `uri`, or docarray's `url`; both set and different is an error naming the document."""
    if doc.uri is not None and doc.url is not None and doc.uri != doc.url:
        raise ValueError(f'document {doc.id!r} has uri={doc.uri!r} and url={doc.url!r}; send one of them')
    return doc.uri if doc.uri is not None else doc.url


def blob_of(doc: FinetunerDoc) -> Optional[bytes]:
    """The document's `blob`, or docarray's `bytes_`."""
    return doc.blob if doc.blob is not None else doc.bytes_


def label_of(doc: FinetunerDoc) -> Optional[str]:
    """The document's `label`, or Finetuner's `tags['finetuner_label']` (a whole number sent as 3.0 reads '3')."""
    if doc.label is not None:
        return doc.label
    value = (doc.tags or {}).get(FINETUNER_LABEL)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return None if value is None or value == '' else str(value)


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


class RunArtifact(BaseDoc):
    """A run's artifact as a zip (the reply of `/runs/artifact`), which `artifact=<the zip>` serves.

    `blob` is the zip in base64 on every path: a Flow's gateway rebuilds document types from their JSON schema, in
    which bytes are text, so raw bytes would not pass its HTTP side (docs/design-notes.md)."""

    run_id: Optional[str] = None
    name: Optional[str] = Field(None, description='a file name for the zip: <run_id>.zip')
    blob: Optional[str] = Field(None, description="the zip's bytes in base64")
    size: Optional[int] = Field(None, description='bytes in the zip')
    sha256: Optional[str] = Field(None, description="hex digest of the zip's bytes (decoded)")


class EpochMetrics(BaseDoc):
    """One row of a run's history: the metrics of one epoch."""

    metrics: Optional[dict[str, float]] = None


class ExampleMatch(BaseDoc):
    """An evaluation item matched to a query: its text, else its name (and uri), its label, how close, relevant."""

    name: Optional[str] = None
    text: Optional[str] = None
    uri: Optional[str] = None
    label: Optional[str] = None
    score: Optional[float] = Field(None, description='cosine similarity to the query')
    relevant: Optional[bool] = Field(None, description="it has the query's label")


class ExampleResult(BaseDoc):
    """An evaluation query (its text, else its name; uri; label) and the fine-tuned model's top matches."""

    name: Optional[str] = None
    text: Optional[str] = None
    uri: Optional[str] = None
    label: Optional[str] = None
    matches: DocList[ExampleMatch] = Field(DocList[ExampleMatch](), description='best first')


class RunReport(BaseDoc):
    """What a finished run's reports hold (the reply of `/runs/reports`): the metrics of the model before and after
    fine-tuning, the history (one row per epoch), and example results (a few queries and the final model's top
    matches, each with its score and whether it shares the query's label). Rows are documents, not lists of dicts,
    which a Flow's gateway cannot rebuild from the JSON schema."""

    run_id: Optional[str] = None
    metrics_before: Optional[dict[str, float]] = None
    metrics_after: Optional[dict[str, float]] = None
    history: DocList[EpochMetrics] = Field(DocList[EpochMetrics](), description='one row per epoch')
    examples: DocList[ExampleResult] = Field(DocList[ExampleResult](), description='a query per label')
    files: Optional[list[str]] = Field(None, description="the files in the run's reports/ (PNG figures, JSON)")


class ModelInfo(BaseDoc):
    """One model the service can train and serve (the reply of `/models`, local ones first)."""

    name: Optional[str] = None
    family: Optional[str] = Field(None, description="the backbone family: 'timm', 'torchvision', 'transformers'")
    modality: Optional[Literal['image', 'text', 'image-text']] = None
    output_dim: Optional[int] = Field(None, description='embedding size; None where not measured (see /models)')
    weights_local: Optional[bool] = Field(None, description='its pretrained weights are on the server')
    options: Optional[dict[str, Union[int, str]]] = Field(None, description='the options it uses when a run sets none')


def items_of(docs: DocList, roots: list) -> list:
    """The documents as the core's items; a ``data:`` URI becomes its bytes; local paths must lie under ``roots``.
    Documents without an id get one first, so the reply and the indexer after this executor see the same ids."""
    from executor.tuning.data.sources import from_records  # here: FinetunerClient imports this module without torch

    records = []
    for doc in ensure_ids(docs):
        uri, blob = uri_of(doc), blob_of(doc)
        if uri is not None and uri.startswith('data:'):
            blob, uri = data_uri_bytes(uri, f'document {doc.id!r}'), None
        tensor = None if doc.tensor is None else np.asarray(doc.tensor)
        relevant = doc.relevant_ids if doc.relevant_ids is not None else (doc.tags or {}).get('relevant_ids')
        records.append(
            {
                'id': doc.id,
                'uri': uri,
                'blob': blob,
                'tensor': tensor,
                'text': doc.text,
                'label': label_of(doc),
                'relevant_ids': relevant,
            }
        )
    return from_records(records, roots)


def data_uri_bytes(uri: str, name: str) -> bytes:
    """The bytes a ``data:`` URI holds (base64 or percent-encoded)."""
    header, _, payload = uri.partition(',')
    if not header.endswith(';base64'):
        return urllib.parse.unquote_to_bytes(payload)
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as err:
        raise DataError(f'{name}: its data: URI holds invalid base64 ({err}); encode the file with base64') from None


def drop_content(docs: DocList[FinetunerDoc]) -> DocList[FinetunerDoc]:
    """The documents without their image bytes (``blob``, ``tensor``, a ``data:`` URI): a reply of ids and results,
    a tenth of the bytes for a batch of JPEGs. A path or http URI stays: it names the document for the client."""
    for doc in docs:
        doc.blob = doc.bytes_ = doc.tensor = None
        if doc.uri is not None and doc.uri.startswith('data:'):
            doc.uri = None
        if doc.url is not None and doc.url.startswith('data:'):
            doc.url = None
    return docs
