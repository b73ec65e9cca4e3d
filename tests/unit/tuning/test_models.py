"""The model registry: offline ImageNet weights, options, errors, save/load."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torchvision
from skimage import data as skdata

from executor.tuning.errors import DataError
from executor.tuning.inputs.image import eval_transform
from executor.tuning.models import (
    GeM,
    WeightsNotFoundError,
    backbone_stages,
    build_model,
    describe_models,
    family_of,
    is_model_file,
    list_models,
    load_model,
    save_model,
)
from executor.tuning.models.weights import efficientnet_lite0_file, read_state_dict

# ImageNet class indices: 281 tabby, 282 tiger cat, 283 Persian, 284 Siamese, 285 Egyptian cat; 967 espresso.
CAT_CLASSES = {281, 282, 283, 284, 285}
ESPRESSO = 967


@pytest.fixture(scope='module')
def default_model():
    return build_model().eval()


def imagenet_logits(model, image: np.ndarray) -> torch.Tensor:
    """The mapped backbone's embedding times the wheel's own ImageNet classifier."""
    state = read_state_dict(efficientnet_lite0_file())
    x = eval_transform(model.inputs.data_config)(__import__('PIL.Image').Image.fromarray(image)).unsqueeze(0)
    with torch.no_grad():
        return model(x) @ state['_fc.weight'].T + state['_fc.bias']


def test_offline_default_is_the_real_imagenet_model(default_model):
    cat = imagenet_logits(default_model, skdata.chelsea())[0]
    coffee = imagenet_logits(default_model, skdata.coffee())[0]
    assert CAT_CLASSES & set(cat.topk(3).indices.tolist())
    assert coffee.argmax().item() == ESPRESSO
    assert default_model.inputs.data_config['mean'] == (0.5, 0.5, 0.5)
    assert default_model.inputs.data_config['input_size'] == (3, 224, 224)
    assert default_model.embed_dim == 1280


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown model 'resnet5'.*'resnet50'"):
        build_model('resnet5')


def test_pretrained_without_reachable_weights_says_how_to_provide_them():
    with pytest.raises(WeightsNotFoundError, match='weights=/path/to/checkpoint.*pretrained=False'):
        build_model('resnet50')


def test_list_models_has_default_timm_and_torchvision():
    names = list_models()
    assert names[0] == 'efficientnet_lite0'
    assert 'resnet50' in names and 'torchvision/resnet18' in names


def test_weights_from_a_local_torchvision_file(tmp_path):
    source = build_model('torchvision/resnet18', pretrained=False)
    path = tmp_path / 'resnet18.pth'
    torch.save(source.backbone.module.state_dict(), path)
    rebuilt = build_model('torchvision/resnet18', weights=path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), source.eval()(x), atol=1e-6)


def test_weights_for_another_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / 'resnet18.pth'
    torch.save(build_model('resnet18', pretrained=False).backbone.module.state_dict(), path)
    with pytest.raises(ValueError, match='do not fit the model'):
        build_model('resnet34', weights=path)


def test_projection_pooler_and_embedding_layer():
    model = build_model('resnet18', pretrained=False, pooler='gem', output_dim=32).eval()
    assert isinstance(model.pooler, GeM)
    assert model(torch.randn(3, 3, 64, 64)).shape == (3, 32)
    cut = build_model('resnet18', pretrained=False, embedding_layer='layer3').eval()
    assert cut.embed_dim == 256 and cut(torch.randn(1, 3, 64, 64)).shape == (1, 256)
    with pytest.raises(ValueError, match="embedding_layer 'layer9'"):
        build_model('resnet18', pretrained=False, embedding_layer='layer9')


@pytest.mark.parametrize(
    'freeze, frozen_prefix, trainable_prefix',
    [
        (True, 'layer4', None),
        (2, 'layer1.', 'layer2.'),
        (['conv1', 'layer1'], 'layer1.', 'layer2.'),
    ],
)
def test_freeze(freeze, frozen_prefix, trainable_prefix):
    model = build_model('resnet18', pretrained=False, freeze=freeze, output_dim=8)
    params = dict(model.backbone.module.named_parameters())
    assert all(not p.requires_grad for n, p in params.items() if n.startswith(frozen_prefix))
    if trainable_prefix:
        assert all(p.requires_grad for n, p in params.items() if n.startswith(trainable_prefix))
    assert all(p.requires_grad for p in model.projection.parameters())


def test_freeze_errors_name_the_fix():
    with pytest.raises(ValueError, match="layer 'layr1'.*close names"):
        build_model('resnet18', pretrained=False, freeze=['layr1'])
    stages = len(backbone_stages(build_model('resnet18', pretrained=False)))
    with pytest.raises(ValueError, match=f'has {stages}'):
        build_model('resnet18', pretrained=False, freeze=stages + 1)


def test_save_and_load_round_trip_with_preprocessing(tmp_path):
    model = build_model('resnet18', pretrained=False, output_dim=16, class_names=['a', 'b', 'c'])
    model.inputs = model.inputs.with_options(image_size=64)
    path = save_model(model, tmp_path / 'model.pt')
    loaded = load_model(path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
        assert loaded.classify(x).shape == (2, 3)
    assert loaded.inputs.data_config['input_size'] == (3, 64, 64)
    assert loaded.class_names == ['a', 'b', 'c']
    torch.load(path, weights_only=True)  # the artifact needs no pickled code


def test_a_model_file_is_named_by_its_suffix_and_a_missing_one_said_so(tmp_path):
    assert is_model_file('runs/a/model.pt') and is_model_file(tmp_path / 'weights.pth')
    assert not is_model_file('resnet50') and not is_model_file('open_clip/ViT-B-32') and not is_model_file('a.onnx')
    with pytest.raises(DataError, match="model: the model file 'gone.pt' does not exist"):
        family_of(str(tmp_path / 'gone.pt'))


def test_load_model_rejects_foreign_files(tmp_path):
    path = tmp_path / 'other.pt'
    torch.save({'w': torch.zeros(1)}, path)
    with pytest.raises(ValueError, match='not a model artifact'):
        load_model(path)


def test_describe_models_puts_the_models_with_local_weights_first(tmp_path, monkeypatch):
    # a torchvision checkpoint in torch hub's cache makes that model local (only the file's presence is read)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    url = torchvision.models.get_model_weights('resnet18').DEFAULT.url
    (tmp_path / 'hub' / 'checkpoints').mkdir(parents=True)
    (tmp_path / 'hub' / 'checkpoints' / url.rsplit('/', 1)[1]).write_bytes(b'')
    started = time.perf_counter()
    models = describe_models()
    seconds = time.perf_counter() - started
    local = [m for m in models if m.weights_local]
    print(f'describe_models: {len(models)} models in {seconds:.2f} s; local: {[(m.name, m.output_dim) for m in local]}')
    assert seconds < 10 and len(models) == len(list_models()) > 1000
    assert models[: len(local)] == local  # the local ones first
    by_name = {m.name: m for m in models}
    assert (by_name['efficientnet_lite0'].modality, by_name['efficientnet_lite0'].output_dim) == ('image', 1280)
    assert by_name['efficientnet_lite0'].options == {'pooler': 'avg', 'image_size': 224}
    assert (by_name['all-MiniLM-L6-v2'].modality, by_name['all-MiniLM-L6-v2'].output_dim) == ('text', 384)
    assert by_name['all-MiniLM-L6-v2'].options == {'pooler': 'mean', 'max_seq_length': 256}
    assert by_name['torchvision/resnet18'].weights_local and by_name['torchvision/resnet18'].output_dim == 512
    assert {'efficientnet_lite0', 'all-MiniLM-L6-v2', 'torchvision/resnet18'} <= {m.name for m in local}
    # the others are listed without building them: their size is measured when asked for by name
    assert not by_name['resnet50'].weights_local and by_name['resnet50'].output_dim is None
    assert by_name['vit_base_patch16_384'].options['image_size'] == 384  # from timm's pretrained config
    asked = describe_models(['resnet50', 'torchvision/mobilenet_v3_small', 'vit_base_patch16_224'])
    assert [(m.name, m.output_dim) for m in asked] == [
        ('resnet50', 2048),
        ('torchvision/mobilenet_v3_small', build_model('torchvision/mobilenet_v3_small', pretrained=False).embed_dim),
        ('vit_base_patch16_224', 768),
    ]
    assert [m.name for m in describe_models(local_only=True)] == [m.name for m in local]
    with pytest.raises(ValueError, match="unknown model 'resnet5'; did you mean"):
        describe_models(['resnet5'])


def test_describing_models_stops_when_asked_between_two_models():
    """Issue 32: /models kept measuring 2,100 models for minutes after its client had gone."""
    asked = []

    def stopped() -> bool:
        asked.append(1)
        return len(asked) > 1  # after the first model

    with pytest.raises(InterruptedError, match=r'/models stopped after 1 models'):
        describe_models(['resnet18', 'resnet34', 'resnet50'], stopped=stopped)
    assert [m.name for m in describe_models(['resnet18'], stopped=lambda: False)] == ['resnet18']
