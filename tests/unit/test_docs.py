"""The document types over protobuf, as jina sends them between client, gateway and executors."""

from __future__ import annotations

import numpy as np
import pytest
from docarray import DocList
from docarray.typing import ID
from jina.types.request.data import DataRequest
from pydantic.type_adapter import TypeAdapter

from executor.docs import FinetunerDoc, MatchDoc


def over_the_wire(docs: DocList[FinetunerDoc]) -> DocList[FinetunerDoc]:
    request = DataRequest()
    request.data.docs = docs
    received = DataRequest(request.to_bytes())
    received.document_array_cls = DocList[FinetunerDoc]
    return received.docs


def test_documents_survive_protobuf():
    docs = DocList[FinetunerDoc](
        [
            FinetunerDoc(id='a/1', blob=b'\xff\xd8jpeg', label='cat'),
            FinetunerDoc(uri='images/2.png', embedding=np.arange(4, dtype=np.float32), scores={'cat': 0.25}),
            FinetunerDoc(text='a query', matches=DocList[MatchDoc]([MatchDoc(uri='x.png', score=0.5)])),
        ]
    )
    back = over_the_wire(docs)
    assert back.id == docs.id and all(type(i) is ID for i in back.id)
    assert (back[0].blob, back[0].label, back[1].uri, back[1].scores) == (
        b'\xff\xd8jpeg',
        'cat',
        'images/2.png',
        {'cat': 0.25},
    )
    assert np.array_equal(back[1].embedding, docs[1].embedding)
    assert back[2].matches[0].uri == 'x.png' and back[2].matches[0].score == 0.5


def test_parsing_builds_no_type_adapter_per_document(monkeypatch: pytest.MonkeyPatch):
    """docarray 0.41 builds a pydantic TypeAdapter for every document's id it parses (half of the parse time);
    executor.docs makes it reuse one."""
    docs = DocList[FinetunerDoc]([FinetunerDoc(blob=b'x') for _ in range(20)])
    built = []
    init = TypeAdapter.__init__

    def counting_init(self, *args, **kwargs):
        built.append(args[0] if args else kwargs.get('type'))
        init(self, *args, **kwargs)

    monkeypatch.setattr(TypeAdapter, '__init__', counting_init)
    assert over_the_wire(docs).id == docs.id
    assert len(built) < len(docs), built
