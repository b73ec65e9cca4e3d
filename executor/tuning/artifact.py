"""What a finished run leaves, by name: the artifact's files, the ONNX contract and the one ``preprocessing.json``.

An artifact folder (a run folder, or one unpacked from a zip) holds::

    model.pt             the model: config, inputs, class names, weights (``save_model``; ``weights_only`` loadable)
    preprocessing.json   what a client needs to feed the model: its inputs, output size, classes (``preprocessing``)
    model.onnx           the ONNX export (and model-fp16.onnx / model-int8.onnx), checked against torch
    config.json          the run's resolved configuration; history.jsonl one row of metrics per epoch
    checkpoints/last.pt  what a resume continues from; reports/ the curves and the before/after figures

``artifact_files`` lists what a copy of the artifact carries (``/runs/artifact``'s zip, what the trackers log);
``served_file`` is the one choice of the file a runtime serves from it.

The ONNX graph takes the model's inputs by the names its ``Inputs`` gives (``images`` ``(B, 3, H, W)`` for an image
model), the batch axis dynamic, and gives ``embeddings`` ``(B, D)``, plus ``logits`` ``(B, C)`` when the model has a
classifier head. ``preprocessing.json`` is written beside ``model.pt`` by the trainer and beside every export, and
also travels inside the ``.onnx`` file's metadata, so an ``.onnx`` file copied alone can still be served.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from executor.tuning.files import atomic_write_json

if TYPE_CHECKING:
    from executor.tuning.models import EmbeddingModel

Runtime = Literal['onnx', 'torch']
MODEL_FILE = 'model.pt'
ONNX_FILE = 'model.onnx'
EXPORT_FILES = {'fp32': ONNX_FILE, 'fp16': 'model-fp16.onnx', 'int8': 'model-int8.onnx'}
PREPROCESSING_FILE = 'preprocessing.json'
CONFIG_FILE = 'config.json'
HISTORY_FILE = 'history.jsonl'
CHECKPOINT = 'checkpoints/last.pt'
REPORTS_DIR = 'reports'
EXTERNAL_DATA = '.data'  # an ONNX graph over 2 GiB keeps its weights in `<name>.onnx.data` beside it

EMBEDDINGS = 'embeddings'
LOGITS = 'logits'
ONNX_METADATA_KEY = 'finetuner_executor.preprocessing'
PREPROCESSING_FORMAT = 'finetuner-executor/preprocessing-v2'
# Written by releases before the input seam: an image model's `data_config` at the top level.
PREPROCESSING_FORMAT_V1 = 'finetuner-executor/onnx-v1'


def artifact_files(folder: str | os.PathLike) -> list[Path]:
    """The files of the artifact in ``folder`` that a copy of it carries: the model, its ONNX exports (with their
    external data), a two-tower model's per-tower exports (``tower_onnx_file``, each with its ``preprocessing.json``),
    ``preprocessing.json``, the configuration, the history and ``reports/``. Not the checkpoint (it
    holds the optimizer's state too, 2-3x the model), nor what a run folder holds besides (the training documents,
    the log, the trackers' files)."""
    folder = Path(folder)
    names = [MODEL_FILE, PREPROCESSING_FILE, CONFIG_FILE, HISTORY_FILE]
    names += [name + suffix for name in EXPORT_FILES.values() for suffix in ('', EXTERNAL_DATA)]
    files = [folder / name for name in names if (folder / name).is_file()]
    towers = sorted(sub for sub in folder.iterdir() if (sub / ONNX_FILE).is_file()) if folder.is_dir() else []
    for tower in towers:
        names = (ONNX_FILE, ONNX_FILE + EXTERNAL_DATA, PREPROCESSING_FILE)
        files += [tower / name for name in names if (tower / name).is_file()]
    reports = folder / REPORTS_DIR
    return files + sorted(p for p in reports.rglob('*') if p.is_file() and not p.name.startswith('.'))


def output_names(model: EmbeddingModel) -> tuple[str, ...]:
    """The graph's outputs: embeddings, and logits when the model has a classifier head."""
    return (EMBEDDINGS, LOGITS) if model.classifier is not None else (EMBEDDINGS,)


def preprocessing(model: EmbeddingModel) -> dict[str, Any]:
    """The ``preprocessing.json`` record of ``model`` (JSON-ready)."""
    return {
        'format': PREPROCESSING_FORMAT,
        'inputs': model.inputs.config(),
        'embed_dim': model.embed_dim,
        'class_names': model.class_names,
        'model_config': json.loads(json.dumps(model.config, default=str)),
        'onnx': {'inputs': list(model.inputs.onnx_inputs), 'outputs': list(output_names(model))},
    }


def write_preprocessing(folder: str | os.PathLike, model: EmbeddingModel) -> Path:
    return atomic_write_json(Path(folder) / PREPROCESSING_FILE, preprocessing(model))


def read_preprocessing(onnx_path: str | os.PathLike) -> dict[str, Any]:
    """The record exported with ``onnx_path``: ``preprocessing.json`` beside it, else the file's own metadata.

    Records of the earlier format (an image model's ``data_config`` at the top level) are read as image inputs.
    """
    onnx_path = Path(onnx_path)
    beside = onnx_path.with_name(PREPROCESSING_FILE)
    if beside.is_file():
        record = json.loads(beside.read_text(encoding='utf-8'))
    else:
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
        if ONNX_METADATA_KEY not in meta:
            raise FileNotFoundError(
                f'{str(onnx_path)!r} has no {PREPROCESSING_FILE} beside it and no preprocessing in its metadata: '
                'export it with executor.tuning.export.export_onnx, which writes both'
            )
        record = json.loads(meta[ONNX_METADATA_KEY])
    if record.get('format') == PREPROCESSING_FORMAT_V1:
        record = {
            **record,
            'format': PREPROCESSING_FORMAT,
            'inputs': {'kind': 'image', **record['data_config']},
            'onnx': {'inputs': [record['input']], 'outputs': record['outputs']},
        }
    if record.get('format') != PREPROCESSING_FORMAT:
        raise ValueError(
            f'preprocessing record of {str(onnx_path)!r} has format {record.get("format")!r}, expected '
            f'{PREPROCESSING_FORMAT!r}; export the model again with export_onnx'
        )
    return record


def tower_onnx_file(folder: str | os.PathLike, tower: str) -> Path:
    """Where a two-tower run keeps one tower's ONNX export: ``<folder>/<tower>/model.onnx`` (``tower``:
    'clip-vision' or 'clip-text'), with its own ``preprocessing.json`` beside it."""
    return Path(folder) / tower / ONNX_FILE


def served_file(source: str | os.PathLike, runtime: Runtime, file: str | None = None, tower: str | None = None) -> Path:
    """The model file that ``runtime`` serves from ``source``, an artifact folder or a model file in one.

    ``file`` names a file of the folder (``select_model``, e.g. 'model-int8.onnx'). Otherwise 'onnx' serves the ONNX
    export where there is one, else ``model.pt``: the folder's ``model.onnx``, or for ``tower`` (a two-tower
    artifact's 'clip-vision' or 'clip-text') that tower's own (``tower_onnx_file``). A model file is served as it
    is, unless ``tower`` asks for its tower's export beside it. A folder with neither model file is not an artifact.
    """
    source = Path(source)
    folder = source.parent if source.is_file() else source
    if tower is not None:
        exported = tower_onnx_file(folder, tower)
        if runtime == 'onnx' and exported.is_file():
            return exported
    if source.is_file():
        return source
    if file is not None:
        chosen = folder / file
        if not chosen.is_file():
            present = sorted(p.name for p in folder.iterdir() if p.suffix in ('.pt', '.onnx'))
            raise FileNotFoundError(f'select_model={file!r} is not in {str(folder)!r}; it holds {present}')
        return chosen
    onnx, weights = folder / ONNX_FILE, folder / MODEL_FILE
    if runtime == 'onnx' and onnx.is_file():
        return onnx
    if weights.is_file():
        return weights
    if onnx.is_file():
        return onnx
    raise FileNotFoundError(f'{str(folder)!r} holds neither {MODEL_FILE} nor {ONNX_FILE}: it is not a model artifact')
