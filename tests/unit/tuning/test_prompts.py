"""Query/document prompts (design §12): read from a sentence-transformers folder as sentence-transformers reads them,
set at training, applied in training, evaluation, mining, serving and the ONNX export, and saved with the model.
Every path compares the embeddings it gives with those of the prompted text, and with the plain text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from executor.tuning.config import HardNegatives, TrainConfig
from executor.tuning.data import Item
from executor.tuning.data.dataset import ItemDataset
from executor.tuning.evaluation import evaluator_for
from executor.tuning.evaluation.evaluator import ModelEmbedder
from executor.tuning.hard_negatives import mine_hard_negatives
from executor.tuning.inference import TorchEncoder, create_encoder
from executor.tuning.inputs import DOCUMENT, QUERY, TextInputs
from executor.tuning.models import build_model, load_model
from executor.tuning.trainer import fit
from tests.helpers import prompted_folder

E5 = {QUERY: 'query: ', DOCUMENT: 'passage: '}
QUERIES = ['what do cats eat', 'how tall is a giraffe', 'why is the sky blue']
DOCS = [
    'Cats are obligate carnivores and eat mostly meat.',
    'An adult giraffe stands about five metres tall.',
    'Sunlight is scattered by the air, blue light the most.',
    'The violin has four strings tuned in fifths.',
]


@pytest.fixture(scope='module')
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prompted_folder(tmp_path_factory.mktemp('st'), E5)


@pytest.fixture(scope='module')
def model(folder: Path):
    return build_model(str(folder)).eval()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def texts(items: list[str], prefix: str = '') -> list[Item]:
    return [Item(id=f'{prefix}{i}', text=text, name=f'{prefix}text {i}') for i, text in enumerate(items)]


def test_a_folders_prompts_embed_as_sentence_transformers_prompts_do(folder: Path, model):
    assert model.inputs.prompts == E5
    reference = SentenceTransformer(str(folder), device='cpu')
    assert reference.prompts[QUERY] == E5[QUERY]  # the same file read the same way
    encoder = TorchEncoder(model, device='cpu')
    for name in (QUERY, DOCUMENT):
        contents, names = encoder.items(texts(QUERIES), prompt_name=name)
        ours = encoder.encode(contents, names=names)
        theirs = reference.encode(QUERIES, prompt_name=name)
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    plain = encoder.encode(QUERIES)
    np.testing.assert_allclose(plain, reference.encode(QUERIES), atol=1e-5)
    assert cosine(plain, encoder.encode(encoder.items(texts(QUERIES), prompt_name=QUERY)[0])).max() < 0.999


def test_prompt_names_asked_for_are_checked_and_roles_are_lenient(model):
    inputs = model.inputs
    assert inputs.prompt_name(None, QUERY) == QUERY and inputs.prompt_name(DOCUMENT) == DOCUMENT
    with pytest.raises(ValueError, match=r"prompt_name='querry' is not a prompt of this model: its prompts are"):
        inputs.prompt_name('querry')
    plain = build_model('all-MiniLM-L6-v2').inputs  # no prompts: a role asked for changes nothing
    assert plain.prompts == {} and plain.prompt_name(None, QUERY) is None
    assert plain.prompt('a cat', QUERY) == 'a cat' and inputs.prompt('a cat', QUERY) == 'query: a cat'
    with pytest.raises(ValueError, match='it has no prompts'):
        plain.prompt_name(QUERY)


def test_prompts_set_at_training_replace_the_models_and_bad_ones_are_refused(model):
    inputs = model.inputs.with_options(prompts={QUERY: 'Represent this question: '})
    assert inputs.prompts == {QUERY: 'Represent this question: '}
    assert model.inputs.with_options(prompts={}).prompts == {}
    again = TextInputs.from_config(json.loads(json.dumps(inputs.config())))  # as saved, through JSON
    assert again.prompts == inputs.prompts
    for bad, message in (
        ('query: ', 'prompts must be a dict'),
        ({QUERY: 3}, r"prompts\['query'\] must be a string"),
        ({'': 'x'}, 'a prompt name must be a non-empty string'),
        ({QUERY: 'x' * 5000}, 'at most 2000 characters'),
    ):
        with pytest.raises(ValueError, match=message):
            TrainConfig(prompts=bad)
    with pytest.raises(ValueError, match='prompts does not apply to a model that takes image inputs'):
        build_model('efficientnet_lite0', pretrained=False).inputs.with_options(prompts=E5)


def test_training_columns_take_query_and_document_prompts_and_scored_pairs_none(model):
    inputs = model.inputs
    pair = Item(id='p', columns=(QUERIES[0], DOCS[0], DOCS[3]), name='row 1')
    scored = Item(id='s', columns=(QUERIES[0], DOCS[0]), score=0.5, name='row 2')
    dataset = ItemDataset([pair, scored], inputs, lambda sample: sample)
    (anchor, positive, negative), _ = dataset[0]
    assert anchor == inputs.load('query: ' + QUERIES[0], 'x') and positive == inputs.load('passage: ' + DOCS[0], 'x')
    assert negative == inputs.load('passage: ' + DOCS[3], 'x')
    (first, second), score = dataset[1]
    assert first == inputs.load(QUERIES[0], 'x') and second == inputs.load(DOCS[0], 'x') and score == 0.5


class Recording:
    """A real embedder that also records the prompt name of each call."""

    def __init__(self, embedder) -> None:
        self.embedder, self.class_names, self.asked = embedder, None, []

    def embed_items(self, items, prompt_name=None):
        self.asked.append((len(items), prompt_name))
        return self.embedder.embed_items(items, prompt_name)


def test_judged_evaluation_and_mining_embed_queries_and_corpus_behind_their_prompts(model):
    embedder = ModelEmbedder(model, torch.device('cpu'))
    corpus = texts(DOCS, 'd')
    queries = [Item(id=f'q{i}', text=q, relevant={f'd{i}': 1}, name=f'query {i}') for i, q in enumerate(QUERIES)]
    spy = Recording(embedder)
    evaluation = evaluator_for(queries, corpus, limit=10)(spy)
    assert spy.asked == [(3, QUERY), (4, DOCUMENT)]
    by_hand = embedder.embed_items(texts([E5[QUERY] + q for q in QUERIES]))
    np.testing.assert_allclose(evaluation.query_embeddings.numpy(), by_hand.numpy(), atol=1e-6)
    assert cosine(evaluation.query_embeddings, embedder.embed_items(texts(QUERIES))).max() < 0.999
    pairs = [Item(id=f'p{i}', columns=(q, DOCS[i]), name=f'row {i}') for i, q in enumerate(QUERIES)]
    spy = Recording(embedder)
    mine_hard_negatives(pairs, corpus, spy, HardNegatives(num_negatives=1, range_max=3))
    assert spy.asked == [(3, QUERY), (4, DOCUMENT)]
    # unscored pairs evaluated as retrieval: anchors behind the query prompt, the rest behind the document one
    spy = Recording(embedder)
    evaluator_for(pairs, None, limit=3)(spy)
    assert spy.asked == [(3, QUERY), (3, DOCUMENT)]


def test_a_run_with_prompts_saves_them_in_its_model_and_onnx_preprocessing(tmp_path: Path):
    rows = [[q, d] for q, d in zip(QUERIES, DOCS)] * 3
    data = tmp_path / 'pairs.csv'
    data.write_text('anchor,positive\n' + ''.join(f'"{a}","{b}"\n' for a, b in rows))
    prompts = {QUERY: 'Represent this question: ', DOCUMENT: 'Represent this passage: '}
    result = fit(
        model='all-MiniLM-L6-v2',
        train_data=str(data),
        prompts=prompts,
        batch_size=3,
        epochs=1,
        tensorboard=False,
        to_onnx=True,
        output_dir=tmp_path / 'run',
    )
    trained = load_model(result.artifact).eval()
    assert trained.inputs.prompts == prompts
    preprocessing = json.loads((Path(result.artifact).parent / 'preprocessing.json').read_text())
    assert preprocessing['inputs']['prompts'] == prompts
    onnx = create_encoder(Path(result.artifact).parent / 'model.onnx', device='cpu')
    torch_encoder = TorchEncoder(trained, device='cpu')
    for encoder in (onnx, torch_encoder):
        prompted = encoder.encode(encoder.items(texts(QUERIES), prompt_name=QUERY)[0])
        by_hand = encoder.encode([prompts[QUERY] + q for q in QUERIES])
        assert cosine(prompted, by_hand).min() > 0.9999
        assert cosine(prompted, encoder.encode(QUERIES)).max() < 0.999
    assert cosine(onnx.encode(QUERIES), torch_encoder.encode(QUERIES)).min() > 0.9999
