"""The request batcher: concurrent small requests for the same model share forward passes (dynamic batching)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

import numpy as np

from executor.tuning.inputs import Batch, Inputs

logger = logging.getLogger(__name__)


class RequestBatcher:
    """Dynamic batching: concurrent small requests for the same model share forward passes.

    Each request decodes its own images first, so a corrupt image fails that request only; the caller says so by
    decoding inside ``with batcher.expecting():``. ``run(key, batch, fn, inputs)`` then queues the preprocessed
    ``batch`` (of ``n`` rows); requests with the same ``key`` (the same model, hence the same ``inputs``) that are
    queued while that model is busy, or within ``max_wait`` seconds of each other while other requests are still
    decoding, are concatenated by ``inputs.concat`` (up to ``max_rows`` rows) and ``fn`` runs once on them, in a worker
    thread. Different keys never share a batch. A request that finds the model
    idle and nothing else on its way runs at once: waiting would only add latency (Triton's default, too).
    """

    def __init__(self, max_wait: float = 0.005, max_rows: int = 256) -> None:
        self.max_wait = max_wait
        self.max_rows = max_rows
        self._pending: dict[tuple, list[tuple[Batch, Callable, asyncio.Future, Inputs]]] = {}
        self._workers: dict[tuple, asyncio.Task] = {}
        self._expected = 0  # requests still decoding (counted on the event loop's thread only)

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Wrap a request's decoding: while it lasts, a batch about to start waits ``max_wait`` for it."""
        self._expected += 1
        try:
            yield
        finally:
            self._expected -= 1

    async def run(self, key: tuple, batch: Batch, fn: Callable[[Batch], np.ndarray], inputs: Inputs) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append((batch, fn, future, inputs))
        worker = self._workers.get(key)
        if worker is None or worker.done():
            self._workers[key] = asyncio.create_task(self._drain(key))
        return await future

    async def _drain(self, key: tuple) -> None:
        await asyncio.sleep(0)  # requests queued in this turn of the event loop join the first batch
        if self._expected:  # and so do those sent at the same time that are still decoding, if they are quick
            await asyncio.sleep(self.max_wait)
        pending = self._pending[key]
        while pending:
            rows, group = 0, []
            inputs = pending[0][3]
            while pending and (not group or rows + inputs.rows(pending[0][0]) <= self.max_rows):
                group.append(pending.pop(0))
                rows += inputs.rows(group[-1][0])
            parts, fn = [item[0] for item in group], group[0][1]
            try:  # concatenated in the worker thread too: a copy of many MB would stall the event loop
                out = await asyncio.to_thread(_run_concatenated, fn, inputs, parts)
            except Exception as err:  # the batch's error is each of its requests' error
                for _, _, future, _ in group:
                    if not future.done():
                        future.set_exception(err)
                continue
            start = 0
            for part, _, future, _ in group:
                if not future.done():  # a request whose client went away is skipped
                    future.set_result(out[start : start + inputs.rows(part)])
                start += inputs.rows(part)
        self._pending.pop(key, None)


def _run_concatenated(fn: Callable[[Batch], np.ndarray], inputs: Inputs, parts: list[Batch]) -> np.ndarray:
    """``fn`` on the requests' rows as one batch."""
    return fn(inputs.concat(parts))
