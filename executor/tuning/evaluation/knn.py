"""Exact k-nearest-neighbour search over embeddings, chunked so that memory stays bounded, ties broken by index."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor
Distance = Literal['cosine', 'euclidean']

_DEFAULT_CHUNKS = {'cpu': (1024, 8192), 'accelerator': (4096, 32768)}  # (query_chunk, index_chunk)
_RECOMPUTE_BUDGET = 1 << 24  # floats gathered at once when euclidean distances are recomputed exactly


def knn(
    queries: ArrayLike,
    index: ArrayLike,
    k: int,
    metric: Distance = 'cosine',
    exclude_self: bool = False,
    query_chunk: int | None = None,
    index_chunk: int | None = None,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours of each query in `index`, best first.

    Scores are float32 matrix products computed block by block: the index is walked in chunks of `index_chunk`
    rows and, for each, the queries in chunks of `query_chunk` rows; each (query_chunk, index_chunk) block is
    reduced with `torch.topk` and merged into a running top-k. Extra memory is therefore bounded by
    O(query_chunk * index_chunk) floats for one score block (32 MiB with the CPU defaults 1024 x 8192) plus
    O(Q * k) for the running results, plus a float32 copy of the queries where they are not float32 on `device`
    already and one of an index chunk likewise; the index itself is never copied whole.

    - 'cosine': scores are cosine similarities (higher is better). Zero vectors score 0 against everything.
    - 'euclidean': scores are euclidean distances (lower is better), recomputed exactly from the vectors for the
      k results so that near-zero distances are not lost to cancellation.

    Ties are broken by the lower index position, deterministically, at every chunk boundary.
    With `exclude_self`, `queries` and `index` are the same set (same length, row i is item i) and query i never
    matches index row i. Fewer than k columns come back when the index holds fewer candidates.

    :param queries: (Q, D) float array or tensor.
    :param index: (N, D) float array or tensor; a float32 numpy array is used in place (no copy on CPU).
    :param k: number of neighbours (>= 1).
    :param device: where the products run; default: the queries' device if they are a CUDA tensor, else CUDA when
        available, else CPU.
    :return: (scores, indices), each (Q, min(k, candidates)), on the CPU; indices are int64 rows of `index`.
    """
    q, x = _as_2d_tensor(queries, 'queries'), _as_2d_tensor(index, 'index')
    k = _check_knn_args(q, x, k, metric, exclude_self)
    dev = _resolve_device(device, q)
    default_q, default_i = _DEFAULT_CHUNKS['cpu' if dev.type == 'cpu' else 'accelerator']
    query_chunk = _check_chunk(default_q if query_chunk is None else query_chunk, 'query_chunk')
    index_chunk = _check_chunk(default_i if index_chunk is None else index_chunk, 'index_chunk')

    q_dev = q.to(dev, torch.float32)
    q_norm = torch.linalg.vector_norm(q_dev, dim=1)  # (Q,)
    _check_finite(q_norm, 'queries')
    n_queries, n_index = len(q), len(x)
    # Placeholders score -inf and lose to every real candidate; at least k real ones exist.
    best_scores = torch.full((n_queries, k), -torch.inf, device=dev)
    best_idx = torch.full((n_queries, k), -1, dtype=torch.int64, device=dev)
    block_buf = torch.empty(min(query_chunk, n_queries) * min(index_chunk, n_index), device=dev)
    for i_start in range(0, n_index, index_chunk):
        chunk = x[i_start : i_start + index_chunk].to(dev, torch.float32)  # (ic, D)
        column_term = _column_term(chunk, metric, i_start)  # (ic,)
        for q_start in range(0, n_queries, query_chunk):
            q_rows = q_dev[q_start : q_start + query_chunk]  # (qc, D)
            block = block_buf[: len(q_rows) * len(chunk)].view(len(q_rows), len(chunk))
            if metric == 'cosine':
                torch.mm(q_rows, chunk.T, out=block).mul_(column_term)
            else:
                torch.addmm(column_term, q_rows, chunk.T, out=block)
            if exclude_self:
                _mask_self(block, q_start, i_start)
            scores, idx = _block_topk(block, min(k, len(chunk)))  # (qc, k')
            rows = slice(q_start, q_start + len(q_rows))
            best_scores[rows], best_idx[rows] = _merge(best_scores[rows], best_idx[rows], scores, idx + i_start)

    if metric == 'cosine':
        scores = best_scores / q_norm.clamp_min(1e-12)[:, None]
        return scores.cpu(), best_idx.cpu()
    return _exact_euclidean(q, x, best_idx.cpu())


def _as_2d_tensor(data: ArrayLike, name: str) -> torch.Tensor:
    tensor = data if isinstance(data, torch.Tensor) else torch.as_tensor(np.asarray(data))
    if tensor.ndim != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f'{name} must be a non-empty 2-D (items, dim) array, got shape {tuple(tensor.shape)}')
    if not tensor.is_floating_point():
        raise ValueError(f'{name} must hold floating-point embeddings, got {tensor.dtype}')
    return tensor.detach()


def _check_knn_args(q: torch.Tensor, x: torch.Tensor, k: int, metric: str, exclude_self: bool) -> int:
    """Validate the search and return k capped at the number of candidates."""
    if q.shape[1] != x.shape[1]:
        raise ValueError(
            f'queries have dimension {q.shape[1]} but the index has {x.shape[1]}: embed both with the same model'
        )
    if metric not in ('cosine', 'euclidean'):
        raise ValueError(f"unknown metric {metric!r}; use 'cosine' or 'euclidean'")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f'k must be a positive integer, got {k!r}')
    if exclude_self and len(q) != len(x):
        raise ValueError(
            f'exclude_self needs queries and index to be the same set, got {len(q)} queries and {len(x)} index '
            'rows; pass exclude_self=False for distinct sets'
        )
    candidates = len(x) - int(exclude_self)
    if candidates < 1:
        raise ValueError('the index holds no candidate besides the query itself: give at least 2 items')
    return min(k, candidates)


def _resolve_device(device: str | torch.device | None, queries: torch.Tensor) -> torch.device:
    if device is not None:
        return torch.device(device)
    if queries.device.type != 'cpu':
        return queries.device
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def _check_chunk(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be a positive integer, got {value!r}')
    return value


def _check_finite(norms: torch.Tensor, name: str, offset: int = 0) -> None:
    bad = ~torch.isfinite(norms)
    if bad.any():
        row = offset + int(bad.nonzero()[0, 0])
        raise ValueError(f'{name} row {row} holds NaN or inf (or values too large for float32): fix that embedding')


def _column_term(chunk: torch.Tensor, metric: str, offset: int) -> torch.Tensor:
    """The index side of the block score; per-query constants are left out as they do not change a ranking.

    cosine: block = (q . x) * (1 / |x|); euclidean: block = q . x - |x|^2 / 2, which ranks like -|q - x|.
    """
    norm = torch.linalg.vector_norm(chunk, dim=1)  # (ic,)
    _check_finite(norm, 'index', offset)
    if metric == 'cosine':
        return 1.0 / norm.clamp_min(1e-12)
    return -0.5 * norm.square()


def _merge(
    best_scores: torch.Tensor, best_idx: torch.Tensor, scores: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the k best of the running results and a later chunk's (both ordered by score, then index)."""
    merged_scores = torch.cat([best_scores, scores], dim=1)
    merged_idx = torch.cat([best_idx, idx], dim=1)
    # The running results hold lower indices, so a stable sort keeps "lower index first" on ties.
    order = merged_scores.argsort(dim=1, descending=True, stable=True)[:, : best_scores.shape[1]]
    return merged_scores.gather(1, order), merged_idx.gather(1, order)


def _mask_self(block: torch.Tensor, q_start: int, i_start: int) -> None:
    """Set the scores of query i against index row i to -inf inside one block."""
    first = max(q_start, i_start)
    last = min(q_start + block.shape[0], i_start + block.shape[1])
    if first < last:
        diag = torch.arange(first, last, device=block.device)
        block[diag - q_start, diag - i_start] = -torch.inf


def _block_topk(block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row, ordered by score then lower column, with ties at the k-th score resolved by column."""
    if k == block.shape[1]:
        return _order(block, torch.arange(k, device=block.device).expand_as(block))  # gather copies
    scores, idx = block.topk(k + 1, dim=1)
    # topk picks arbitrarily among values equal to the k-th; the (k+1)-th equals it exactly when such a tie
    # crosses the cut, and only those rows are redone with a stable full sort.
    tied = scores[:, k] == scores[:, k - 1]
    scores, idx = scores[:, :k], idx[:, :k]
    if tied.any():
        rows = tied.nonzero().squeeze(1)
        sorted_scores, sorted_idx = block[rows].sort(dim=1, descending=True, stable=True)
        scores[rows], idx[rows] = sorted_scores[:, :k], sorted_idx[:, :k]
    return _order(scores, idx)


def _order(scores: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by descending score, ties by ascending index."""
    by_idx = idx.argsort(dim=1, stable=True)
    scores, idx = scores.gather(1, by_idx), idx.gather(1, by_idx)
    by_score = scores.argsort(dim=1, descending=True, stable=True)
    return scores.gather(1, by_score), idx.gather(1, by_score)


def _exact_euclidean(
    queries: torch.Tensor, index: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances of the chosen neighbours computed from differences, re-sorted (ties by lower index)."""
    k, dim = idx.shape[1], queries.shape[1]
    rows_per_step = max(1, _RECOMPUTE_BUDGET // (k * dim))
    distances = torch.empty(idx.shape, dtype=torch.float32)
    for start in range(0, len(idx), rows_per_step):
        sel = idx[start : start + rows_per_step]  # (r, k)
        neighbours = index.index_select(0, sel.reshape(-1).to(index.device)).cpu().float()  # (r*k, D)
        q = queries[start : start + rows_per_step].cpu().float()  # (r, D)
        diff = neighbours.view(len(sel), k, dim) - q[:, None, :]
        distances[start : start + rows_per_step] = torch.linalg.vector_norm(diff, dim=2)
    neg, idx = _order(-distances, idx)
    return -neg, idx
