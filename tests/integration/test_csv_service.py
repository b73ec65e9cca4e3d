"""CSV files as csv.writer and pandas write them, sent to a real Deployment of config.yml (the default text model,
all-MiniLM-L6-v2) over HTTP: /evaluate reads every kind it takes, its metrics those of /encode's embeddings of the
rows as written; /train trains on STS-B-like files with and without a header row (issue 29)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from jina import Deployment
from scipy import stats

from executor.client import ServiceError
from tests.csv_kinds import KIND, TRICKY, WRITERS, build
from tests.helpers import http, retrieval_by_hand

ROOT = Path(__file__).resolve().parents[2]
IMAGES = {'model': 'efficientnet_lite0', 'runtime': 'torch'}  # torch: no ONNX export of a second model
SCORED = [(kind, writer) for kind in ('sentence1,sentence2,score', 'headerless scored pairs') for writer in WRITERS]
RETRIEVED = [
    (kind, writer)
    for kind in ('text,label', 'anchor,positive', 'anchor,positive,negative', 'headerless text pairs')
    for writer in WRITERS
]
RETRIEVED += [('uri,label', 'csv.writer'), ('headerless image pairs', 'pandas')]  # one writer each: images are slow


@pytest.fixture(scope='module')
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A data root with a file of each kind by each writer, the first quote past the first 4 KB: {(kind, writer):
    (path, rows)}."""
    root = tmp_path_factory.mktemp('csv-data')
    wanted = [*SCORED, *RETRIEVED, ('headerless image,label', 'pandas')]
    built = {(kind, writer): build(root, KIND[kind], writer) for kind, writer in wanted}
    return root, built


@pytest.fixture(scope='module')
def port(
    files: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory, model_cache: str, free_port: Callable[[], int]
) -> Iterator[int]:
    port = free_port()
    with Deployment(
        uses=str(ROOT / 'config.yml'),
        workspace=str(tmp_path_factory.mktemp('ws')),
        protocol='http',
        host='127.0.0.1',
        port=port,
        uses_with={'data_roots': [str(files[0])], 'model': 'all-MiniLM-L6-v2', 'model_cache': model_cache},
    ):
        yield port


def embed(port: int, values: list, parameters: dict | None = None) -> np.ndarray:
    """/encode's embeddings of sentences, or of images by their paths under the data root (with ``IMAGES``)."""
    docs = [{'uri': v} if parameters else {'text': v} for v in values]
    return np.array([d['embedding'] for d in http(port, '/encode', docs, parameters)])


def evaluate(port: int, path: Path, **parameters) -> dict[str, float]:
    (result,) = http(port, '/evaluate', [], {'data': path.name, **parameters})
    return result['metrics']


@pytest.mark.parametrize(('kind', 'writer'), SCORED)
def test_evaluate_reads_the_sts_b_line_with_its_quotes(port: int, files, kind: str, writer: str):
    """spearman_cosine of the rows as written (STS-B's line 650 among them), from /encode's embeddings."""
    path, rows = files[1][(kind, writer)]
    assert (TRICKY[0], TRICKY[1], '4.0') in rows
    first, second = embed(port, [r[0] for r in rows]), embed(port, [r[1] for r in rows])
    cosine = np.sum(first * second, axis=1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1))
    by_hand = stats.spearmanr(cosine, [float(r[2]) for r in rows]).statistic
    assert evaluate(port, path)['spearman_cosine'] == pytest.approx(by_hand, abs=1e-4)


@pytest.mark.parametrize(('kind', 'writer'), RETRIEVED)
def test_evaluate_reads_labelled_items_pairs_and_triplets(port: int, files, kind: str, writer: str):
    """Retrieval metrics of the rows as written (labels and file names with commas and quotes, sentences with
    newlines), from /encode's embeddings: labelled items search each other; each anchor searches the positives (and
    negatives), its own positive the relevant one."""
    path, rows = files[1][(kind, writer)]
    parameters = IMAGES if 'image' in KIND[kind].columns else None
    if KIND[kind].columns[1] == 'text':  # pairs and triplets
        index = [r[1] for r in rows] + [r[2] for r in rows if len(r) > 2]
        labels = [str(i) for i in range(len(rows))] + [f'negative {i}' for i in range(len(index) - len(rows))]
        queries = embed(port, [r[0] for r in rows])
        by_hand = retrieval_by_hand(queries, labels[: len(rows)], embed(port, index), labels)
    else:  # labelled items, an image pair's two images one class
        items = KIND[kind].expected(rows)
        values = [uri or text for uri, text, _ in items]
        by_hand = retrieval_by_hand(embed(port, values, parameters), [label for *_, label in items])
    metrics = evaluate(port, path, limit=10, **(parameters or {}))
    assert metrics == pytest.approx({**metrics, **by_hand}, abs=1e-4)


def test_an_image_beside_a_word_without_a_header_names_both_fixes(port: int, files):
    """Refused as Finetuner's default is_labeled=False reads it; read as labelled images with the option it names."""
    path, rows = files[1][('headerless image,label', 'pandas')]
    with pytest.raises(ServiceError, match=rf"{path.name} line 1: .*csv_options=\{{'is_labeled': True\}}; .*image,cap"):
        evaluate(port, path, **IMAGES)
    items = KIND['headerless image,label'].expected(rows)
    by_hand = retrieval_by_hand(embed(port, [uri for uri, *_ in items], IMAGES), [label for *_, label in items])
    metrics = evaluate(port, path, limit=10, csv_options={'is_labeled': True}, **IMAGES)
    assert metrics == pytest.approx({**metrics, **by_hand}, abs=1e-4)


def test_train_on_sts_b_files_with_and_without_a_header(port: int, files):
    """One tiny run (1 epoch): a csv.writer file with a header row to train on, a headerless pandas file to evaluate
    on, both holding STS-B's line 650."""
    train, rows = files[1][('sentence1,sentence2,score', 'csv.writer')]
    (info,) = http(
        port,
        '/train',
        [],
        {
            'train_data': train.name,
            'eval_data': files[1][('headerless scored pairs', 'pandas')][0].name,
            'epochs': 1,
            'batch_size': 16,
            'wait': True,
        },
    )
    assert info['status'] == 'FINISHED', info['error']
    assert info['total_steps'] == len(rows) // 16 and 'spearman_cosine' in info['metrics']  # a short last batch dropped
