"""The serving process's guards, alone: request bounds, public error messages, the private temporary folder."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from executor.docs import FinetunerDoc
from executor.guards import PrivateTmp, RequestTooLarge, check_request, make_public


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
