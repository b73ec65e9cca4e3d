"""Artifacts for serving: the model file to serve for a run id, an artifact folder, a ``.zip`` of one, or a model file.

A zip is unpacked once, into a folder named by its name and a digest of its bytes, and served from there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import zipfile
from pathlib import Path

from executor.service.store import RUN_ID_PATTERN, STATUS_FILE, RunStore
from executor.tuning.artifact import MODEL_FILE, ONNX_FILE

logger = logging.getLogger(__name__)

_RUN_ID = re.compile(RUN_ID_PATTERN)


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
                'give a run id, an artifact folder (with model.pt / model.onnx) or a .zip of one'
            )
        if path.is_file() and path.suffix == '.zip':
            path = _unpack(path, unpack_dir)
        if path.is_file():
            return path
        folder = path
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
            zf.extractall(tmp)  # zipfile drops absolute paths and '..' from member names
        os.replace(tmp, target)
    # a zip of a folder holds the folder: serve the one that has the model
    inner = [p for p in target.iterdir() if p.is_dir()]
    if not any(target.glob('model.*')) and len(inner) == 1:
        return inner[0]
    return target
