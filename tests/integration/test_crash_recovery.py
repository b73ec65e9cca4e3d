"""Crash safety: a training process that dies fails its run only; a service killed with SIGKILL while a run trains
loses nothing: on restart the run reads FAILED (interrupted), earlier runs are intact, and resume finishes it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from jina import Deployment

from executor.client import FinetunerClient, ServiceError
from executor.docs import FinetunerDoc
from executor.service.store import pid_alive
from executor.tuning.data.digits import digits, write_digits_folder

REPO = Path(__file__).resolve().parents[2]
TINY = {'model': 'resnet18', 'pretrained': False, 'image_size': 32, 'epochs': 1, 'batch_size': 20}


def training_pid(workspace: Path, run_id: str, timeout: float = 240) -> int:
    """The pid of a run's training process, once it has started (read from its status file)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for status in workspace.rglob(f'runs/{run_id}/status.json'):
            state = json.loads(status.read_text())
            if state['status'] == 'STARTED' and state['pid'] and (status.parent / 'checkpoints' / 'last.pt').is_file():
                return state['pid']
        time.sleep(0.1)
    raise AssertionError(f'run {run_id} did not finish an epoch within {timeout} s')


def parent_pid(pid: int) -> int:
    return int(Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[1])


def wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        assert time.monotonic() < deadline, f'process {pid} is still alive'
        time.sleep(0.05)


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / 'data'
    # 20 digits: an epoch is one step of a fraction of a second, so that these tests fit in make test
    write_digits_folder(root / 'digits', per_class=2, size=32)
    return root


def test_a_training_process_that_dies_fails_its_run_only(tmp_path: Path, free_port: Callable[[], int], data_root: Path):
    port = free_port()
    with Deployment(
        uses=str(REPO / 'config.yml'),
        uses_with={'data_roots': [str(data_root)]},
        workspace=str(tmp_path / 'ws'),
        host='127.0.0.1',
        port=port,
    ):
        client = FinetunerClient(f'grpc://127.0.0.1:{port}')
        run = client.fit(train_data='digits', run_name='doomed', **{**TINY, 'epochs': 1000})
        os.kill(training_pid(tmp_path / 'ws', 'doomed'), signal.SIGKILL)  # as the out-of-memory killer would
        info = run.wait(timeout=60).info()
        assert info.status == 'FAILED' and 'killed by SIGKILL' in info.error and 'out-of-memory' in info.error
        assert client.fit(train_data='digits', wait=True, **TINY).status()['status'] == 'FINISHED'


@contextmanager
def service(workspace: Path, port: int, data_root: Path) -> Iterator[subprocess.Popen]:
    """`jina executor --uses config.yml` from the repository root, in its own process group; killed on exit."""
    command = [
        sys.executable,
        '-m',
        'jina',
        'executor',
        '--uses',
        'config.yml',
        '--host',
        '127.0.0.1',
        '--port',
        str(port),
        '--workspace',
        str(workspace),
        '--uses-with',
        json.dumps({'data_roots': [str(data_root)]}),
    ]
    env = {**os.environ, 'JINA_OPTOUT_TELEMETRY': '1', 'PYTHONPATH': str(REPO)}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        client = FinetunerClient(f'grpc://127.0.0.1:{port}')
        deadline = time.monotonic() + 120
        while True:
            try:
                client.list_runs()
                break
            except (ConnectionError, ServiceError):
                assert process.poll() is None and time.monotonic() < deadline, 'the service did not start'
                time.sleep(0.5)
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob('*'))
        if p.is_file() and 'tensorboard' not in p.parts
    }


def test_kill_9_of_the_service_loses_nothing(tmp_path: Path, free_port: Callable[[], int], data_root: Path):
    workspace = tmp_path / 'ws'
    images, _ = digits(per_class=1, offset=30, size=32)
    queries = [FinetunerDoc(tensor=img) for img in images]
    port = free_port()
    with service(workspace, port, data_root) as process:
        client = FinetunerClient(f'grpc://127.0.0.1:{port}')
        earlier = client.fit(train_data='digits', run_name='earlier', wait=True, **TINY)
        assert earlier.status()['status'] == 'FINISHED'
        earlier_folder = Path(earlier.artifact).parent
        earlier_files = digest(earlier_folder)
        earlier_embeddings = np.stack(client.encode(queries, run_id='earlier', runtime='torch').embedding)

        # 20 epochs of one step: the kill comes right after the first checkpoint, seconds before the end
        client.fit(train_data='digits', run_name='victim', **{**TINY, 'epochs': 20})
        trainer = training_pid(workspace, 'victim')
        # SIGKILL to the process that serves and watches the run: its training process ends by itself ...
        os.kill(parent_pid(trainer), signal.SIGKILL)
        wait_gone(trainer)
        # ... and then the rest of the service, as `kill -9` of everything would
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    port = free_port()
    with service(workspace, port, data_root):
        client = FinetunerClient(f'grpc://127.0.0.1:{port}')
        victim = client.get_run('victim').info()
        assert victim.status == 'FAILED' and victim.error.startswith('interrupted')
        assert 1 <= victim.epoch < 20
        assert client.get_run('earlier').info().status == 'FINISHED'
        assert digest(earlier_folder) == earlier_files
        again = np.stack(client.encode(queries, run_id='earlier', runtime='torch').embedding)
        assert np.allclose(again, earlier_embeddings, atol=1e-5)

        resumed = client.resume('victim', wait=True).info()
        assert (resumed.status, resumed.epoch, resumed.epochs, resumed.error) == ('FINISHED', 20, 20, None)
        assert 'resumed from' in client.get_run('victim').logs()
        history = next(workspace.rglob('runs/victim/history.jsonl')).read_text().splitlines()
        assert [json.loads(row)['epoch'] for row in history] == list(range(1, 21))  # no epoch lost or repeated
        assert len(client.encode(queries, run_id='victim').embedding) == len(queries)
