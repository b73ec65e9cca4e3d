"""The one evaluation path: a query set, an index set (or the queries searched among themselves) and ``limit`` ->
a metrics dict, plus accuracy for a classifier.

The per-epoch callback, the before/after report of a run and the service's ``/evaluate`` all call an ``Evaluator``.
What it evaluates is an ``Embedder``: the model being trained (``ModelEmbedder``) or a serving encoder (torch or
onnxruntime), each of which embeds items, and classifies them when the model has a classifier head.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from executor.tuning.data.sources import Item
from executor.tuning.devices import to_device
from executor.tuning.errors import DataError
from executor.tuning.evaluation.metrics import classification_metrics, retrieval_metrics

logger = logging.getLogger(__name__)


class Embedder(Protocol):
    class_names: list[str] | None

    def embed_items(self, items: Sequence[Item], prompt_name: str | None = None) -> np.ndarray | torch.Tensor:
        """``(N, D)`` embeddings of the items, behind the model's prompt ``prompt_name`` where it has one."""

    def classify_items(self, items: Sequence[Item]) -> np.ndarray | torch.Tensor:
        """``(N, C)`` logits, in the order of ``class_names``."""


@dataclass
class Evaluation:
    """Metrics, and what they came from: the embeddings (``None`` where not computed) and the confusion matrix."""

    metrics: dict[str, float]
    query_embeddings: np.ndarray | torch.Tensor | None = None
    index_embeddings: np.ndarray | torch.Tensor | None = None
    confusion: np.ndarray | None = None


class Evaluator:
    """Evaluates an ``Embedder`` on labelled items; relevant means "same label".

    ``retrieval``: the retrieval metrics of the queries searched in the index (or, without an index, among
    themselves, a query never matching itself). ``accuracy``: for a classifier with no index, the accuracy (and per
    class) of its predictions on the queries whose labels it was trained on.
    """

    def __init__(
        self,
        query: Sequence[Item],
        index: Sequence[Item] | None = None,
        limit: int = 20,
        retrieval: bool = True,
        accuracy: bool = True,
        prompts: tuple[str | None, str | None] = (None, None),
    ) -> None:
        for item in [*query, *(index or [])]:
            if item.label is None:
                raise DataError(
                    f'{item.name} has no label: evaluation needs a label on every item (relevant means same label)'
                )
        self.query, self.index = list(query), None if index is None else list(index)
        self.limit, self.retrieval, self.accuracy = limit, retrieval, accuracy
        self.prompts = prompts  # the prompt names of the queries and the index (the model's prompts, if it has them)

    def __call__(self, embedder: Embedder) -> Evaluation:
        result = Evaluation({})
        if self.retrieval:
            result = self.retrieve(embedder)
        if self.accuracy and self.index is None and embedder.class_names:
            known = [it for it in self.query if it.label in embedder.class_names]
            if len(known) < len(self.query):
                logger.warning(
                    '%d evaluation items have labels the classifier was not trained on; skipped',
                    len(self.query) - len(known),
                )
            if known:
                logits = embedder.classify_items(known)  # (N, C)
                metrics, result.confusion = classification_metrics(
                    logits, [it.label for it in known], embedder.class_names
                )
                result.metrics.update(metrics)
        return result

    def retrieve(self, embedder: Embedder) -> Evaluation:
        query_emb = embedder.embed_items(self.query, self.prompts[0])  # (Q, D)
        labels = [it.label for it in self.query]
        if self.index is None:
            return Evaluation(retrieval_metrics(query_emb, labels, limit=self.limit), query_emb, query_emb)
        index_emb = embedder.embed_items(self.index, self.prompts[1])  # (I, D)
        metrics = retrieval_metrics(query_emb, labels, index_emb, [it.label for it in self.index], limit=self.limit)
        return Evaluation(metrics, query_emb, index_emb)


class ItemEmbedder:
    """Embeds and classifies items with a serving encoder (``inference.Encoder`` or a two-tower one): the ``Embedder``
    protocol of the evaluators."""

    def __init__(self, encoder: Any, batch_size: int) -> None:
        self.encoder, self.batch_size = encoder, batch_size
        self.class_names = encoder.class_names

    def embed_items(self, items: Sequence[Item], prompt_name: str | None = None) -> np.ndarray:  # -> (N, D)
        contents, names = self.encoder.items(items, prompt_name=prompt_name)
        return self.encoder.encode(contents, self.batch_size, names)

    def classify_items(self, items: Sequence[Item]) -> np.ndarray:  # -> (N, C)
        contents, names = self.encoder.items(items)
        return self.encoder.classify(contents, self.batch_size, names)


class ModelEmbedder:
    """Embeds items with a model in training, in eval mode and without gradients, then gives the mode back."""

    def __init__(
        self, model: torch.nn.Module, device: torch.device, batch_size: int = 64, channels_last: bool = False
    ) -> None:
        self.model, self.device, self.batch_size, self.channels_last = model, device, batch_size, channels_last
        self.class_names = model.class_names

    def embed_items(self, items: Sequence[Item], prompt_name: str | None = None) -> torch.Tensor:  # -> (N, D)
        return self._run(items, self.model, prompt_name)

    def classify_items(self, items: Sequence[Item]) -> torch.Tensor:  # -> (N, C)
        return self._run(items, self.model.classify)

    @torch.no_grad()
    def _run(self, items: Sequence[Item], forward, prompt_name: str | None = None) -> torch.Tensor:
        inputs = self.model.inputs
        inputs.check_items(items, 'evaluation items')
        was_training = self.model.training
        self.model.eval()
        try:
            out = []
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                batch = inputs.batch([inputs.content_of(it, prompt_name) for it in chunk], [it.name for it in chunk])
                out.append(forward(to_device(batch, self.device, self.channels_last)).float().cpu())
            return torch.cat(out)
        finally:
            self.model.train(was_training)
