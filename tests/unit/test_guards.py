"""The serving process's guards, alone: request bounds, public error messages, the private temporary folder."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from executor.docs import FinetunerDoc
from executor.guards import (
    MAX_ERROR_CHARS,
    PrivateTmp,
    RequestTooLarge,
    check_parameters,
    check_request,
    make_public,
    watch_parent,
)
from executor.params import ParameterError
from executor.tuning.errors import DataError


def test_request_bounds_count_documents_and_content_bytes():
    docs = [FinetunerDoc(id=f'd{i}', tensor=np.zeros((10, 10), np.uint8)) for i in range(5)]  # 100 bytes each
    check_request(docs, max_docs=5, max_bytes=500)
    with pytest.raises(RequestTooLarge, match=r'holds 5 documents, more than the 4 .*max_request_docs'):
        check_request(docs, max_docs=4, max_bytes=500)
    with pytest.raises(RequestTooLarge, match=r"more than 450 bytes .*max_request_bytes.*reached at document 'd4'"):
        check_request(docs, max_docs=5, max_bytes=450)
    with pytest.raises(RequestTooLarge, match=r"reached at document 'b'"):
        check_request([FinetunerDoc(id='b', blob=b'x' * 11)], max_docs=5, max_bytes=10)


def test_errors_show_the_workspace_as_a_placeholder_and_no_addresses(tmp_path: Path):
    err = FileNotFoundError(2, f"file '{tmp_path}/ws/data/x.png' does not exist (<_io.BytesIO object at 0x7f00>)")
    make_public(err, tmp_path / 'ws')
    assert err.args == (2, "file '<workspace>/data/x.png' does not exist (<_io.BytesIO>)")


def test_the_private_tmp_is_used_removed_and_handed_back(tmp_path: Path):
    before = tempfile.tempdir
    (tmp_path / 'tmp' / '999999999-old').mkdir(parents=True)  # a folder of a process that has ended
    private = PrivateTmp(tmp_path / 'tmp')
    try:
        assert not (tmp_path / 'tmp' / '999999999-old').exists()
        assert Path(tempfile.mkdtemp()).parent == private.folder  # what libraries make lands here
    finally:
        private.close()
    assert not private.folder.exists() and tempfile.tempdir == before


def test_every_list_and_object_of_the_parameters_is_bounded_at_any_depth():
    check_parameters({'names': ['a'] * 10, 'loss_options': {'margin': 0.1}}, max_items=10)
    with pytest.raises(RequestTooLarge, match=r"parameter 'names' holds 11 items, more than the 10 .*max_parameter"):
        check_parameters({'names': ['a'] * 11}, max_items=10)
    with pytest.raises(RequestTooLarge, match=r"parameter 'callbacks\[0\].options' holds 11 entries"):
        check_parameters({'callbacks': [{'options': {str(i): i for i in range(11)}}]}, max_items=10)
    deep: list = []
    for _ in range(200):
        deep = [deep]
    with pytest.raises(ParameterError, match=r"parameter 'callbacks(\[0\]){15}' is nested more than 16 levels"):
        check_parameters({'callbacks': deep}, max_items=10)


def test_lone_surrogates_are_refused_naming_the_parameter_or_the_document():
    with pytest.raises(ParameterError, match=r"parameter 'model': the text holds a lone surrogate"):
        check_parameters({'model': '\ud800abc'}, max_items=10)
    with pytest.raises(ParameterError, match=r"a parameter key under 'loss_options' holds a lone surrogate"):
        check_parameters({'loss_options': {'\udfff': 1}}, max_items=10)
    with pytest.raises(DataError, match=r"document 'd': its text holds a lone surrogate"):
        check_request([FinetunerDoc(id='d', text='\ud800abc')], max_docs=5, max_bytes=10**6)
    check_request([FinetunerDoc(id='d', text='h\u00e9llo \U0001f600')], max_docs=5, max_bytes=10**6)  # a real pair


def test_public_errors_are_bounded_and_a_decode_error_loses_its_bytes(tmp_path: Path):
    err = make_public(ValueError('x' * 100_000), tmp_path)
    assert len(err.args[0]) < MAX_ERROR_CHARS + 100 and err.args[0].endswith('(96000 characters more)')
    secret = b'line one,secret\n' * 200 + b'\xff'
    try:
        secret.decode('utf-8')
    except UnicodeDecodeError as decode_error:
        public = make_public(decode_error, tmp_path)
    assert isinstance(public, DataError) and 'secret' not in repr(public) and 'invalid start byte' in str(public)


def test_a_worker_watches_its_parent_only_when_jina_started_it():
    assert watch_parent(lambda: None) is None  # pytest's own process: no multiprocessing parent
