"""The request batcher: same-key requests share a pass, keys stay apart, errors stay with their batch."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import torch

from executor.service.batcher import RequestBatcher
from executor.tuning.inputs import ImageInputs

INPUTS = ImageInputs()  # what concatenates the requests' batches (its `images` rows)


def send(batcher: RequestBatcher, key: tuple, x: torch.Tensor, fn):
    return batcher.run(key, {'images': x}, lambda batch: fn(batch['images']), INPUTS)


def test_batcher_merges_same_key_keeps_keys_apart_and_isolates_errors():
    calls: list[tuple[str, int]] = []

    def model(name: str, scale: float):
        def run(x: torch.Tensor) -> np.ndarray:
            calls.append((name, len(x)))
            if (x < 0).any():
                raise ValueError(f'{name} got a negative input')
            return (x.flatten(1).sum(1, keepdim=True) * scale).numpy()

        return run

    async def main():
        batcher = RequestBatcher(max_wait=0.05, max_rows=8)
        requests = [torch.full((n, 1, 2, 2), float(i)) for i, n in enumerate([1, 2, 3])]
        same = [send(batcher, ('a',), x, model('a', 1.0)) for x in requests]
        other = send(batcher, ('b',), torch.ones(2, 1, 2, 2), model('b', 10.0))
        results = await asyncio.gather(*same, other)
        for x, out in zip(requests, results):
            assert np.allclose(out[:, 0], x.flatten(1).sum(1).numpy())
        assert np.allclose(results[3][:, 0], 40.0)
        assert sorted(calls) == [('a', 6), ('b', 2)]  # three requests, one pass

        calls.clear()
        big = [send(batcher, ('a',), torch.ones(5, 1, 2, 2), model('a', 1.0)) for _ in range(3)]
        assert [len(r) for r in await asyncio.gather(*big)] == [5, 5, 5]
        assert calls == [('a', 5), ('a', 5), ('a', 5)]  # max_rows=8: no two of them fit together

        calls.clear()
        bad = send(batcher, ('c',), -torch.ones(1, 1, 2, 2), model('c', 1.0))
        good = send(batcher, ('d',), torch.ones(1, 1, 2, 2), model('d', 1.0))
        outcome = await asyncio.gather(bad, good, return_exceptions=True)
        assert isinstance(outcome[0], ValueError) and np.allclose(outcome[1], 4.0)

    asyncio.run(main())


def test_batcher_waits_only_for_requests_still_decoding():
    calls: list[int] = []

    def run(x: torch.Tensor) -> np.ndarray:
        calls.append(len(x))
        return x.flatten(1).sum(1, keepdim=True).numpy()

    async def request(batcher: RequestBatcher, decode_seconds: float, expected: bool) -> np.ndarray:
        with batcher.expecting() if expected else contextlib.nullcontext():
            await asyncio.sleep(decode_seconds)  # stands in for decoding in a worker thread
        return await send(batcher, ('a',), torch.ones(1, 1, 2, 2), run)

    async def main():
        batcher = RequestBatcher(max_wait=0.5)
        # nothing else on its way: the first request runs at once, so one sent a little later is a batch of its own
        # (it would have joined the first if the batcher had waited max_wait)
        await asyncio.gather(request(batcher, 0, False), request(batcher, 0.05, False))
        assert calls == [1, 1]
        calls.clear()
        # a request still decoding when the batch is about to start: the batch waits for it
        await asyncio.gather(request(batcher, 0, True), request(batcher, 0.05, True))
        assert calls == [2]

    asyncio.run(main())
