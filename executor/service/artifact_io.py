"""Artifacts for serving: the model file to serve for a run id, an artifact folder, a ``.zip`` of one, or a model file;
Finetuner's artifacts too (its zip or folder, rebuilt once by ``finetuner_import``); and a run's artifact packed as
such a zip (``/runs/artifact``), for clients that do not share the server's disk.

A zip is unpacked once, into a folder named by its name and a digest of its bytes, and served from there; one that
would unpack to more than the executor's ``max_artifact_bytes`` (default ``MAX_UNPACKED_BYTES``), or whose members
compress like a zip bomb, is refused before a byte is written.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

from executor.service.finetuner_import import finetuner_models, rebuild
from executor.service.store import RUN_ID_PATTERN, STATUS_FILE, RunStore
from executor.tuning.artifact import MODEL_FILE, ONNX_FILE, Runtime, artifact_files, served_file
from executor.tuning.errors import excerpt

logger = logging.getLogger(__name__)

_RUN_ID = re.compile(RUN_ID_PATTERN)
MAX_UNPACKED_BYTES = 8 * 2**30  # a resnet50 artifact with its three ONNX exports is ~0.5 GB
# Model weights, ONNX graphs and PNG reports compress 1-2x, JSON a few times; a member (or the whole zip) that shrank
# more than this is a bomb, whatever its size: 400 members of 1 MiB of zeros unpacked 413 KB to 400 MiB. Members under
# RATIO_CHECKED_FROM (a short JSON file of a few repeated keys may shrink that much) count only in the total's ratio.
MAX_RATIO = 100
RATIO_CHECKED_FROM = 4096
MAX_MEMBERS = 10_000  # an artifact holds a few dozen files (reports included)
# What /runs/artifact sends in one reply. The zip is built in memory and travels as base64 (4/3 of its size); a
# protobuf message carries at most 2 GiB.
MAX_PACKED_BYTES = 2**30
STORED_SUFFIXES = ('.pt', '.onnx', '.data', '.png')  # weights and PNGs do not compress: stored as they are


def open_artifact(
    artifact: str | os.PathLike,
    store: RunStore,
    unpack_dir: Path,
    runtime: Runtime,
    select_model: str | None = None,
    max_unpacked: int = MAX_UNPACKED_BYTES,
) -> Path:
    """The model file to serve for ``artifact``: a run id, an artifact folder, a ``.zip`` of one, or a model file.

    In a folder, ``select_model`` names the file; by default ``model.onnx`` when ``runtime='onnx'`` and it exists,
    else ``model.pt`` (``artifact.served_file`` chooses). A zip is unpacked once into ``unpack_dir/<name>-<hash>/``,
    if it unpacks to at most ``max_unpacked`` bytes (the executor's ``max_artifact_bytes``).
    """
    text = str(artifact)
    if _RUN_ID.match(text) and (store.root / text / STATUS_FILE).is_file():
        folder = store.folder(text)
        if store.get(text).status != 'FINISHED':
            store.model_file(text, runtime)  # raises, saying why
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f'artifact {text!r} is neither a run id of this workspace nor an existing path; '
                "give a run id, an artifact folder (with model.pt / model.onnx) or a .zip of one (or Finetuner's)"
            )
        if path.is_file() and path.suffix == '.zip':
            path = _unpack(path, unpack_dir, max_unpacked)
        if path.is_file():
            return path
        folder = path
        models = finetuner_models(folder) if not (folder / MODEL_FILE).is_file() else {}
        if models:
            return rebuild(folder, models, select_model, unpack_dir)
    return served_file(folder, runtime, select_model)


def pack_artifact(folder: Path, name: str, limit: int = MAX_PACKED_BYTES) -> bytes:
    """The artifact in ``folder`` (``artifact_files``: model, exports, preprocessing, config, history, reports) as the
    bytes of a zip that ``open_artifact`` serves; ``name`` (the run) is for messages. Member times are the files'
    own, so an unchanged artifact zips to the same bytes (and unpacks once where it is served)."""
    files = artifact_files(folder)
    if not any(path.name in (MODEL_FILE, ONNX_FILE) for path in files):
        raise FileNotFoundError(f'{name} has no model file ({MODEL_FILE} or {ONNX_FILE}) to pack')
    total = sum(path.stat().st_size for path in files)
    if total > limit:
        raise ValueError(
            f'the artifact of {name} holds {_size(total)}, more than the {_size(limit)} /runs/artifact sends in '
            f'one reply; copy its files from the server ({", ".join(p.name for p in files[:6])}, ...), or delete '
            'the ONNX variants you do not serve and ask again'
        )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w') as zf:
        for path in files:
            kind = zipfile.ZIP_STORED if path.suffix in STORED_SUFFIXES else zipfile.ZIP_DEFLATED
            zf.write(path, path.relative_to(folder).as_posix(), compress_type=kind)
    return buffer.getvalue()


def _unpack(archive: Path, unpack_dir: Path, limit: int) -> Path:
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:12]
    target = unpack_dir / f'{archive.stem}-{digest}'
    if not target.is_dir():
        tmp = unpack_dir / f'.{target.name}.{os.getpid()}.tmp'
        try:
            with zipfile.ZipFile(archive) as zf:
                check_sizes(archive, zf.infolist(), limit)
                zf.extractall(tmp)  # zipfile drops absolute paths and '..' from member names
            os.replace(tmp, target)
        finally:  # whatever failed (a bad member, a full disk, another replica's rename first): nothing is left
            shutil.rmtree(tmp, ignore_errors=True)
    # a zip of a folder holds the folder: serve the one that has the model
    inner = [p for p in target.iterdir() if p.is_dir()]
    if not any(target.glob('model.*')) and len(inner) == 1:
        return inner[0]
    return target


def check_sizes(archive: Path, members: list[zipfile.ZipInfo], limit: int) -> None:
    """Refuse a zip that would unpack to more than ``limit`` bytes, holds more members than an artifact has, or
    whose members, one by one or all together, compress like a bomb."""
    if len(members) > MAX_MEMBERS:
        raise ValueError(
            f'artifact {archive.name!r} holds {len(members)} files, more than the {MAX_MEMBERS} an artifact of this '
            'project has: it is not one; zip the artifact folder again'
        )
    total = sum(member.file_size for member in members)
    if total > limit:
        raise ValueError(
            f'artifact {archive.name!r} would unpack to {_size(total)}, more than the {_size(limit)} allowed '
            f'(max_artifact_bytes={limit}); serve the artifact folder itself instead of a zip of it, or raise '
            'max_artifact_bytes in uses_with'
        )
    packed = sum(member.compress_size for member in members)
    for name, size, compressed in [
        *((f'member {excerpt(m.filename)}', m.file_size, m.compress_size) for m in members),
        ('its members together', total, packed),
    ]:
        ratio = size / max(1, compressed)
        if size > RATIO_CHECKED_FROM and ratio > MAX_RATIO:
            raise ValueError(
                f'artifact {archive.name!r}: {name} unpacks to {size} bytes from {compressed} ({ratio:.0f}x; model '
                'files compress at most a few times): it is not an artifact of this project; zip the artifact '
                'folder again'
            )


def _size(count: int) -> str:
    return f'{count / 2**30:.1f} GiB' if count >= 2**30 else f'{count / 2**20:.0f} MiB'
