"""Evaluation: the exact kNN search (``knn``), the metric formulas (``metrics``), and the one ``Evaluator`` that the
per-epoch callback, the before/after report and ``/evaluate`` all use (``evaluator``)."""

from executor.tuning.evaluation.evaluator import Evaluation, Evaluator, ItemEmbedder, ModelEmbedder
from executor.tuning.evaluation.knn import knn
from executor.tuning.evaluation.metrics import (
    ALIASES,
    DEFAULT_MONITOR,
    METRIC_MODES,
    RETRIEVAL_METRICS,
    classification_metrics,
    knn_accuracy,
    metric_mode,
    ranking_metrics,
    retrieval_metrics,
)
from executor.tuning.evaluation.pairs import MatryoshkaEvaluator, ScoredPairEvaluator, evaluator_for

__all__ = [
    'ALIASES',
    'DEFAULT_MONITOR',
    'METRIC_MODES',
    'RETRIEVAL_METRICS',
    'Evaluation',
    'Evaluator',
    'MatryoshkaEvaluator',
    'ScoredPairEvaluator',
    'ItemEmbedder',
    'ModelEmbedder',
    'classification_metrics',
    'evaluator_for',
    'knn',
    'knn_accuracy',
    'metric_mode',
    'ranking_metrics',
    'retrieval_metrics',
]
