"""A finished run's ``reports/``: loss and metric curves, the before/after table and bars, and a sprite of matches.

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
        plot_matches(
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


def plot_matches(
    inputs: Any,
    query_items: Sequence[Item],
    index_items: Sequence[Item] | None,
    q_emb: torch.Tensor,
    i_emb: torch.Tensor,
    folder: Path,
    queries: int = 6,
    k: int = 5,
) -> Path | None:
    """``matches.png``: a few queries (one per label, first seen first) and their top ``k`` by the embeddings
    ``q_emb`` ``(Q, D)`` and ``i_emb`` ``(I, D)`` of the items, relevant matches framed green; a query never
    matches itself when queries and index are the same set. Nothing for inputs that have no preview."""
    same = index_items is None
    index_items = query_items if same else index_items
    chosen = list({it.label: row for row, it in enumerate(query_items)}.values())[:queries]
    picked = [query_items[row] for row in chosen]
    if inputs.preview(inputs.content_of(picked[0]), picked[0].name) is None:
        return None
    _, neighbours = knn(q_emb[chosen], i_emb, min(k + same, len(index_items)))  # (len(chosen), k + same)
    matches, relevant = [], []
    for q, (row, query) in enumerate(zip(chosen, picked)):
        ranked = [col for col in neighbours[q].tolist() if not (same and col == row)][:k]
        matches.append([inputs.preview(inputs.content_of(index_items[col]), index_items[col].name) for col in ranked])
        relevant.append([index_items[col].label == query.label for col in ranked])
    shown = [inputs.preview(inputs.content_of(it), it.name) for it in picked]
    return reports.plot_matches(shown, matches, relevant, folder)
