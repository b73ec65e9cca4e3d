"""The serving process's guards: the bounds on a request's size (its documents and its parameters), error messages
that show the client no server paths, memory addresses or more than a bounded excerpt of the request, and temporary
files kept in the workspace and removed with the process.

``FinetunerExecutor.__acall__`` (jina's one entry for every request) calls the first three, so no endpoint can forget
them.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from executor.service.store import pid_alive
from executor.tuning.errors import DataError, excerpt

logger = logging.getLogger(__name__)

# The deepest nesting of lists and objects a request's parameters may have: the deepest that a valid request has is
# 4 (callbacks[i].options.<key>: [...]); a callback nested 200 deep made pydantic's error a 500.
MAX_PARAMETER_DEPTH = 16
# The longest an error message (and so its log line) may be; the longest valid one, the list of losses, is ~1,200.
MAX_ERROR_CHARS = 4000
PARENT_POLL = 0.5  # seconds between two looks at whether the process that started this one lives
PARENT_GRACE = 8.0  # seconds jina's own shutdown gets, once the parent is gone, before the process ends anyway


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
    for doc in docs:
        for name in ('id', 'text', 'uri', 'label'):
            value = getattr(doc, name, None)
            if isinstance(value, str) and has_lone_surrogate(value):
                raise DataError(
                    f'document {excerpt(getattr(doc, "id", None))}: its {name} holds a lone surrogate (a half of a '
                    'UTF-16 pair, such as \\ud800), which is no character; send valid Unicode text'
                )


def has_lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a code point of U+D800-U+DFFF, which JSON's ``"\\ud800"`` gives and no encoder takes."""
    try:
        text.encode('utf-8')
    except UnicodeEncodeError:
        return True
    return False


def check_parameters(parameters: Any, max_items: int, max_depth: int = MAX_PARAMETER_DEPTH) -> None:
    """Refuse parameters holding a list (or an object) of more than ``max_items`` entries (``RequestTooLarge``,
    naming the parameter and ``max_parameter_items``), nested deeper than ``max_depth``, or a key or text holding a
    lone surrogate (``ParameterError``, naming the parameter), before any endpoint reads them."""
    from executor.params import ParameterError  # executor.params imports nothing of this module; keeps it light

    stack: list[tuple[str, Any, int]] = [('', parameters, 0)]
    while stack:
        where, value, depth = stack.pop()
        if isinstance(value, str):
            if has_lone_surrogate(value):
                raise ParameterError(
                    f'parameter {where!r}: the text holds a lone surrogate (a half of a UTF-16 pair, such as '
                    '\\ud800), which is no character; send valid Unicode text'
                )
            continue
        if not isinstance(value, (dict, list, tuple)):
            continue
        shown = where or 'parameters'
        if depth >= max_depth:
            raise ParameterError(
                f'parameter {shown!r} is nested more than {max_depth} levels deep (lists and objects inside each '
                'other); no parameter of this service nests that deep: send the parameters as documented'
            )
        if len(value) > max_items:
            kind = 'entries' if isinstance(value, dict) else 'items'
            raise RequestTooLarge(
                f'parameter {shown!r} holds {len(value)} {kind}, more than the {max_items} this service takes in '
                'one list of a request (max_parameter_items, set in uses_with); send fewer'
            )
        if isinstance(value, dict):
            for key, inner in value.items():
                name = key if isinstance(key, str) else repr(key)
                if has_lone_surrogate(name):
                    raise ParameterError(
                        f'a parameter key under {shown!r} holds a lone surrogate (a half of a UTF-16 pair, such as '
                        f'\\ud800): {ascii(name)[:200]}; send valid Unicode text'
                    )
                stack.append((f'{where}.{name}' if where else name, inner, depth + 1))
        else:
            stack.extend((f'{shown}[{i}]', inner, depth + 1) for i, inner in enumerate(value))


_ADDRESS = re.compile(r' (object )?at 0x[0-9a-fA-F]+')


def public_text(text: str, private: Sequence[str]) -> str:
    """``text`` with each of the ``private`` folders (the workspace) shown as ``<workspace>`` and Python's memory
    addresses (``<_io.BytesIO object at 0x7f...>``) left out."""
    for folder in private:
        text = text.replace(folder, '<workspace>')
    return _ADDRESS.sub('', text)


def bounded(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how many were left out."""
    if len(text) <= limit:
        return text
    return f'{text[:limit]}... ({len(text) - limit} characters more)'


def make_public(err: BaseException, workspace: str | Path) -> BaseException:
    """``err`` with its message made public (``public_text``) and bounded (``MAX_ERROR_CHARS``, so its log line is
    too), in place: jina answers with the exception's repr and logs it. A ``UnicodeError`` that got this far (the
    readers turn theirs into ``DataError`` naming the file and line) holds the bytes it failed on, a file's contents:
    a ``DataError`` without them is returned instead, to be raised."""
    if isinstance(err, UnicodeError):
        reason = getattr(err, 'reason', None) or 'invalid text'
        return DataError(f'text that is not valid in its encoding ({type(err).__name__}: {excerpt(reason)})')
    folder = str(workspace)
    private = sorted({folder, str(Path(folder).resolve())}, key=len, reverse=True)
    err.args = tuple(bounded(public_text(a, private)) if isinstance(a, str) else a for a in err.args)
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


def watch_parent(stop: Callable[[], None]) -> threading.Thread | None:
    """In a worker process that jina started (a Deployment's, ``jina executor``'s), end the process once its parent
    is gone: ``stop()`` (the executor's long requests give up), then SIGTERM to itself (jina's own shutdown: its
    servers stop and the executor closes), then, ``PARENT_GRACE`` seconds on, ``os._exit``.

    SIGTERM ends ``jina executor``'s main process at once and left its worker serving the port, alone, for good.
    A process that jina did not start as a child (``jina executor --native``, the Docker image) has no such parent
    and is not watched: its death is the service's, as it should be."""
    if multiprocessing.parent_process() is None:
        return None
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL)
        logger.warning('the process that started this worker (%d) is gone: stopping', parent)
        stop()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(PARENT_GRACE)
        logger.warning('the worker did not stop within %.0f s of its parent: exiting', PARENT_GRACE)
        os._exit(1)

    thread = threading.Thread(target=watch, name='finetuner-parent-watch', daemon=True)
    thread.start()
    return thread
