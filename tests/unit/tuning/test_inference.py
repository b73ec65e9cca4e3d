"""The torch and onnxruntime encoders: the same embeddings from the same images, clear errors, device fallback."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

import executor
from executor.tuning.devices import resolve_device, usable_cores
from executor.tuning.errors import DataError
from executor.tuning.export import export_onnx
from executor.tuning.inference import OnnxEncoder, TorchEncoder, create_encoder, onnx_providers
from executor.tuning.models import build_model, save_model
from executor.tuning.onnx_cache import cached_onnx_encoder, weights_digest

REPO = Path(executor.__file__).resolve().parents[1]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope='module')
def images(tmp_path_factory) -> list:
    """Real photos in every accepted form: PIL, array, encoded bytes, a file path, plus resized crops."""
    chelsea, coffee, astronaut = data.chelsea(), data.coffee(), data.astronaut()
    png = io.BytesIO()
    Image.fromarray(coffee).save(png, format='PNG')
    path = tmp_path_factory.mktemp('images') / 'astronaut.jpg'
    Image.fromarray(astronaut).save(path, quality=95)
    crop = Image.fromarray(astronaut[0:256, 128:384]).resize((96, 96), Image.BILINEAR)
    wide = Image.fromarray(chelsea[50:250, :]).resize((300, 120), Image.BICUBIC)
    return [Image.fromarray(chelsea), png.getvalue(), str(path), coffee[100:300, 200:500], crop, wide]


@pytest.fixture(scope='module')
def model():
    return build_model()  # the real default: efficientnet_lite0 with its offline ImageNet weights


@pytest.fixture(scope='module')
def onnx_path(model, tmp_path_factory) -> Path:
    return export_onnx(model, tmp_path_factory.mktemp('onnx') / 'model.onnx').path


@pytest.fixture(scope='module')
def encoders(model, onnx_path) -> dict:
    return {'torch': create_encoder(model, 'torch', 'cpu'), 'onnx': create_encoder(onnx_path, device='cpu')}


@pytest.fixture(params=['torch', 'onnx'])
def encoder(request, encoders):
    return encoders[request.param]


def test_encode_gives_float32_embeddings(encoder, images):
    out = encoder.encode(images)
    assert out.shape == (len(images), 1280) and out.dtype == np.float32
    assert np.isfinite(out).all() and (np.linalg.norm(out, axis=1) > 1).all()
    assert encoder.embed_dim == 1280 and encoder.device == 'cpu'
    assert encoder.inputs.data_config['input_size'] == (3, 224, 224)
    assert encoder.runtime in repr(encoder)


def test_runtimes_agree_on_real_images(encoders, images):
    torch_out = encoders['torch'].encode(images)
    onnx_out = encoders['onnx'].encode(images)
    assert cosine(torch_out, onnx_out).min() >= 0.9999
    np.testing.assert_allclose(onnx_out, torch_out, atol=1e-3)


def test_different_photos_give_different_embeddings(encoder, images):
    out = encoder.encode(images[:3])  # chelsea (a cat), coffee, astronaut
    assert cosine(out[[0]], out[[1]])[0] < 0.9 and cosine(out[[0]], out[[2]])[0] < 0.9


def test_preprocessed_batch_gives_the_same_embeddings(encoder, images):
    batch = encoder.inputs.batch(images)['images']
    np.testing.assert_allclose(encoder.encode(batch, batch_size=4), encoder.encode(images), atol=1e-5)


def test_batch_size_does_not_change_the_result(encoder, images):
    np.testing.assert_allclose(encoder.encode(images, batch_size=2), encoder.encode(images, batch_size=32), atol=1e-4)


def test_no_images_give_an_empty_array(encoder):
    assert encoder.encode([]).shape == (0, 1280)


def test_decode_error_names_the_item(encoder, images):
    with pytest.raises(DataError, match='doc-2: cannot decode'):
        encoder.encode([images[0], images[1], b'not an image'], batch_size=1, names=['doc-0', 'doc-1', 'doc-2'])


def test_wrong_inputs_are_refused_with_the_fix(encoder, images):
    with pytest.raises(TypeError, match='wrap a single item in a list'):
        encoder.encode(images[0])
    with pytest.raises(ValueError, match=r'shape \(N, 3, 224, 224\)'):
        encoder.encode(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match='one name per item'):
        encoder.encode(images[:2], names=['only one'])


def test_no_classifier_head_is_a_clear_error(encoder, images):
    with pytest.raises(ValueError, match='no classifier head'):
        encoder.classify(images[:1])


def test_torch_encoder_leaves_the_callers_model_alone(model):
    model.train()
    encoder = TorchEncoder(model, 'cpu')
    assert model.training and not encoder.model.training
    assert encoder.channels_last
    assert next(model.parameters()).is_contiguous()
    model.eval()


def test_artifact_encodes_and_classifies_alike_on_both_runtimes(tmp_path, images):
    model = build_model('test_efficientnet', pretrained=False, output_dim=16, class_names=['cat', 'coffee', 'person'])
    model.inputs = model.inputs.with_options(image_size=64)
    artifact = save_model(model, tmp_path / 'model.pt')
    torch_enc = create_encoder(artifact)
    onnx_enc = create_encoder(artifact, 'onnx', 'cpu', export_dir=tmp_path / 'exported', intra_op_threads=1)
    assert (torch_enc.runtime, onnx_enc.runtime) == ('torch', 'onnx')
    assert (tmp_path / 'exported' / 'model.onnx').is_file()
    assert onnx_enc.class_names == ['cat', 'coffee', 'person'] and onnx_enc.embed_dim == 16
    np.testing.assert_allclose(onnx_enc.encode(images), torch_enc.encode(images), atol=1e-4)
    logits = onnx_enc.classify(images)
    assert logits.shape == (len(images), 3)
    np.testing.assert_allclose(logits, torch_enc.classify(images), atol=1e-4)


def test_fresh_process_reloads_the_onnx_file(onnx_path, encoders, tmp_path):
    """Only the .onnx file and its preprocessing.json: no model code, no torch model in the new process."""
    paths = [str(tmp_path / f'{name}.png') for name in ('chelsea', 'coffee', 'astronaut')]
    for path, photo in zip(paths, (data.chelsea(), data.coffee(), data.astronaut())):
        Image.fromarray(photo).save(path)
    script = (
        'import json, sys, numpy as np\n'
        'from executor.tuning.inference import create_encoder\n'
        'enc = create_encoder(sys.argv[1], device="cpu")\n'
        'np.save(sys.argv[2], enc.encode(json.loads(sys.argv[3])))\n'
    )
    out = tmp_path / 'out.npy'
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'JINA_OPTOUT_TELEMETRY': '1'}
    subprocess.run(
        [sys.executable, '-c', script, str(onnx_path), str(out), json.dumps(paths)],
        env=env,
        cwd=tmp_path,
        check=True,
        timeout=300,
    )
    np.testing.assert_allclose(np.load(out), encoders['onnx'].encode(paths), atol=1e-5)
    assert cosine(np.load(out), encoders['torch'].encode(paths)).min() >= 0.9999


def test_absent_or_bad_onnx_file_is_a_clear_error(tmp_path, onnx_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        create_encoder(tmp_path / 'missing.onnx')
    bad = tmp_path / 'bad.onnx'
    bad.write_bytes(b'this is not a protobuf')
    (tmp_path / 'preprocessing.json').write_text(onnx_path.with_name('preprocessing.json').read_text())
    with pytest.raises(ValueError, match='onnxruntime cannot load .*bad.onnx.*export the model again'):
        create_encoder(bad)
    with pytest.raises(ValueError, match="runs on runtime='onnx' only"):
        create_encoder(onnx_path, 'torch')


def test_onnx_file_alone_carries_its_preprocessing(tmp_path, onnx_path):
    lone = tmp_path / 'lone.onnx'
    lone.write_bytes(onnx_path.read_bytes())  # copied without preprocessing.json: read from the metadata
    encoder = OnnxEncoder(lone, device='cpu')
    assert encoder.inputs.data_config['mean'] == [0.5, 0.5, 0.5] and encoder.embed_dim == 1280


def test_cuda_on_a_machine_without_gpu_warns_and_falls_back(onnx_path, caplog):
    if torch.cuda.is_available():
        pytest.skip('this machine has a GPU')
    with caplog.at_level(logging.WARNING, logger='executor.tuning.inference'):
        encoder = OnnxEncoder(onnx_path, device='cuda')
    assert encoder.device == 'cpu' and encoder.providers == ['CPUExecutionProvider']
    assert "device='cuda' was asked for" in caplog.text and 'running on the CPU instead' in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='executor.tuning.inference'):
        assert TorchEncoder(build_model('resnet18', pretrained=False), 'cuda').device == 'cpu'
    assert 'running on the CPU instead' in caplog.text


def test_providers_are_explicit():
    assert onnx_providers('cpu') == ['CPUExecutionProvider']
    assert onnx_providers('cuda:1') == [('CUDAExecutionProvider', {'device_id': 1}), 'CPUExecutionProvider']
    assert [p[0] if isinstance(p, tuple) else p for p in onnx_providers('cuda', tensorrt=True)] == [
        'TensorrtExecutionProvider',
        'CUDAExecutionProvider',
        'CPUExecutionProvider',
    ]
    assert resolve_device('cpu') == 'cpu' and resolve_device('cuda:0') == 'cuda:0'
    with pytest.raises(ValueError, match="use 'auto', 'cpu', 'cuda'"):
        resolve_device('gpu')
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))


def test_the_weights_digest_names_exactly_these_weights():
    model = build_model('resnet18', pretrained=False)
    same = build_model('resnet18', pretrained=False)
    same.load_state_dict(model.state_dict())
    assert weights_digest(model) == weights_digest(same) and len(weights_digest(model)) == 16
    with torch.no_grad():
        next(same.parameters()).view(-1)[0] += 1e-6  # one weight, by a hair
    assert weights_digest(model) != weights_digest(same)


def test_cached_onnx_encoder_exports_once_and_reuses_the_file(tmp_path, images):
    model = build_model('resnet18', pretrained=False)
    first = cached_onnx_encoder(model, 'resnet18', tmp_path, device='cpu')
    (path,) = tmp_path.glob('resnet18-*/model.onnx')
    assert path.parent.name == f'resnet18-{weights_digest(model)}' and first.path == path
    exported_at = path.stat().st_mtime_ns
    again = cached_onnx_encoder(model, 'resnet18', tmp_path, device='cpu')
    assert again.path == path and path.stat().st_mtime_ns == exported_at  # not exported again
    reference = TorchEncoder(model, device='cpu').encode(images)
    assert cosine(again.encode(images), reference).min() > 0.9999
