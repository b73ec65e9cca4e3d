"""Atomic file writes, and the check that a file to read is a regular one.

Atomic writes: every file a run, an export or the run store leaves is written beside and renamed over.

A crash (or a full disk) at any moment leaves either the old file or the new one, never half of one; readers in other
processes never see a partial file. The temporary name is unique per process and thread, so concurrent writers of
the same file do not trample each other's temporary file (the last rename wins).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from executor.tuning.errors import DataError

PATH_MAX, NAME_MAX = 4096, 255  # Linux's bounds (bytes) on a path and on one of its names


def too_long(path: str | os.PathLike) -> bool:
    """Whether ``path`` is longer than any file name can be (the kernel would answer ``ENAMETOOLONG``)."""
    text = os.fspath(path)
    if len(text) > PATH_MAX:  # characters are at least a byte each: no need to encode a 2 MB path
        return True
    return len(text.encode('utf-8', 'surrogateescape')) > PATH_MAX or any(
        len(part.encode('utf-8', 'surrogateescape')) > NAME_MAX for part in text.split('/')
    )


def check_regular_file(path: Path, what: str) -> None:
    """Refuse a ``path`` that is no regular file: a FIFO or a device would block the reader or never end, and a
    missing one is named as such."""
    if not path.exists():
        raise DataError(f'{what} {path.name!r} does not exist')
    if not path.is_file():
        raise DataError(
            f'{what} {path.name!r} is not a regular file (a folder, a FIFO or a device); give the path of a file'
        )


def _temporary(path: Path) -> Path:
    return path.with_name(f'.{path.name}.{os.getpid()}.{threading.get_ident()}.tmp')


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(handle)`` on a temporary binary file beside ``path``, flush it to disk, then rename it over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        with open(tmp, 'wb') as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode('utf-8'))


def atomic_write_json(path: str | os.PathLike, content: Any) -> Path:
    return atomic_write_text(path, json.dumps(content, indent=2) + '\n')


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through a temporary file (checkpoints and model files)."""
    import torch

    return atomic_write(path, lambda handle: torch.save(obj, handle))
