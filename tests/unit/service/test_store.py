"""The run store: folders, status, requests, logs, documents sent with /train, recovery after a restart."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from executor.service.store import RunNotFoundError, RunStore, finite_metrics, pid_alive


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
    assert set(updated.info()) == {
        'run_id',
        'status',
        'created_at',
        'started_at',
        'finished_at',
        'epoch',
        'epochs',
        'step',
        'total_steps',
        'metrics',
        'error',
        'artifact',
    }
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


def test_documents_of_runs_from_before_plans_still_read(store: RunStore, tmp_path: Path):
    """Runs created before plans were saved keep their documents in train_docs/ (their worker plans them)."""
    store.create({}, run_id='old')
    folder = store.root / 'old' / 'train_docs'
    folder.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / '000000.png')
    records = [
        {'id': 't', 'label': 'a', 'name': 'doc t', 'file': '000000.png'},
        {'id': 'x', 'label': None, 'text': 'hi'},
    ]
    (folder / 'records.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    back = store.train_docs('old')
    assert [(it.id, it.label, it.text) for it in back] == [('t', 'a', None), ('x', None, 'hi')]
    assert back[0].uri == str(folder / '000000.png') and back[0].name == 'doc t'
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
    with pytest.raises(FileNotFoundError, match='holds neither model.pt nor model.onnx'):
        store.model_file('r', 'torch')
    (store.root / 'r' / 'model.pt').write_bytes(b'pt')
    assert store.model_file('r', 'onnx').name == 'model.pt'  # no export yet
    (store.root / 'r' / 'model.onnx').write_bytes(b'onnx')
    assert store.model_file('r', 'onnx').name == 'model.onnx'
    assert store.model_file('r', 'torch').name == 'model.pt'


def test_finite_metrics_drops_what_json_cannot_carry():
    assert finite_metrics({'a': 1, 'b': float('nan'), 'c': float('inf'), 'd': 0.5, 'e': 'x', 'f': True}) == {
        'a': 1.0,
        'd': 0.5,
    }


def test_concurrent_creates_of_one_run_name_make_one_run_and_refuse_the_others(store: RunStore, monkeypatch):
    """Issue 21: three requests for one run_name at once were all answered CREATED, and one run existed."""
    import threading
    import time

    class SlowPlan:
        def save(self, folder):  # writing a request's documents takes a while: the others arrive meanwhile
            time.sleep(0.3)

    outcomes: dict[int, object] = {}

    def create(epochs: int) -> None:
        try:
            outcomes[epochs] = store.create({'epochs': epochs}, SlowPlan(), run_id='race').status
        except ValueError as err:
            outcomes[epochs] = err

    threads = [threading.Thread(target=create, args=(epochs,)) for epochs in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    created = [epochs for epochs, outcome in outcomes.items() if outcome == 'CREATED']
    refused = [outcome for outcome in outcomes.values() if isinstance(outcome, ValueError)]
    assert len(created) == 1 and len(refused) == 2
    assert all("a run named 'race' exists already" in str(err) for err in refused)
    assert store.request('race') == {'epochs': created[0]}  # the run holds the request that was told CREATED


def test_delete_removes_the_run_and_its_files_and_leaves_the_others(store: RunStore):
    store.create({'epochs': 1}, run_id='gone')
    store.create({'epochs': 1}, run_id='kept')
    (store.root / 'gone' / 'reports').mkdir()
    (store.root / 'gone' / 'reports' / 'curves.png').write_bytes(b'png')
    store.update('gone', status='FINISHED')
    assert store.delete('gone').status == 'FINISHED'
    assert store.ids() == ['kept'] and not (store.root / 'gone').exists()
    assert list((store.root / '.deleted').iterdir()) == []  # renamed out of the store, then removed
    with pytest.raises(RunNotFoundError, match=r"unknown run_id 'gone'; known runs \(latest\): 'kept'"):
        store.delete('gone')
    store.create({'epochs': 1}, run_id='gone')  # the name is free again
    (store.root / '.deleted' / 'gone-1234').mkdir()  # left by a delete that a crash interrupted
    assert not (RunStore(store.root).root / '.deleted').exists()
