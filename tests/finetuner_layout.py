"""Writes an artifact in the layout Finetuner's runs saved (finetuner-commons' ``RunArtifact``), for the tests that
serve one: ``<run>/config.yml``, ``metadata.yml``, ``metrics.yml``, ``example-results.yml``,
``models/input-map.yml``, ``models/<model>/metadata.yml`` (the model stub's metadata) and
``models/<model>/model.pt`` (its ``state_dict``), zipped with every path under ``<run>/`` as ``save_artifact`` did."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml

# finetuner-stubs' ResNet50Stub (display name 'resnet-base') as its EmbeddingModel.metadata wrote it
RESNET50 = {
    'name': 'resnet50',
    'descriptor': 'resnet50',
    'description': 'ResNet50 pre-trained on ImageNet',
    'task': 'image-to-image',
    'architecture': 'cnn',
    'builder': 'ResNet50Builder',
    'input_names': ['image'],
    'input_shapes': [['batch-size', 3, 224, 224]],
    'input_dtypes': ['float32'],
    'output_name': 'embedding',
    'output_shape': ['batch-size', 2048],
    'dynamic_axes': {'image': {0: 'batch-size'}, 'embedding': {0: 'batch-size'}},
    'preprocess_types': {'image': 'VisionPreprocess'},
    'collate_types': {'image': 'DefaultCollate'},
    'preprocess_options': {'image': {}},
    'collate_options': {'image': {}},
    'options': {'pooler': None, 'pooler_options': {}},
    'embedding_layer': 'adaptiveavgpool2d_173',
    'output_dim': None,
    'freeze': False,
    'tailor_input_shape': [3, 224, 224],
    'tailor_input_dtype': 'float32',
}


def text_metadata(descriptor: str, dim: int) -> dict[str, Any]:
    """A ``_TextTransformerStub``'s metadata (as SBERTStub's, for another sentence-transformers model)."""
    return {
        'name': descriptor,
        'descriptor': descriptor,
        'description': 'a sentence-transformers model',
        'task': 'text-to-text',
        'architecture': 'transformer',
        'builder': 'TextTransformerBuilder',
        'input_names': ['input_ids', 'attention_mask'],
        'input_shapes': [['batch-size', 'sequence-length'], ['batch-size', 'sequence-length']],
        'input_dtypes': ['int32', 'int32'],
        'output_name': 'embedding',
        'output_shape': ['batch-size', dim],
        'dynamic_axes': {},
        'preprocess_types': {'text': 'TextPreprocess'},
        'collate_types': {'text': 'TransformersCollate'},
        'preprocess_options': {'text': {}},
        'collate_options': {'text': {'name': descriptor, 'truncation': True, 'padding': True}},
        'options': {'pooler': 'mean', 'pooler_options': None},
        'embedding_layer': None,
        'output_dim': None,
        'freeze': False,
        'tailor_input_shape': [20],
        'tailor_input_dtype': 'int32',
    }


def write_finetuner_zip(
    path: Path, run: str, models: dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]]
) -> Path:
    """``models``: folder name (Finetuner's 'model', or 'clip-text' ...) -> (metadata, state_dict)."""
    files: dict[str, bytes] = {
        'config.yml': yaml.safe_dump(
            {'run_name': run, 'model': {'name': next(iter(models.values()))[0]['name']}}
        ).encode(),
        'metadata.yml': yaml.safe_dump({'name': run, 'experiment': 'default', 'product': 'finetuner'}).encode(),
        'metrics.yml': b'{}\n',
        'example-results.yml': b'{}\n',
        'models/input-map.yml': yaml.safe_dump({name: ['image'] for name in models}).encode(),
    }
    for name, (metadata, state) in models.items():
        buffer = io.BytesIO()
        torch.save(state, buffer)
        files[f'models/{name}/metadata.yml'] = yaml.safe_dump(metadata).encode()
        files[f'models/{name}/model.pt'] = buffer.getvalue()
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        for name, data in files.items():
            zf.writestr(f'{run}/{name}', data)
    return path
