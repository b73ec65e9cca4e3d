"""Artifacts for serving: the model file to serve for a run id, an artifact folder, a ``.zip`` of one, or a model file;
Finetuner's artifacts too (its zip or folder, rebuilt once by ``finetuner_artifact``).

A zip is unpacked once, into a folder named by its name and a digest of its bytes, and served from there; one that
would unpack to more than ``MAX_UNPACKED_BYTES``, or whose members compress like a zip bomb, is refused before a byte
is written.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import zipfile
from pathlib import Path

from executor.service.finetuner_artifact import finetuner_models, rebuild
from executor.service.store import RUN_ID_PATTERN, STATUS_FILE, RunStore
from executor.tuning.artifact import MODEL_FILE, ONNX_FILE

logger = logging.getLogger(__name__)

_RUN_ID = re.compile(RUN_ID_PATTERN)
MAX_UNPACKED_BYTES = 8 * 2**30  # a resnet50 artifact with its three ONNX exports is ~0.5 GB
# Model weights, ONNX graphs and PNG reports compress 1-2x; a member over 1 MB that shrank more than this is a bomb.
MAX_RATIO = 100
RATIO_CHECKED_FROM = 2**20


def open_artifact(
    artifact: str | os.PathLike, store: RunStore, unpack_dir: Path, runtime: str, select_model: str | None = None
) -> Path:
    """The model file to serve for ``artifact``: a run id, an artifact folder, a ``.zip`` of one, or a model file.

    In a folder, ``select_model`` names the file; by default ``model.onnx`` when ``runtime='onnx'`` and it exists,
    else ``model.pt``. A zip is unpacked once into ``unpack_dir/<name>-<hash>/``.
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
            path = _unpack(path, unpack_dir)
        if path.is_file():
            return path
        folder = path
        models = finetuner_models(folder) if not (folder / MODEL_FILE).is_file() else {}
        if models:
            return rebuild(folder, models, select_model, unpack_dir)
    if select_model is not None:
        chosen = folder / select_model
        if not chosen.is_file():
            present = sorted(p.name for p in folder.iterdir() if p.suffix in ('.pt', '.onnx'))
            raise FileNotFoundError(f'select_model={select_model!r} is not in {str(folder)!r}; it holds {present}')
        return chosen
    onnx = folder / ONNX_FILE
    if runtime == 'onnx' and onnx.is_file():
        return onnx
    if (folder / MODEL_FILE).is_file():
        return folder / MODEL_FILE
    if onnx.is_file():
        return onnx
    raise FileNotFoundError(f'{str(folder)!r} holds neither {MODEL_FILE} nor {ONNX_FILE}: it is not a model artifact')


def _unpack(archive: Path, unpack_dir: Path) -> Path:
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:12]
    target = unpack_dir / f'{archive.stem}-{digest}'
    if not target.is_dir():
        tmp = unpack_dir / f'.{target.name}.{os.getpid()}.tmp'
        with zipfile.ZipFile(archive) as zf:
            check_sizes(archive, zf.infolist())
            zf.extractall(tmp)  # zipfile drops absolute paths and '..' from member names
        os.replace(tmp, target)
    # a zip of a folder holds the folder: serve the one that has the model
    inner = [p for p in target.iterdir() if p.is_dir()]
    if not any(target.glob('model.*')) and len(inner) == 1:
        return inner[0]
    return target


def check_sizes(archive: Path, members: list[zipfile.ZipInfo], limit: int = MAX_UNPACKED_BYTES) -> None:
    """Refuse a zip that would unpack to more than ``limit`` bytes, or holds a member compressed like a bomb."""
    total = sum(member.file_size for member in members)
    if total > limit:
        raise ValueError(
            f'artifact {archive.name!r} would unpack to {_size(total)}, more than the {_size(limit)} allowed; serve '
            'the artifact folder itself instead of a zip of it'
        )
    for member in members:
        ratio = member.file_size / max(1, member.compress_size)
        if member.file_size > RATIO_CHECKED_FROM and ratio > MAX_RATIO:
            raise ValueError(
                f'artifact {archive.name!r}: member {member.filename!r} unpacks to {member.file_size / 2**20:.0f} MiB '
                f'from {member.compress_size / 2**10:.0f} KiB ({ratio:.0f}x; model files compress at most a few '
                'times): it is not an artifact of this project; zip the artifact folder again'
            )


def _size(count: int) -> str:
    return f'{count / 2**30:.1f} GiB' if count >= 2**30 else f'{count / 2**20:.0f} MiB'
