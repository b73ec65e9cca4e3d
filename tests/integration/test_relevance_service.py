"""Search fine-tuning on relevance judgements through the service: a real Deployment of config.yml serving
all-MiniLM-L6-v2; /evaluate on a BEIR folder over HTTP (plain JSON) and on judged documents over gRPC; a run trained
on the BEIR folder with hard negatives, evaluated on it each epoch; a model folder's query/document prompts on
/encode, /index and /search; bad relevance input named."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from docarray import DocList
from docarray.documents import TextDoc
from jina import Deployment

from executor.client import FinetunerClient, ServiceError
from executor.docs import FinetunerDoc
from executor.tuning.inference import TorchEncoder
from executor.tuning.models import build_model
from tests.helpers import http, prompted_folder, write_beir

ROOT = Path(__file__).resolve().parents[2]
DOCS = {
    'd0': ('Ant colonies', 'Ants live in colonies ruled by a single egg-laying queen.'),
    'd1': ('Foraging', 'Worker ants forage for food and defend the nest.'),
    'd2': ('Honey', 'Honey bees store nectar in wax combs as honey.'),
    'd3': ('Swarming', 'A bee colony swarms when a new queen is raised.'),
    'd4': ('Eruptions', 'The volcano erupted, covering the town in ash.'),
    'd5': ('Basalt', 'Lava flows cooled into black basalt fields.'),
    'd6': ('Rates', 'The central bank raised interest rates again.'),
    'd7': ('Prices', 'Inflation fell as energy prices dropped.'),
    'd8': ('Football', 'The striker scored twice in the final minutes.'),
    'd9': ('Penalties', 'The goalkeeper saved a penalty in extra time.'),
}
QUERIES = {
    'q0': 'who rules an ant colony?',
    'q1': 'how do bees make honey?',
    'q2': 'what happens when a volcano erupts?',
    'q3': 'why did interest rates change?',
    'q4': 'who won the football match?',
    'q5': 'what do worker ants do?',
    'q6': 'why do bees swarm?',
    'q7': 'what is basalt made of?',
}
TRAIN = [('q0', 'd0', 1), ('q1', 'd2', 1), ('q2', 'd4', 1), ('q3', 'd6', 1), ('q4', 'd8', 1), ('q4', 'd9', 1)]
TEST = [('q5', 'd1', 2), ('q6', 'd3', 1), ('q7', 'd5', 1), ('q7', 'd4', 0)]
PROMPTS = {'query': 'query: ', 'document': 'passage: '}


@pytest.fixture(scope='module')
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp('relevance-data')
    corpus = [{'_id': d, 'title': title, 'text': text} for d, (title, text) in DOCS.items()]
    queries = [{'_id': q, 'text': text} for q, text in QUERIES.items()]
    write_beir(root / 'beir', corpus, queries, TRAIN, split='train')
    write_beir(root / 'beir', corpus, queries, TEST, split='test')
    prompted_folder(root, PROMPTS)  # root/minilm-prompts: the default model with e5's prompts
    return root


@pytest.fixture(scope='module')
def served(
    data_root: Path, tmp_path_factory: pytest.TempPathFactory, model_cache: str, free_port: Callable[[], int]
) -> Iterator[tuple[int, int, Path]]:
    ports, workspace = [free_port(), free_port()], tmp_path_factory.mktemp('ws')
    with Deployment(
        uses=str(ROOT / 'config.yml'),
        workspace=str(workspace),
        protocol=['grpc', 'http'],
        host='127.0.0.1',
        port=ports,
        uses_with={'data_roots': [str(data_root)], 'model': 'all-MiniLM-L6-v2', 'model_cache': model_cache},
    ):
        yield ports[0], ports[1], workspace


def test_evaluate_a_beir_folder_over_http(served):
    _, http_port, _ = served
    (result,) = http(http_port, '/evaluate', [], {'data': 'beir'})  # split: 'test' by default
    metrics = result['metrics']
    for name in ('ndcg@10', 'mrr@10', 'map@100', 'recall@10', 'recall@100', 'precision@10'):
        assert 0 <= metrics[name] <= 1, name
    assert metrics['queries_judged'] == 3 and metrics['queries_unjudged'] == 5  # the other queries of the file
    assert metrics['recall@100'] == 1.0  # 10 documents: every relevant one is within the first 100
    (train,) = http(http_port, '/evaluate', [], {'data': 'beir', 'split': 'train'})
    assert train['metrics']['queries_judged'] == 5


def test_evaluate_judged_documents_over_grpc(served):
    grpc_port, http_port, _ = served
    docs = [FinetunerDoc(id=d, text=f'{title} {text}') for d, (title, text) in DOCS.items()]
    docs += [FinetunerDoc(id='q5', text=QUERIES['q5'], relevant_ids=['d1'])]
    docs += [FinetunerDoc(id='q7', text=QUERIES['q7'], tags={'relevant_ids': {'d5': 1, 'd4': 0}})]
    metrics = FinetunerClient(f'grpc://127.0.0.1:{grpc_port}').evaluate(DocList[FinetunerDoc](docs))
    assert metrics['queries_judged'] == 2
    plain = [{'id': d, 'text': f'{t} {x}'} for d, (t, x) in DOCS.items()] + [
        {'id': 'q5', 'text': QUERIES['q5'], 'relevant_ids': ['d1']},
        {'id': 'q7', 'text': QUERIES['q7'], 'tags': {'relevant_ids': {'d5': 1, 'd4': 0}}},
    ]
    (result,) = http(http_port, '/evaluate', plain)
    assert result['metrics']['ndcg@10'] == pytest.approx(metrics['ndcg@10'], abs=1e-6)


def test_a_run_trains_on_judgements_with_hard_negatives(served):
    grpc_port, _, workspace = served
    client = FinetunerClient(f'grpc://127.0.0.1:{grpc_port}')
    run = client.fit(
        train_data='beir',
        eval_data='beir',
        hard_negatives={'num_negatives': 1, 'range_max': 8},
        epochs=1,
        batch_size=4,
        wait=True,
    )
    info = run.info()
    assert info.status == 'FINISHED', info.error
    folder = next(workspace.rglob(f'{run.name}/hard_negatives.jsonl')).parent
    rows = [json.loads(line)['columns'] for line in (folder / 'hard_negatives.jsonl').read_text().splitlines()]
    assert len(rows) == 6 and all(len(r) == 3 for r in rows)
    judged = {(QUERIES[q], ' '.join(DOCS[d])) for q, d, _ in TRAIN}
    assert not any((query, negative) in judged for query, _, negative in rows)  # never a judged positive
    history = [json.loads(line) for line in (folder / 'history.jsonl').read_text().splitlines()]
    assert 'ndcg@10' in history[-1] and history[-1]['queries_judged'] == 3


@pytest.mark.parametrize(
    'parameters, message',
    [
        (
            {'data': 'beir', 'split': 'dev'},
            r"beir/qrels has no dev\.tsv \(split='dev'\); its splits: \['test', 'train'\]",
        ),
        ({'data': 'beir', 'split': '../x'}, r"parameter 'split': String should match pattern"),
    ],
)
def test_bad_relevance_input_is_named(served, parameters, message):
    _, http_port, _ = served
    with pytest.raises(ServiceError, match=r'^(400|422): .*' + message):
        http(http_port, '/evaluate', [], parameters)


def test_a_misspelt_mining_option_is_refused(served):
    grpc_port, _, _ = served
    with pytest.raises(ServiceError, match=r'hard_negatives.*num_negative'):
        FinetunerClient(f'grpc://127.0.0.1:{grpc_port}').fit(train_data='beir', hard_negatives={'num_negative': 2})


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_a_models_prompts_reach_encode_index_and_search(served, data_root: Path):
    """/search puts the query prompt before each text, /index the document prompt, /encode none unless asked; the
    embeddings equal those of the prompted texts, and differ from the plain ones."""
    grpc_port, http_port, _ = served
    folder = str(data_root / 'minilm-prompts')
    reference = TorchEncoder(build_model(folder), device='cpu')
    texts = [QUERIES['q0'], QUERIES['q1'], DOCS['d2'][1]]
    plain, query, document = (reference.encode([p + t for t in texts]) for p in ('', 'query: ', 'passage: '))
    sent = [{'text': t} for t in texts]  # plain JSON, no ids

    def served_embeddings(endpoint: str, **parameters) -> np.ndarray:
        docs = http(http_port, endpoint, sent, {'model': folder, **parameters})
        return np.array([d['embedding'] for d in docs])

    for endpoint, parameters, want in (
        ('/encode', {}, plain),
        ('/encode', {'prompt_name': 'query'}, query),
        ('/search', {}, query),
        ('/index', {}, document),
        ('/search', {'prompt_name': 'document'}, document),
    ):
        got = served_embeddings(endpoint, **parameters)
        assert cosines(got, want).min() > 0.9999, (endpoint, parameters)
        assert cosines(got, plain if want is not plain else query).max() < 0.999, (endpoint, parameters)
    client = FinetunerClient(f'grpc://127.0.0.1:{grpc_port}')
    docs = client.encode(DocList[TextDoc]([TextDoc(text=t) for t in texts]), model=folder, prompt_name='document')
    assert cosines(np.array([d.embedding for d in docs]), document).min() > 0.9999
    with pytest.raises(ServiceError, match=r'^400: .*prompt_name=\W*querry\W* is not a prompt of this model'):
        http(http_port, '/encode', sent, {'model': folder, 'prompt_name': 'querry'})
    # the served model has no prompts: /search embeds the plain text, and a prompt asked for is refused
    default = np.array([d['embedding'] for d in http(http_port, '/search', sent)])
    assert cosines(default, TorchEncoder(build_model('all-MiniLM-L6-v2'), device='cpu').encode(texts)).min() > 0.9999
    with pytest.raises(
        ServiceError, match=r'^400: .*prompt_name=\W*query\W* is not a prompt of this model: it has no prompts'
    ):
        http(http_port, '/search', sent, {'prompt_name': 'query'})
