"""A finished run's ``reports/``: loss and metric curves, the before/after table and bars, and example results (a few
queries and their matches: ``examples.json``, and a sprite of them for images).

The final evaluation is the task's ``Evaluator`` once more (the one the per-epoch callback runs); its embeddings
also rank the sprite's matches, so the evaluation data is embedded once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from executor.tuning import artifact, reports
from executor.tuning.callbacks import EvaluationCallback
from executor.tuning.data.sources import Item
from executor.tuning.evaluation import Evaluator, knn
from executor.tuning.files import atomic_write_json

logger = logging.getLogger(__name__)


def write_reports(trainer: Any) -> None:
    """``reports/`` of ``trainer``'s run (after its last epoch, with its final model)."""
    folder = trainer.output_dir / artifact.REPORTS_DIR
    folder.mkdir(exist_ok=True)
    if trainer.history:
        reports.plot_curves(trainer.history, folder)
    callback = next((c for c in trainer.callbacks if isinstance(c, EvaluationCallback)), None)
    if callback is None or trainer.metrics_before is None:
        return
    evaluator = callback.evaluator
    evaluation = evaluator(trainer.embedder(callback.batch_size))
    trainer.metrics_after = evaluation.metrics
    if evaluation.query_embeddings is not None and isinstance(evaluator, Evaluator):  # labelled items' matches
        example_results(
            trainer.model.inputs,
            evaluator.query,
            evaluator.index,
            evaluation.query_embeddings,
            evaluation.index_embeddings,
            folder,
        )
    report = reports.display_metrics(trainer.metrics_before, trainer.metrics_after, folder)
    reports.plot_before_after(trainer.metrics_before, trainer.metrics_after, folder)
    logger.info('retrieval metrics before/after fine-tuning:\n%s', report.text)


def example_results(
    inputs: Any,
    query_items: Sequence[Item],
    index_items: Sequence[Item] | None,
    q_emb: torch.Tensor,
    i_emb: torch.Tensor,
    folder: Path,
    queries: int = 6,
    k: int = 5,
) -> list[dict[str, Any]]:
    """Finetuner's example results: a few queries (one per label, first seen first) and their top ``k`` by the final
    model's embeddings ``q_emb`` ``(Q, D)`` and ``i_emb`` ``(I, D)``, written to ``examples.json`` (each match with its
    score and whether it shares the query's label); a query never matches itself when queries and index are the same
    set. For inputs that have a preview (images), ``matches.png`` shows them, relevant matches framed green."""
    same = index_items is None
    index_items = query_items if same else index_items
    chosen = list({it.label: row for row, it in enumerate(query_items)}.values())[:queries]
    scores, neighbours = knn(q_emb[chosen], i_emb, min(k + same, len(index_items)))  # (len(chosen), k + same)
    examples, ranked_rows = [], []
    for q, row in enumerate(chosen):
        ranked = [(col, score) for col, score in zip(neighbours[q].tolist(), scores[q].tolist())]
        ranked = [(col, score) for col, score in ranked if not (same and col == row)][:k]
        query = query_items[row]
        matches = [
            {**_shown(index_items[col]), 'score': round(score, 6), 'relevant': index_items[col].label == query.label}
            for col, score in ranked
        ]
        examples.append({'query': _shown(query), 'matches': matches})
        ranked_rows.append([col for col, _ in ranked])
    atomic_write_json(folder / reports.EXAMPLES_JSON, examples)
    picked = [query_items[row] for row in chosen]
    if inputs.preview(inputs.content_of(picked[0]), picked[0].name) is not None:
        previews = [
            [inputs.preview(inputs.content_of(index_items[col]), index_items[col].name) for col in r]
            for r in ranked_rows
        ]
        relevant = [[m['relevant'] for m in example['matches']] for example in examples]
        shown = [inputs.preview(inputs.content_of(it), it.name) for it in picked]
        reports.plot_matches(shown, previews, relevant, folder)
    return examples


def _shown(item: Item) -> dict[str, Any]:
    """How an example names an item: its text, else its name (the uri it came with, or its id); its uri; its label."""
    shown: dict[str, Any] = {'text': item.text} if item.text is not None else {'name': item.name}
    if item.uri is not None and not item.uri.startswith('data:'):
        shown['uri'] = item.uri
    return {**shown, 'label': item.label}
