"""Hard negatives mined from a corpus with the model being tuned, as sentence-transformers' ``mine_hard_negatives``
mines them (its option names and meaning: ``config.HardNegatives``), by exact search.

For each distinct query of the (query, positive) pairs: the corpus (the given one, or the pairs' positives, and the
positives always, de-duplicated by text) ranked by cosine similarity to the query; its judged positives (the
positives of every pair of that query, and every document its judgements grade > 0) never count; what is left of
the ranks ``range_min`` to ``range_max`` is kept where it scores at most the query's hardest positive minus ``margin``
(absolute) and minus ``|positive| x relative_margin``, and within ``min_score``/``max_score``; ``num_negatives`` of
those (the ``top`` ones, or a ``random`` sample, best first) become each pair's negatives. In the ``n-tuple`` format a
pair with fewer candidates than ``num_negatives`` is left out (as sentence-transformers leaves it out); ``triplet``
gives a row per negative found.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from executor.tuning.config import HardNegatives
from executor.tuning.data.sources import Item
from executor.tuning.errors import DataError
from executor.tuning.evaluation.evaluator import Embedder
from executor.tuning.evaluation.knn import knn
from executor.tuning.inputs.base import DOCUMENT, QUERY

logger = logging.getLogger(__name__)

MINED_FILE = 'hard_negatives.jsonl'  # in the run folder: the rows trained on, reused on resume


@dataclass
class Mined:
    """The rows to train on, and what mining found (logged, and written to the run's history)."""

    rows: list[Item]
    stats: dict[str, float] = field(default_factory=dict)


def mine_hard_negatives(
    pairs: Sequence[Item], corpus: Sequence[Item] | None, embedder: Embedder, options: HardNegatives, seed: int = 0
) -> Mined:
    """(query, positive) ``pairs`` -> rows (query, positive, negatives...) mined from ``corpus`` (``None``: the
    positives) with ``embedder``; see the module."""
    if any(p.columns is None or len(p.columns) != 2 for p in pairs):
        raise DataError('hard negatives are mined for (query, positive) pairs; every row must have two texts')
    space = _Space(pairs, corpus)
    query_emb = _tensor(embedder.embed_items(_text_items(space.queries, QUERY), QUERY))
    corpus_emb = _tensor(embedder.embed_items(_text_items(space.texts, DOCUMENT), DOCUMENT))
    negatives, hardest = _negatives(space, query_emb, corpus_emb, options, random.Random(seed))
    rows, left_out = [], 0
    for pair in pairs:
        chosen = negatives[space.query_index[pair.columns[0]]]
        if options.output_format == 'n-tuple':
            if len(chosen) < options.num_negatives:
                left_out += 1
                continue
            rows.append(_row(pair, [space.texts[i] for i, _ in chosen], pair.id))
        else:
            rows += [_row(pair, [space.texts[i]], f'{pair.id}:{n}') for n, (i, _) in enumerate(chosen, start=1)]
    found = [s for chosen in negatives for _, s in chosen]
    stats = {
        'pairs': float(len(pairs)),
        'rows': float(len(rows)),
        'pairs_left_out': float(left_out),
        'negatives': float(len(found)),
        'positive_score_mean': float(hardest.mean()),
        'negative_score_mean': float(np.mean(found)) if found else float('nan'),
    }
    logger.info(
        'mined %d negatives for %d queries among %d documents: %d rows (%d pairs left out, too few candidates); mean '
        'cosine positive %.3f, negative %.3f',
        *(len(found), len(space.queries), len(space.texts), len(rows), left_out),
        *(stats['positive_score_mean'], stats['negative_score_mean']),
    )
    if not rows:
        raise DataError(
            f'no pair got {options.num_negatives} hard negatives under these options (ranks {options.range_min} to '
            f'{options.depth}, margin {options.absolute}, relative_margin {options.relative_margin}, max_score '
            f'{options.max_score}, min_score {options.min_score}); widen range_max, or loosen the margins'
        )
    return Mined(rows, stats)


class _Space:
    """The texts mined among (the corpus and every positive, de-duplicated by text), the distinct queries, and each
    query's judged positives as positions among the texts."""

    def __init__(self, pairs: Sequence[Item], corpus: Sequence[Item] | None) -> None:
        self.texts = list(dict.fromkeys([*(doc.text for doc in corpus or ()), *(p.columns[1] for p in pairs)]))
        position = {text: i for i, text in enumerate(self.texts)}
        by_id = {doc.id: position[doc.text] for doc in corpus or ()}
        self.queries = list(dict.fromkeys(p.columns[0] for p in pairs))
        self.query_index = {text: i for i, text in enumerate(self.queries)}
        self.positives: list[set[int]] = [set() for _ in self.queries]
        for pair in pairs:
            judged = self.positives[self.query_index[pair.columns[0]]]
            judged.add(position[pair.columns[1]])
            judged.update(by_id[d] for d, grade in (pair.relevant or {}).items() if grade > 0 and d in by_id)


def _negatives(
    space: _Space, query_emb: torch.Tensor, corpus_emb: torch.Tensor, options: HardNegatives, rng: random.Random
) -> tuple[list[list[tuple[int, float]]], torch.Tensor]:
    """Each query's negatives as (position, cosine), best first, and each query's hardest positive's cosine."""
    depth = min(options.depth + max(len(p) for p in space.positives), len(space.texts))
    scores, indices = knn(query_emb, corpus_emb, k=depth)  # (Q, depth), best first
    scores = scores.clone()
    for q, judged in enumerate(space.positives):
        scores[q, torch.isin(indices[q], torch.tensor(sorted(judged)))] = float('-inf')  # never a negative
    # each query's hardest (lowest-scoring) positive is what the margins are measured from
    q_unit, c_unit = F.normalize(query_emb, dim=1), F.normalize(corpus_emb, dim=1)
    hardest = torch.stack([(c_unit[sorted(judged)] @ q_unit[q]).min() for q, judged in enumerate(space.positives)])
    limit = hardest[:, None].expand_as(scores)
    if options.absolute is not None:
        scores[scores > limit - options.absolute] = float('-inf')
    if options.relative_margin is not None:
        scores[scores > limit - limit.abs() * options.relative_margin] = float('-inf')
    if options.max_score is not None:
        scores[scores > options.max_score] = float('-inf')
    if options.min_score is not None:
        scores[scores < options.min_score] = float('-inf')
    # ranks range_min..range_max of what is left (judged positives out first, as sentence-transformers ranks them)
    kept_scores, order = torch.topk(scores, k=min(options.depth, depth), dim=1)
    kept = torch.gather(indices, 1, order)[:, options.range_min :]
    kept_scores = kept_scores[:, options.range_min :]
    negatives = []
    for q in range(len(space.queries)):
        found = [(int(i), float(s)) for i, s in zip(kept[q], kept_scores[q]) if s != float('-inf')]
        if options.sampling_strategy == 'random' and len(found) > options.num_negatives:
            found = sorted(rng.sample(found, options.num_negatives), key=lambda pair: -pair[1])
        negatives.append(found[: options.num_negatives])
    return negatives, hardest


def _row(pair: Item, negatives: list[str], ident: str) -> Item:
    return Item(id=ident, name=pair.name, columns=(*pair.columns, *negatives), relevant=pair.relevant)


def _text_items(texts: Sequence[str], role: str) -> list[Item]:
    return [Item(id=f'{role} {i}', text=text, name=f'{role} {i}') for i, text in enumerate(texts)]


def _tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    return array.float() if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array, dtype=np.float32))
