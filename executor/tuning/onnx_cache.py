"""The registry models' ONNX exports for serving: exported once per model and weights, cached on disk, shared by
replicas (``cached_onnx_encoder``)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from executor.tuning import artifact
from executor.tuning.inference import OnnxEncoder
from executor.tuning.models import EmbeddingModel

logger = logging.getLogger(__name__)


def weights_digest(model: EmbeddingModel) -> str:
    """A short digest of what an export of the model depends on: its weights and buffers (names, shapes, dtypes and
    values), its configuration and preprocessing, and the torch and export format versions. It names the ONNX export
    of exactly this model, so another checkpoint of the same architecture, or an upgrade, never reuses a file."""
    digest = hashlib.sha256()
    context = {
        'config': model.config,
        'inputs': model.inputs.config(),
        'torch': torch.__version__,
        'format': artifact.PREPROCESSING_FORMAT,
    }
    digest.update(json.dumps(context, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f'{name}:{tuple(tensor.shape)}:{tensor.dtype};'.encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b'')
    return digest.hexdigest()[:16]


def cached_onnx_encoder(
    model: EmbeddingModel, name: str, cache_dir: str | os.PathLike, device: str = 'auto', **options: Any
) -> OnnxEncoder:
    """An onnxruntime encoder for ``model``, exported (and parity-checked) once into
    ``cache_dir/<name>-<weights digest>/model.onnx`` and reused from there, across restarts too.

    Processes sharing ``cache_dir`` (replicas, a restart during an export) take a file lock around the check and the
    export, so one exports and the others then load its file. A cached file that onnxruntime cannot load is exported
    again."""
    import fcntl

    from executor.tuning.export import export_onnx  # the exporter and quantizer: loaded when an export is asked for

    safe_name = ''.join(ch if ch.isalnum() or ch in '._-' else '_' for ch in name)
    target = Path(cache_dir) / f'{safe_name}-{weights_digest(model)}' / 'model.onnx'
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent.with_name(f'.{target.parent.name}.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file() and target.with_name(artifact.PREPROCESSING_FILE).is_file():
            try:
                encoder = OnnxEncoder(target, device=device, **options)
                logger.info('serving %s from its cached ONNX export %s', name, target)
                return encoder
            except ValueError as err:
                logger.warning('the cached ONNX export %s cannot be loaded (%s); exporting %s again', target, err, name)
        logger.info('exporting %s to ONNX for serving (once; cached in %s)', name, target.parent)
        export_onnx(model, target)  # writes through a temporary folder: a crash leaves no half-written file
        return OnnxEncoder(target, device=device, **options)
