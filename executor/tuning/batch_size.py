"""Automatic batch size: the largest batch whose training step fits in memory, by a bounded search.

Finetuner's users hit out-of-memory at batch 128 and asked for this (finetuner #588). The search doubles the batch
until a step fails with out-of-memory (or ``maximum`` is reached), then bisects between the last batch that fitted
and the first that did not; at most ``2 * log2(maximum / start)`` trial steps.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and 'out of memory' in str(err).lower()
    )


def _fits(trial: Callable[[int], None], batch: int) -> bool:
    try:
        trial(batch)
        return True
    except Exception as err:  # only out-of-memory means "too large"; anything else is a real error
        if not is_out_of_memory(err):
            raise
        return False
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def find_batch_size(trial: Callable[[int], None], start: int = 16, maximum: int = 4096, multiple: int = 1) -> int:
    """The largest batch (a multiple of ``multiple``) for which ``trial(batch)`` does not run out of memory."""
    if start < multiple:
        start = multiple
    start -= start % multiple
    if not _fits(trial, start):
        low, high = 0, start  # even the first guess is too large: bisect below it
    else:
        low, high = start, None
        while high is None:
            nxt = min(low * 2, maximum - maximum % multiple)
            if nxt <= low:
                return low
            if _fits(trial, nxt):
                low = nxt
            else:
                high = nxt
    while high - low > multiple:
        mid = (low + high) // 2
        mid -= mid % multiple
        if mid <= low:
            break
        if _fits(trial, mid):
            low = mid
        else:
            high = mid
    if low < multiple:
        raise RuntimeError(f'even a batch of {multiple} runs out of memory; use a smaller model or image_size')
    logger.info('automatic batch size: %d', low)
    return low
