"""Text models on the real offline model (all-MiniLM-L6-v2 from its wheel): embeddings equal sentence-transformers',
the options, save and load, a fine-tune that lowers the loss, ONNX parity, length-sorted batches, bad input named."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from executor.tuning.data import DataError, Item, load_items
from executor.tuning.inference import TorchEncoder, create_encoder
from executor.tuning.inputs import TextInputs
from executor.tuning.models import build_model, load_model, save_model
from executor.tuning.models.families.transformers_models import embedded_folder
from executor.tuning.trainer import fit

SENTENCES = [
    'A man is playing a guitar.',
    'The new movie is awesome and everybody in the cinema loved every single minute of it.',
    'Is it raining?',
    'Two children are running on the beach at sunset while their parents watch.',
    'A cat.',
]


@pytest.fixture(scope='module')
def model():
    return build_model('all-MiniLM-L6-v2').eval()


def embed(model, sentences: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model(model.inputs.batch(sentences))


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, 'w', newline='', encoding='utf-8') as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_the_wheel_model_embeds_as_sentence_transformers_does(model):
    reference = SentenceTransformer(str(embedded_folder()), device='cpu').encode(SENTENCES, convert_to_tensor=True)
    ours = embed(model, SENTENCES)
    assert ours.shape == (5, 384) and model.embed_dim == 384
    assert torch.allclose(ours, reference.cpu(), atol=1e-5)
    assert torch.allclose(ours.norm(dim=1), torch.ones(5), atol=1e-5)  # L2-normalised, as theirs
    # the same names reach the same model; the default is listed beside the image models
    assert model.config['pooler'] == 'mean' and model.inputs.max_seq_length == 256


def test_pooling_sequence_length_freezing_and_projection(model, tmp_path):
    for pooler in ('cls', 'max'):
        other = build_model('sentence-transformers/all-MiniLM-L6-v2', pooler=pooler).eval()
        assert other.config['pooler'] == pooler
        assert not torch.allclose(embed(other, SENTENCES[:2]), embed(model, SENTENCES[:2]), atol=1e-3)
    short = build_model('all-MiniLM-L6-v2').eval()
    short.inputs = short.inputs.with_options(max_seq_length=8)
    assert short.inputs.batch(SENTENCES)['input_ids'].shape == (5, 8)  # cut to 8 tokens, [CLS] and [SEP] included
    frozen = build_model('all-MiniLM-L6-v2', freeze=3)  # the embeddings and the first two layers
    assert not frozen.backbone.module.embeddings.word_embeddings.weight.requires_grad
    assert not frozen.backbone.module.encoder.layer[1].attention.self.query.weight.requires_grad
    assert frozen.backbone.module.encoder.layer[2].attention.self.query.weight.requires_grad
    by_name = build_model('all-MiniLM-L6-v2', freeze=['embeddings', 'encoder.layer.0'])
    assert not by_name.backbone.module.encoder.layer[0].output.dense.weight.requires_grad
    projected = build_model('all-MiniLM-L6-v2', output_dim=64).eval()
    out = embed(projected, SENTENCES)
    assert out.shape == (5, 64) and torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-5)
    save_model(projected, tmp_path / 'model.pt')
    again = load_model(tmp_path / 'model.pt').eval()  # rebuilt from the saved architecture and tokenizer alone
    assert torch.allclose(embed(again, SENTENCES), out, atol=1e-6) and again.inputs.max_seq_length == 256


def test_bad_text_model_options_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"unknown model 'all-MiniLM-L6-v3'; did you mean 'all-MiniLM-L6-v2'"):
        build_model('all-MiniLM-L6-v3')
    with pytest.raises(ValueError, match=r"pooler 'gem' does not apply to 'all-MiniLM-L6-v2' .*mean, cls, max"):
        build_model('all-MiniLM-L6-v2', pooler='gem')
    with pytest.raises(ValueError, match='embedding_layer does not apply to the text model'):
        build_model('all-MiniLM-L6-v2', embedding_layer='encoder.layer.3')
    with pytest.raises(ValueError, match='freeze=9 stages, but the backbone has 7'):
        build_model('all-MiniLM-L6-v2', freeze=9)
    with pytest.raises(ValueError, match="augmentation='light' has no text form"):
        TextInputs.from_config(build_model('all-MiniLM-L6-v2').inputs.config()).train_transform('light')


def test_a_transformers_folder_given_by_path_is_a_model(tmp_path):
    """A plain transformers folder (no sentence-transformers files): mean pooling, the tokenizer's length limit."""
    import shutil

    folder = tmp_path / 'my-bert'
    folder.mkdir()
    for name in ('config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'):
        shutil.copy(embedded_folder() / name, folder / name)
    model = build_model(str(folder)).eval()
    assert model.config['pooler'] == 'mean' and model.inputs.max_seq_length == 512
    reference = build_model('all-MiniLM-L6-v2').eval()
    assert torch.allclose(embed(model, SENTENCES[:2]), embed(reference, SENTENCES[:2]), atol=1e-5)


def test_text_csvs_and_each_bad_row_named_by_file_and_line(tmp_path):
    pairs = load_items(write_csv(tmp_path / 'pairs.csv', ['anchor', 'positive'], [['a b', 'c d'], ['e', 'f']]))
    assert pairs[0].columns == ('a b', 'c d') and pairs[0].score is None and pairs[0].kind == 'text'
    triplets = load_items(write_csv(tmp_path / 't.csv', ['anchor', 'positive', 'negative'], [['a', 'b', 'c']]))
    assert triplets[0].columns == ('a', 'b', 'c')
    scored = load_items(write_csv(tmp_path / 's.csv', ['sentence1', 'sentence2', 'score'], [['a', 'b', '4.5']]))
    assert scored[0].columns == ('a', 'b') and scored[0].score == 4.5
    labelled = load_items(write_csv(tmp_path / 'l.csv', ['text', 'label'], [['a sentence', 'x']]))
    assert labelled[0].text == 'a sentence' and labelled[0].label == 'x'
    bad = {
        'empty.csv': (['anchor', 'positive'], [['a', 'b'], ['c', ' ']], 'empty.csv line 3: empty positive'),
        'noscore.csv': (['sentence1', 'sentence2', 'score'], [['a', 'b', '']], 'noscore.csv line 2: no score'),
        'nan.csv': (['sentence1', 'sentence2', 'score'], [['a', 'b', 'high']], "nan.csv line 2: score 'high', which"),
        'inf.csv': (['sentence1', 'sentence2', 'score'], [['a', 'b', 'inf']], "inf.csv line 2: score 'inf' is not"),
        'text.csv': (['text', 'label'], [['', 'x']], 'text.csv line 2: empty text'),
    }
    for name, (header, rows, message) in bad.items():
        with pytest.raises(DataError, match=message):
            load_items(write_csv(tmp_path / name, header, rows))


def test_batches_pad_to_their_longest_sentence_and_run_longest_first(model):
    inputs = model.inputs
    batch = inputs.batch(['short one', SENTENCES[1]])
    lengths = batch['attention_mask'].sum(dim=1).tolist()
    assert batch['input_ids'].shape[1] == max(lengths) > lengths[0]  # padded to the longest, not to 256
    merged = inputs.concat([inputs.batch(['a']), batch])
    assert merged['input_ids'].shape == (3, max(lengths)) and merged['attention_mask'][0].sum() == 3
    assert [part['input_ids'].shape[1] for part in inputs.split(merged, 1)] == [3, lengths[0], lengths[1]]
    encoder = TorchEncoder(model, device='cpu')
    one_by_one = np.concatenate([encoder.encode([s]) for s in SENTENCES])
    assert np.allclose(encoder.encode(SENTENCES, batch_size=2), one_by_one, atol=1e-5)  # order restored
    with pytest.raises(DataError, match="document 'photo.png' is an image .* but this model embeds text"):
        encoder.items([Item(id='a', text='fine'), Item(id='b', uri='/x/photo.png', name="document 'photo.png'")])
    with pytest.raises(DataError, match='text 0: text is empty'):  # named by its place in the request, not the run's
        encoder.encode(['   ', 'a longer sentence'])


def test_a_one_epoch_fine_tune_on_pairs_lowers_the_loss(tmp_path):
    """Pairs the pre-trained model does not know (a word and an unrelated code word): MNRL is high before, lower
    after one epoch."""
    words = ['apple', 'river', 'engine', 'violin', 'winter', 'pencil', 'castle', 'tiger']
    codes = ['seven', 'blue', 'Tuesday', 'copper', 'north', 'seventy', 'glass', 'orbit']
    rows = [[f'the {w}', f'code {c}'] for w, c in zip(words, codes)] * 2
    data = write_csv(tmp_path / 'pairs.csv', ['anchor', 'positive'], rows)
    common = dict(model='all-MiniLM-L6-v2', train_data=str(data), batch_size=8, tensorboard=False, seed=0)
    result = fit(**common, epochs=1, learning_rate=1e-4, output_dir=tmp_path / 'run')
    from executor.tuning.pair_losses import MultipleNegativesRankingLoss

    loss = MultipleNegativesRankingLoss()
    before = build_model('all-MiniLM-L6-v2').eval()
    after = load_model(result.artifact).eval()
    anchors, positives = [r[0] for r in rows[:8]], [r[1] for r in rows[:8]]
    loss_before = loss([embed(before, anchors), embed(before, positives)]).item()
    loss_after = loss([embed(after, anchors), embed(after, positives)]).item()
    assert np.isfinite(result.history[0]['train_loss'])
    assert loss_after < loss_before * 0.8, (loss_before, loss_after)


def test_onnx_export_has_dynamic_batch_and_sequence_and_matches_torch(model, tmp_path):
    from executor.tuning.export import export_onnx

    report = export_onnx(model, tmp_path / 'model.onnx')
    assert report.min_cosine >= 0.9999 and report.exporter == 'dynamo'
    onnx_encoder = create_encoder(report.path, device='cpu')
    torch_encoder = TorchEncoder(model, device='cpu')
    for sentences, batch_size in ((SENTENCES[:1], 1), (SENTENCES, 2), (SENTENCES * 7, 32)):
        got, want = onnx_encoder.encode(sentences, batch_size), torch_encoder.encode(sentences, batch_size)
        cosine = (got * want).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert got.shape == want.shape and cosine.min() >= 0.9999
    assert [i.name for i in onnx_encoder.session.get_inputs()] == ['input_ids', 'attention_mask']


def test_unlabelled_sentences_train_self_supervised_through_dropout(tmp_path):
    """SimCSE: NTXentLoss on unlabelled sentences, two passes of each through the model's dropout as the pair."""
    records = [{'text': s} for s in SENTENCES * 2]
    result = fit(
        model='all-MiniLM-L6-v2',
        train_data=records,
        loss='NTXentLoss',
        epochs=1,
        batch_size=5,
        tensorboard=False,
        output_dir=tmp_path / 'simcse',
    )
    assert result.history[0]['train_loss'] > 0 and np.isfinite(result.history[0]['train_loss'])
    assert load_model(result.artifact).inputs.kind == 'text'


def test_a_model_in_the_local_hugging_face_cache_is_found_by_name(tmp_path, monkeypatch):
    """A repo already in the HF hub cache (its snapshot folder) is a model name; nothing is downloaded."""
    import shutil

    from executor.tuning.models import list_models, registry
    from executor.tuning.models.families import transformers_models

    snapshot = tmp_path / 'hub' / 'models--acme--tiny-minilm' / 'snapshots' / 'abc123'
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / 'refs').mkdir()
    (snapshot.parents[1] / 'refs' / 'main').write_text('abc123')
    for name in ('config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json', 'modules.json'):
        shutil.copy(embedded_folder() / name, snapshot / name)
    shutil.copytree(embedded_folder() / '1_Pooling', snapshot / '1_Pooling')
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hub'))
    transformers_models.cached_models.cache_clear()
    registry.list_models.cache_clear()
    try:
        assert 'acme/tiny-minilm' in list_models()
        model = build_model('acme/tiny-minilm').eval()
        assert torch.allclose(
            embed(model, SENTENCES[:2]), embed(build_model('all-MiniLM-L6-v2').eval(), SENTENCES[:2]), atol=1e-5
        )
        with pytest.raises(ValueError, match="unknown model 'acme/tiny-minilmm'; did you mean 'acme/tiny-minilm'"):
            build_model('acme/tiny-minilmm')
    finally:
        monkeypatch.delenv('HF_HUB_CACHE')
        transformers_models.cached_models.cache_clear()
        registry.list_models.cache_clear()


@pytest.mark.slow  # two more exports, about a minute
def test_fp16_and_int8_text_exports_keep_their_parity(model, tmp_path, monkeypatch):
    from executor.tuning.export import MIN_COSINE, export_onnx

    (tmp_path / 'cwd').mkdir()
    monkeypatch.chdir(tmp_path / 'cwd')  # onnxruntime's shape inference once left 90 MB files in the working folder

    fp16 = export_onnx(model, tmp_path / 'fp16' / 'model.onnx', fp16=True)
    int8 = export_onnx(model, tmp_path / 'int8' / 'model.onnx', quantize=True)  # dynamic: weights only, ahead
    assert fp16.min_cosine >= MIN_COSINE['fp16'] and int8.min_cosine >= MIN_COSINE['int8']
    # measured on an AVX2 EPYC: 0.988 with every weight matmul in int8, 0.993 with the 6 down-projections in float
    assert int8.float_nodes <= 6
    assert int8.size_bytes < 0.8 * fp16.size_bytes * 2  # smaller than the fp32 graph
    got = create_encoder(int8.path, device='cpu').encode(SENTENCES)
    want = TorchEncoder(model, device='cpu').encode(SENTENCES)
    assert np.min(np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1)) >= MIN_COSINE['int8']
    assert list((tmp_path / 'cwd').iterdir()) == []


def test_labelled_sentences_train_with_a_metric_loss_and_matryoshka(tmp_path):
    topics = {
        'food': ['I love pasta.', 'The soup is hot.', 'Bread and butter.', 'A fresh salad.'],
        'sport': ['He kicked the ball.', 'The match ended 2-1.', 'She runs a marathon.', 'A tennis serve.'],
    }
    rows = [[text, label] for label, texts in topics.items() for text in texts]
    data = write_csv(tmp_path / 'labelled.csv', ['text', 'label'], rows)
    result = fit(
        model='all-MiniLM-L6-v2',
        train_data=str(data),
        eval_data=str(data),
        loss='TripletMarginLoss',
        matryoshka_dims=[384, 64],
        epochs=1,
        batch_size=8,
        num_items_per_class=4,
        tensorboard=False,
        output_dir=tmp_path / 'run',
    )
    logs = result.history[0]
    assert np.isfinite(logs['train_loss']) and 'ndcg@10' in logs and 'ndcg@10_dim64' in logs
    with pytest.raises(ValueError, match=r'matryoshka_dims \[512\] are wider than the model.s 384-dim embedding'):
        fit(
            model='all-MiniLM-L6-v2',
            train_data=str(data),
            matryoshka_dims=[512],
            epochs=1,
            batch_size=8,
            tensorboard=False,
            output_dir=tmp_path / 'wide',
        )
