"""The serving process's guards: the bounds on a request's size, error messages that show the client no server
paths or memory addresses, and temporary files kept in the workspace and removed with the process.

``FinetunerExecutor.__acall__`` (jina's one entry for every request) calls the first two, so no endpoint can forget
them.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from executor.service.store import pid_alive


class RequestTooLarge(ValueError):
    """A request over one of the executor's bounds (``max_request_docs``, ``max_request_bytes``): HTTP 413."""


def content_bytes(doc: Any) -> int:
    """The bytes of a document's content as it arrived: blob, tensor, text and uri (a ``data:`` URI is its text)."""
    size = 0
    for name in ('blob', 'bytes_', 'text', 'uri', 'url'):
        value = getattr(doc, name, None)
        if value is not None:
            size += len(value)
    tensor = getattr(doc, 'tensor', None)
    if tensor is not None:
        size += tensor.nbytes if isinstance(tensor, np.ndarray) else np.asarray(tensor).nbytes
    return size


def check_request(docs: Sequence[Any] | None, max_docs: int, max_bytes: int) -> None:
    """Refuse a request of more than ``max_docs`` documents, or more than ``max_bytes`` bytes of their content,
    before any of it is decoded."""
    if not docs:
        return
    if len(docs) > max_docs:
        raise RequestTooLarge(
            f'the request holds {len(docs)} documents, more than the {max_docs} this service takes in one request '
            f"(max_request_docs, set in uses_with); send them in requests of at most {max_docs} (jina's Client: "
            f'request_size={max_docs}), or train from a CSV file or image folder under the data roots'
        )
    total = 0
    for doc in docs:
        total += content_bytes(doc)
        if total > max_bytes:
            raise RequestTooLarge(
                f'the request holds more than {max_bytes} bytes of document content (max_request_bytes, set in '
                f'uses_with), reached at document {getattr(doc, "id", None)!r}; send fewer or smaller documents per '
                'request, or paths (uri) of files under the data roots instead of their bytes'
            )


_ADDRESS = re.compile(r' (object )?at 0x[0-9a-fA-F]+')


def public_text(text: str, private: Sequence[str]) -> str:
    """``text`` with each of the ``private`` folders (the workspace) shown as ``<workspace>`` and Python's memory
    addresses (``<_io.BytesIO object at 0x7f...>``) left out."""
    for folder in private:
        text = text.replace(folder, '<workspace>')
    return _ADDRESS.sub('', text)


def make_public(err: BaseException, workspace: str | Path) -> BaseException:
    """``err`` with its message made public (``public_text``), in place: jina answers with the exception's repr."""
    folder = str(workspace)
    private = sorted({folder, str(Path(folder).resolve())}, key=len, reverse=True)
    err.args = tuple(public_text(a, private) if isinstance(a, str) else a for a in err.args)
    return err


class PrivateTmp:
    """``tempfile``'s folder for this process (so jina's and the libraries' too) set to a new folder under ``parent``
    (``<pid>-...``) while the executor lives; ``close()`` removes it and gives ``tempfile`` back the folder it had.
    Folders left there by processes that have ended (a killed worker's) are removed at the start.

    jina's worker makes an empty folder in /tmp on every start and never removes it, as do wandb's imports (timm
    imports wandb when it is installed); with this they land here and go."""

    def __init__(self, parent: Path) -> None:
        parent.mkdir(parents=True, exist_ok=True)
        for old in parent.iterdir():
            pid = old.name.partition('-')[0]
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        self.folder = Path(tempfile.mkdtemp(prefix=f'{os.getpid()}-', dir=parent))
        self.previous = tempfile.tempdir
        tempfile.tempdir = str(self.folder)
        atexit.register(shutil.rmtree, self.folder, True)

    def close(self) -> None:
        if tempfile.tempdir == str(self.folder):
            previous = self.previous
            tempfile.tempdir = previous if previous is None or Path(previous).is_dir() else None
        shutil.rmtree(self.folder, ignore_errors=True)
