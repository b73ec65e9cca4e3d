"""The run store (folders, status, logs, documents, recovery), artifact lookup, the encoder cache and the batcher."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from executor.tuning.data.images import load_image
from executor.tuning.data.sources import Item
from executor.tuning.runs import (
    EncoderCache,
    RequestBatcher,
    RunNotFoundError,
    RunStore,
    finite_metrics,
    open_artifact,
    pid_alive,
)


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path / 'runs')


def test_create_get_update_list(store: RunStore):
    first = store.create({'model': 'resnet18', 'epochs': 2}, run_id='first')
    second = store.create({'epochs': 1})
    assert first.status == 'CREATED' and first.created_at and first.started_at is None
    assert second.run_id.startswith('run-')
    assert store.request('first') == {'model': 'resnet18', 'epochs': 2}

    updated = store.update('first', status='STARTED', epoch=1, epochs=2, metrics={'train_loss': 0.5})
    assert store.get('first') == updated
    assert json.loads((store.root / 'first' / 'status.json').read_text())['epoch'] == 1
    assert [s.run_id for s in store.list()] == ['first', second.run_id]
    assert set(updated.info()) == {'run_id', 'status', 'created_at', 'started_at', 'finished_at', 'epoch', 'epochs',
                                   'step', 'total_steps', 'metrics', 'error', 'artifact'}
    assert not [p for p in (store.root / 'first').iterdir() if p.name.endswith('.tmp')]


def test_names_are_checked_and_unique(store: RunStore):
    store.create({}, run_id='taken')
    with pytest.raises(ValueError, match="a run named 'taken' exists already"):
        store.create({}, run_id='taken')
    for bad in ('../escape', '', '.hidden', 'a/b', 'x' * 200):
        with pytest.raises(ValueError, match='is not valid'):
            store.create({}, run_id=bad)
    with pytest.raises(RunNotFoundError, match=r"unknown run_id 'nope'; known runs \(latest\): 'taken'"):
        store.get('nope')
    with pytest.raises(AttributeError, match='no field'):
        store.update('taken', stauts='FAILED')


def test_a_folder_without_status_is_not_a_run(store: RunStore):
    (store.root / 'half-written').mkdir()
    (store.root / 'half-written' / 'request.json').write_text('{}')
    assert store.ids() == [] and store.list() == []


def test_recover_fails_interrupted_runs_and_requeues_created(store: RunStore):
    store.create({}, run_id='a-finished')
    store.update('a-finished', status='FINISHED')
    store.create({}, run_id='b-dead')
    store.update('b-dead', status='STARTED', pid=2**22 + 12345)  # beyond pid_max: no such process
    store.create({}, run_id='c-alive')
    store.update('c-alive', status='STARTED', pid=os.getpid())
    store.create({}, run_id='d-queued')

    assert store.recover(pid_alive) == ['d-queued']
    dead = store.get('b-dead')
    assert dead.status == 'FAILED' and dead.finished_at and dead.pid is None
    assert dead.error.startswith('interrupted') and "resume='b-dead'" in dead.error
    assert store.get('a-finished').status == 'FINISHED'
    assert store.get('c-alive').status == 'STARTED'


def test_read_log_pages_through_lines(store: RunStore):
    store.create({}, run_id='r')
    assert store.read_log('r') == ([], 0)
    (store.root / 'r' / 'train.log').write_text(''.join(f'line {i}\n' for i in range(5)))
    assert store.read_log('r') == ([f'line {i}' for i in range(5)], 5)
    assert store.read_log('r', since=3) == (['line 3', 'line 4'], 5)
    assert store.read_log('r', since=1, limit=2) == (['line 1', 'line 2'], 3)
    assert store.read_log('r', since=9) == ([], 9)


def test_documents_round_trip_as_files(store: RunStore, tmp_path: Path):
    rng = np.random.default_rng(0)
    tensor = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
    png = tmp_path / 'blob.png'
    Image.fromarray(tensor[::-1].copy()).save(png)
    uri = tmp_path / 'on-disk.png'
    Image.fromarray(tensor[:, ::-1].copy()).save(uri)
    items = [Item('t', tensor=tensor, label='a'), Item('b', blob=png.read_bytes(), label='b'),
             Item('u', uri=str(uri), label=None)]
    store.create({}, run_id='docs', docs=items)

    back = store.train_docs('docs')
    assert [(it.id, it.label) for it in back] == [('t', 'a'), ('b', 'b'), ('u', None)]
    for original, restored in zip(items, back):
        assert np.array_equal(np.asarray(load_image(restored.content)), np.asarray(load_image(original.content)))
    store.create({}, run_id='paths')
    assert store.train_docs('paths') is None


def test_model_file_of_unfinished_runs_says_why(store: RunStore):
    store.create({}, run_id='r')
    with pytest.raises(ValueError, match="run 'r' is CREATED, it has no model to serve yet; wait until"):
        store.model_file('r', 'torch')
    store.update('r', status='FAILED')
    with pytest.raises(ValueError, match="resume it with /train resume='r'"):
        store.model_file('r', 'torch')
    store.update('r', status='FINISHED')
    assert store.model_file('r', 'onnx').name == 'model.pt'  # no export yet
    (store.root / 'r' / 'model.onnx').write_bytes(b'onnx')
    assert store.model_file('r', 'onnx').name == 'model.onnx'
    assert store.model_file('r', 'torch').name == 'model.pt'


def test_finite_metrics_drops_what_json_cannot_carry():
    assert finite_metrics({'a': 1, 'b': float('nan'), 'c': float('inf'), 'd': 0.5, 'e': 'x', 'f': True}) == \
        {'a': 1.0, 'd': 0.5}


def test_open_artifact_folder_zip_run_and_selection(store: RunStore, tmp_path: Path):
    folder = tmp_path / 'artifact'
    folder.mkdir()
    (folder / 'model.pt').write_bytes(b'pt')
    (folder / 'model.onnx').write_bytes(b'onnx')
    (folder / 'model-int8.onnx').write_bytes(b'int8')
    unpack = tmp_path / 'unpacked'
    assert open_artifact(folder, store, unpack, 'onnx') == folder / 'model.onnx'
    assert open_artifact(folder, store, unpack, 'torch') == folder / 'model.pt'
    assert open_artifact(folder, store, unpack, 'onnx', 'model-int8.onnx') == folder / 'model-int8.onnx'
    with pytest.raises(FileNotFoundError, match=r"select_model='model-fp16.onnx' is not in .* it holds \['model-int8"):
        open_artifact(folder, store, unpack, 'onnx', 'model-fp16.onnx')

    archive = tmp_path / 'artifact.zip'
    with zipfile.ZipFile(archive, 'w') as zf:
        for name in ('model.pt', 'model.onnx'):
            zf.write(folder / name, f'artifact/{name}')
    served = open_artifact(archive, store, unpack, 'onnx')
    assert served.name == 'model.onnx' and served.read_bytes() == b'onnx' and unpack in served.parents
    assert open_artifact(archive, store, unpack, 'onnx') == served  # unpacked once

    store.create({}, run_id='run1')
    with pytest.raises(ValueError, match='CREATED'):
        open_artifact('run1', store, unpack, 'torch')
    store.update('run1', status='FINISHED')
    (store.root / 'run1' / 'model.pt').write_bytes(b'pt')
    assert open_artifact('run1', store, unpack, 'onnx') == store.root / 'run1' / 'model.pt'
    with pytest.raises(FileNotFoundError, match='neither a run id of this workspace nor an existing path'):
        open_artifact('no-such-run', store, unpack, 'onnx')


def test_encoder_cache_is_lru_and_builds_once():
    cache = EncoderCache(size=2)
    builds = []

    def build(name):
        def make():
            builds.append(name)
            return f'encoder {name}'
        return make

    assert cache.get(('a',), build('a')) == 'encoder a'
    cache.get(('b',), build('b'))
    cache.get(('a',), build('a'))  # a is now the most recent
    cache.get(('c',), build('c'))  # evicts b
    assert cache.keys() == [('a',), ('c',)] and builds == ['a', 'b', 'c']
    cache.drop(lambda key: key == ('a',))
    assert cache.keys() == [('c',)]
    with pytest.raises(ValueError, match='at least 1'):
        EncoderCache(size=0)

    slow = threading.Event()
    counted = []

    def build_slow():
        counted.append(1)
        slow.wait(5)
        return 'slow'

    threads = [threading.Thread(target=cache.get, args=(('s',), build_slow)) for _ in range(4)]
    for t in threads:
        t.start()
    slow.set()
    for t in threads:
        t.join()
    assert counted == [1]


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
        same = [batcher.run(('a',), x, model('a', 1.0)) for x in requests]
        other = batcher.run(('b',), torch.ones(2, 1, 2, 2), model('b', 10.0))
        results = await asyncio.gather(*same, other)
        for x, out in zip(requests, results):
            assert np.allclose(out[:, 0], x.flatten(1).sum(1).numpy())
        assert np.allclose(results[3][:, 0], 40.0)
        assert sorted(calls) == [('a', 6), ('b', 2)]  # three requests, one pass

        calls.clear()
        big = [batcher.run(('a',), torch.ones(5, 1, 2, 2), model('a', 1.0)) for _ in range(3)]
        assert [len(r) for r in await asyncio.gather(*big)] == [5, 5, 5]
        assert calls == [('a', 5), ('a', 5), ('a', 5)]  # max_rows=8: no two of them fit together

        calls.clear()
        bad = batcher.run(('c',), -torch.ones(1, 1, 2, 2), model('c', 1.0))
        good = batcher.run(('d',), torch.ones(1, 1, 2, 2), model('d', 1.0))
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
        return await batcher.run(('a',), torch.ones(1, 1, 2, 2), run)

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
