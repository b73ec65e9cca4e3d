"""Two-tower (text-to-image) models from the offline towers (efficientnet_lite0 and all-MiniLM-L6-v2 from their
wheels): routing by content, CLIPLoss against a plain loop, a short run on captioned digits, both towers' ONNX
parity, save and load, and bad captioned data named."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from executor.tuning.config import TrainConfig
from executor.tuning.data import DataError, load_items
from executor.tuning.data.sources import from_records
from executor.tuning.evaluation import evaluator_for
from executor.tuning.inference import TwoTowerEncoder, create_encoder
from executor.tuning.inputs import Captioned, Text, sample_photos
from executor.tuning.models import TwoTowerModel, build_two_tower, load_model, save_model
from executor.tuning.pair_losses import CLIPLoss
from executor.tuning.plan import plan_run
from executor.tuning.trainer import Trainer
from tests.helpers import captioned_digits, write_csv


@pytest.fixture(scope='module')
def model() -> TwoTowerModel:
    torch.manual_seed(0)
    return build_two_tower('efficientnet_lite0', 'all-MiniLM-L6-v2', output_dim=64).eval()


@pytest.fixture(scope='module')
def digits_csvs(tmp_path_factory) -> dict[str, Path]:
    """Captioned digits: 60 to train, the next 40 to search, one caption per digit as the queries."""
    return captioned_digits(tmp_path_factory.mktemp('captioned-digits'))


def test_one_batch_routes_each_item_to_its_tower(model):
    photos = sample_photos()[:2]
    sentences = ['a rocket on its launch pad', 'two cats on a sofa']
    mixed = [photos[0], Text(sentences[0]), Text(sentences[1]), photos[1]]
    with torch.no_grad():
        got = model(model.inputs.batch(mixed))
        images = model.image(model.image.inputs.batch(photos))
        texts = model.text(model.text.inputs.batch(sentences))
    assert got.shape == (4, 64)
    torch.testing.assert_close(got[[0, 3]], images, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[[1, 2]], texts, atol=1e-5, rtol=0)
    # the serving encoder routes the same way, in the items' order
    encoder = create_encoder(model, 'torch', device='cpu')
    assert isinstance(encoder, TwoTowerEncoder)
    np.testing.assert_allclose(encoder.encode(mixed), got.numpy(), atol=1e-5)
    assert np.allclose(np.linalg.norm(encoder.encode(mixed), axis=1), 1, atol=1e-5)  # one unit sphere for both


def plain_clip_loss(images, texts, scale, groups):
    """CLIP's loss written as loops: per row, -log softmax of its own pair among the other image's pairs."""
    n = len(images)
    images = [v / v.norm() for v in images]
    texts = [v / v.norm() for v in texts]
    total = 0.0
    for i in range(n):
        for side in ('image', 'text'):
            logits = []
            for j in range(n):
                if j != i and groups[j] == groups[i]:
                    continue  # another caption of the same image is no negative
                a, b = (images[i], texts[j]) if side == 'image' else (texts[i], images[j])
                logits.append((float(scale * (a @ b)), j == i))
            positive = next(value for value, own in logits if own)
            total += -(positive - math.log(sum(math.exp(value) for value, _ in logits)))
    return total / (2 * n)


def test_clip_loss_equals_a_plain_loop_and_masks_captions_of_one_image():
    torch.manual_seed(1)
    images, texts = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    groups = torch.tensor([0, 1, 1, 2, 3, 3])  # rows 1-2 and 4-5 are captions of one image each
    scale = torch.tensor(14.3)
    loss = CLIPLoss()(images, texts, scale, groups)
    assert loss.item() == pytest.approx(plain_clip_loss(images.detach(), texts.detach(), 14.3, groups.tolist()), 1e-5)
    unmasked = CLIPLoss()(images, texts, scale)
    assert unmasked.item() == pytest.approx(plain_clip_loss(images.detach(), texts.detach(), 14.3, range(6)), 1e-5)
    loss.backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match='one shape'):
        CLIPLoss()(images, texts[:3], scale)


def test_a_short_run_lowers_the_loss_and_raises_text_to_image_recall(digits_csvs, tmp_path):
    trainer = Trainer(
        TrainConfig(
            model='efficientnet_lite0',
            text_model='all-MiniLM-L6-v2',
            text_freeze=True,  # the text tower locked: the image tower and both projections learn
            train_data=str(digits_csvs['train']),
            query_data=str(digits_csvs['query']),
            index_data=str(digits_csvs['index']),
            image_size=32,
            batch_size=20,
            epochs=2,
            output_dir=str(tmp_path / 'run'),
        )
    )
    # image -> text: the two evaluation sets swapped (each of the 40 digits searches the ten captions, one of which
    # is its own), before training (the pre-trained towers, new projections; the encoder copies the model) and after
    images, captions = load_items(str(digits_csvs['index'])), load_items(str(digits_csvs['query']))
    image_to_text = evaluator_for(images, captions, 10, None)
    untrained = image_to_text(create_encoder(trainer.model, 'torch', device='cpu').embedder()).metrics
    result = trainer.fit()
    losses = [row['train_loss'] for row in result.history]
    assert losses[-1] < losses[0]
    # text -> image, by the run's own evaluation: measured mrr@10 0.13 -> 0.93, recall@10 0.16 -> 0.86
    before, after = result.metrics_before, result.metrics_after
    assert after['recall@10'] > before['recall@10'] + 0.3 and after['mrr@10'] > before['mrr@10'] + 0.3, (before, after)
    loaded = load_model(result.artifact)
    assert isinstance(loaded, TwoTowerModel) and loaded.inputs.image.config() == result.model.inputs.image.config()
    assert (tmp_path / 'run' / 'reports' / 'matches.png').is_file()  # captions and the digits they found
    trained = image_to_text(create_encoder(result.artifact, 'torch', device='cpu').embedder()).metrics
    # chance with one right caption among ten: hit@1 = 1/10, mrr@10 = (1 + 1/2 + ... + 1/10) / 10 = 0.29; measured
    # hit@1 0.0 -> 0.65 and mrr@10 0.23 -> 0.76: the trained model must beat both chance and the untrained one by 0.3
    # (hit@1) and 0.2 (mrr@10)
    chance_hit, chance_mrr = 1 / len(captions), sum(1 / r for r in range(1, len(captions) + 1)) / len(captions)
    assert trained['hit@1'] > max(chance_hit, untrained['hit@1']) + 0.3, (untrained, trained)
    assert trained['mrr@10'] > max(chance_mrr, untrained['mrr@10']) + 0.2, (untrained, trained)


def test_documents_that_pair_an_image_with_a_text_train_a_two_tower_model(digits_csvs):
    folder = digits_csvs['train'].parent
    records = [{'id': f'd{i}', 'uri': str(folder / f'digit-{i}.png'), 'text': f'digit {i % 3}'} for i in range(6)]
    config = TrainConfig(model='efficientnet_lite0', text_model='all-MiniLM-L6-v2', train_data=from_records(records))
    plan = plan_run(config, decode=True)
    items, task = plan.items, plan.task
    assert type(task).__name__ == 'TextToImage' and [it.label for it in items] == [r['uri'] for r in records]
    assert isinstance(create_encoder(build_two_tower(output_dim=8), 'torch').inputs.content_of(items[0]), Captioned)


def test_both_towers_export_with_parity_and_serve_on_onnxruntime(model, tmp_path):
    from executor.tuning.export import export_onnx, export_towers

    reports = export_towers(model, tmp_path)
    assert set(reports) == {'clip-vision', 'clip-text'}
    assert all(r.min_cosine >= 0.9999 and r.path.is_file() for r in reports.values())
    assert reports['clip-text'].path == tmp_path / 'clip-text' / 'model.onnx'
    save_model(model, tmp_path / 'model.pt')
    onnx = create_encoder(tmp_path / 'model.pt', 'onnx', device='cpu')  # the run's tower files, not a new export
    assert {e.runtime for e in onnx.towers.values()} == {'onnx'}
    items = [sample_photos()[2], Text('a ship at sea'), Text('a cup of coffee')]
    reference = create_encoder(model, 'torch', device='cpu').encode(items)
    got = onnx.encode(items)
    assert np.min(np.sum(got * reference, axis=1)) >= 0.9999
    assert onnx.tower('clip-text').encode(['a ship at sea']).shape == (1, 64)
    with pytest.raises(ValueError, match='export_towers'):
        export_onnx(model, tmp_path / 'both.onnx')


def test_saved_model_keeps_both_towers_and_the_temperature(model, tmp_path):
    model.logit_scale.data.fill_(3.0)
    path = save_model(model, tmp_path / 'model.pt')
    loaded = load_model(path).eval()
    items = [sample_photos()[0], Text('a grey cat')]
    with torch.no_grad():
        torch.testing.assert_close(loaded(loaded.inputs.batch(items)), model(model.inputs.batch(items)))
    assert loaded.logit_scale.item() == pytest.approx(3.0)
    assert loaded.config['text_model'] == 'all-MiniLM-L6-v2'
    # a tower of the saved model starts a new two-tower model (here the text tower, beside a fresh image tower)
    again = build_two_tower('efficientnet_lite0', str(path), output_dim=64).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            again.text(again.text.inputs.batch(['a grey cat'])), model.text(model.text.inputs.batch(['a grey cat']))
        )


def test_bad_captioned_data_is_named(digits_csvs, tmp_path):
    root = digits_csvs['train'].parent
    empty = write_csv(
        root / 'empty-caption.csv', ['image', 'caption'], [('digit-0.png', 'a zero'), ('digit-1.png', '')]
    )
    with pytest.raises(DataError, match=r'empty-caption.csv line 3: empty caption'):
        load_items(str(empty))
    missing = write_csv(root / 'missing.csv', ['image', 'caption'], [('digit-0.png', 'a'), ('nowhere.png', 'b')])
    config = TrainConfig(model='efficientnet_lite0', text_model='all-MiniLM-L6-v2', train_data=str(missing))
    with pytest.raises(DataError, match=r'missing.csv line 3'):
        plan_run(config, decode=True)
    corrupt = root / 'corrupt.png'
    corrupt.write_bytes(b'not a png')
    unreadable = write_csv(root / 'corrupt.csv', ['image', 'caption'], [('digit-0.png', 'a'), ('corrupt.png', 'b')])
    with pytest.raises(DataError, match=r'corrupt.csv line 3'):
        plan_run(config.model_copy(update={'train_data': str(unreadable)}), decode=True)
    single = write_csv(root / 'single.csv', ['uri', 'label'], [('digit-0.png', 'zero'), ('digit-1.png', 'one')])
    with pytest.raises(DataError, match=r'single.csv line 2 is not a captioned image'):
        plan_run(config.model_copy(update={'train_data': str(single)}))
    with pytest.raises(ValueError, match='set text_model'):
        TrainConfig(loss='CLIPLoss', train_data=str(single))
    with pytest.raises(ValueError, match='text_freeze applies'):
        TrainConfig(text_freeze=True)
    with pytest.raises(ValueError, match='not a text model'):
        build_two_tower('efficientnet_lite0', 'efficientnet_lite0')
    # a captioned pair is the content of training; served, each half goes on its own
    encoder = create_encoder(build_two_tower(output_dim=8), 'torch', device='cpu')
    items = load_items(str(digits_csvs['train']))[:1]
    with pytest.raises(ValueError, match='holds both an image and a text'):
        encoder.items(items)
    assert isinstance(encoder.inputs.content_of(items[0]), Captioned)


TINY_CLIP = {  # an open_clip CLIP small enough for a test: 64-wide towers of 2 layers, CLIP's vocabulary
    'embed_dim': 32,
    'vision_cfg': {'image_size': 64, 'layers': 2, 'width': 64, 'head_width': 32, 'patch_size': 16},
    'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 64, 'heads': 2, 'layers': 2},
}


def test_an_open_clip_model_takes_both_towers_from_a_local_weights_file(tmp_path):
    import json

    import open_clip

    from executor.tuning.models.weights import WeightsNotFoundError

    (tmp_path / 'tiny-clip.json').write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / 'tiny-clip.json')
    torch.manual_seed(0)
    reference = open_clip.create_model('tiny-clip').eval()
    reference.logit_scale.data.fill_(3.5)
    torch.save(reference.state_dict(), tmp_path / 'open_clip_pytorch_model.bin')
    model = build_two_tower('open_clip/tiny-clip', weights=str(tmp_path / 'open_clip_pytorch_model.bin')).eval()
    assert model.embed_dim == 32 and model.logit_scale.item() == pytest.approx(3.5)  # CLIP's own size, temperature
    sentences = ['a photo of a cat', "two dogs running on the beach, it's sunset!"]
    tokens = open_clip.get_tokenizer('tiny-clip')(sentences)
    ours = model.text.inputs.batch(sentences)['input_ids']  # padded to the longest sentence, not to 77
    assert ours.shape[1] < 77 and torch.equal(ours, tokens[:, : ours.shape[1]])
    _, _, preprocess = open_clip.create_model_and_transforms('tiny-clip')
    photos = [Image.fromarray(p) for p in sample_photos()[:3]]
    with torch.no_grad():
        want_text = torch.nn.functional.normalize(reference.encode_text(tokens), dim=-1)
        want_image = torch.nn.functional.normalize(
            reference.encode_image(torch.stack([preprocess(p) for p in photos])), dim=-1
        )
        torch.testing.assert_close(model.text(model.text.inputs.batch(sentences)), want_text, atol=1e-5, rtol=0)
        # resized by PIL here, by torchvision's transforms in open_clip: measured 2e-5 apart
        torch.testing.assert_close(model.image(model.image.inputs.batch(photos)), want_image, atol=1e-4, rtol=0)
    loaded = load_model(save_model(model, tmp_path / 'model.pt')).eval()
    items = [Text(sentences[0]), photos[0]]
    with torch.no_grad():
        torch.testing.assert_close(loaded(loaded.inputs.batch(items)), model(model.inputs.batch(items)))
    with pytest.raises(WeightsNotFoundError, match="pass weights='/path/to/open_clip_pytorch_model.bin'"):
        build_two_tower('open_clip/tiny-clip')
    with pytest.raises(ValueError, match='brings its own text tower'):
        build_two_tower('open_clip/tiny-clip', 'all-MiniLM-L6-v2', pretrained=False)
