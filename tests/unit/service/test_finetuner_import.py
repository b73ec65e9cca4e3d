"""Finetuner's artifacts (the zip ``run.save_artifact()`` wrote) served: rebuilt once as this project's model."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from executor.service.artifact_io import open_artifact
from executor.service.store import RunStore
from executor.tuning.inference import create_encoder
from tests.finetuner_layout import RESNET50, write_finetuner_zip


def resnet50_artifact(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None).eval()
    net.fc = torch.nn.Identity()  # Finetuner's tailor cut the classifier after the pool: no fc.* in model.pt
    return write_finetuner_zip(tmp_path / 'tll-resnet.zip', 'tll-resnet', {'model': (RESNET50, net.state_dict())}), net


def test_a_finetuner_zip_serves_the_embeddings_of_its_weights(tmp_path: Path):
    archive, net = resnet50_artifact(tmp_path)
    with zipfile.ZipFile(archive) as zf:
        assert 'tll-resnet/models/model/model.pt' in zf.namelist() and 'tll-resnet/config.yml' in zf.namelist()
    store, unpack = RunStore(tmp_path / 'runs'), tmp_path / 'unpack'
    unpack.mkdir()
    served = open_artifact(archive, store, unpack, 'torch')
    assert served.name == 'model.pt' and served.parent.name.startswith('finetuner-model-')
    assert open_artifact(archive, store, unpack, 'torch', select_model='resnet50') == served  # by its metadata name
    encoder = create_encoder(served, runtime='torch', device='cpu')
    images = np.random.default_rng(0).integers(0, 255, (2, 224, 224, 3), dtype=np.uint8)
    got = encoder.encode(list(images))
    batch = encoder.preprocess(list(images), 2)
    with torch.no_grad():
        expected = net(next(iter(batch.values())) if isinstance(batch, dict) else batch).numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    got = got / np.linalg.norm(got, axis=1, keepdims=True)
    assert got.shape == (2, 2048) and np.allclose((got * expected).sum(axis=1), 1.0, atol=1e-4)
    with pytest.raises(FileNotFoundError, match="select_model='clip-text' is not a model of the Finetuner artifact"):
        open_artifact(archive, store, unpack, 'torch', select_model='clip-text')


@pytest.mark.parametrize(
    ('change', 'message'),
    [
        ({'output_dim': 512}, "carries Finetuner's projection head \\(freeze=False, output_dim=512\\)"),
        ({'options': {'pooler': 'GeM'}}, "pools with 'GeM', which this service does not rebuild"),
        ({'architecture': 'transformer', 'builder': 'CLIPVisionBuilder'}, "builder 'CLIPVisionBuilder'\\) is not one"),
    ],
)
def test_finetuner_artifacts_this_service_cannot_rebuild_are_refused(tmp_path: Path, change, message):
    state = {'w': torch.zeros(1)}
    archive = write_finetuner_zip(tmp_path / 'a.zip', 'run', {'model': ({**RESNET50, **change}, state)})
    with pytest.raises(ValueError, match=message):
        open_artifact(archive, RunStore(tmp_path / 'runs'), tmp_path, 'torch')
