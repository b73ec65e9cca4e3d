"""Training jobs with num_devices > 1: torchrun's ranks train one run, rank 0 reports, cancel stops every process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from executor.service.jobs import FAILURES_DIR, JobQueue, child_command, first_failure
from executor.service.store import RunState, RunStore, pid_alive
from executor.tuning.config import TrainConfig
from executor.tuning.data import Item
from executor.tuning.data.digits import write_digits_folder
from executor.tuning.tasks import decide_task

# 40 digits in 2 global batches of 20 (10 per rank): an epoch takes about a second, start-up dominates.
TINY = dict(
    model='resnet18',
    pretrained=False,
    image_size=32,
    batch_size=20,
    num_items_per_class=2,
    epochs=2,
    optimizer='SGD',
    learning_rate=0.01,
    device='cpu',
    tensorboard=False,
    num_devices=2,
)
START_TIMEOUT = 180.0  # seconds for torchrun and two workers to import torch on a busy 2-core machine
REPO = Path(__file__).resolve().parents[3]
# A service in a process of its own: its queue takes the CREATED runs of the store, and it waits to be killed.
SERVICE = (
    'import sys, time; from executor.service.jobs import JobQueue; from executor.service.store import RunStore; '
    'JobQueue(RunStore(sys.argv[1])).start(); time.sleep(600)'
)


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path / 'runs')


@pytest.fixture
def jobs(store: RunStore) -> Iterator[JobQueue]:
    queue = JobQueue(store)
    queue.start()
    yield queue
    queue.close()


@pytest.fixture
def digits(tmp_path: Path) -> str:
    return str(write_digits_folder(tmp_path / 'digits', per_class=4))


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f'timed out after {timeout:.0f} s waiting for {what}')


def submit(store: RunStore, jobs: JobQueue, run_id: str, **options: Any) -> Path:
    store.create({**TINY, **options}, run_id=run_id)
    jobs.submit(run_id)
    return store.folder(run_id)


def run_processes(folder: Path) -> dict[int, str]:
    """Processes whose command line names the run folder (torchrun and its workers): pid -> RANK ('' for torchrun)."""
    found = {}
    for proc in Path('/proc').iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / 'cmdline').read_bytes().split(b'\0')
            environ = (proc / 'environ').read_bytes().split(b'\0')
        except OSError:  # ended while we looked, or not ours
            continue
        if str(folder).encode() in argv and pid_alive(int(proc.name)):
            rank = next((v[5:].decode() for v in environ if v.startswith(b'RANK=')), '')
            found[int(proc.name)] = rank
    return found


def test_one_device_keeps_the_plain_child_and_two_go_through_torchrun(tmp_path: Path):
    assert child_command(tmp_path, 1)[1:] == ['-m', 'executor.service.worker', str(tmp_path)]
    assert child_command(tmp_path, 2)[1:] == [
        '-m',
        'torch.distributed.run',
        '--standalone',
        '--nproc-per-node=2',
        '-m',
        'executor.service.worker',
        str(tmp_path),
    ]


def test_num_devices_is_checked_against_the_gpus_and_the_batch():
    if torch.cuda.device_count() == 0:
        with pytest.raises(
            ValueError,
            match=r"num_devices=2 with device='cuda' needs 2 GPUs, but no CUDA device is "
            r"visible.*set device='cpu' to train with 2 CPU processes",
        ):
            TrainConfig(device='cuda', num_devices=2)
        assert TrainConfig(device='auto', num_devices=2).num_devices == 2  # no GPU: two CPU processes
    too_many = max(2, torch.cuda.device_count() + 1)
    with pytest.raises(ValueError, match=rf'num_devices={too_many} .* needs {too_many} GPUs'):
        TrainConfig(device='cuda', num_devices=too_many)
    with pytest.raises(ValueError, match=r"device='cuda:0' names one GPU, but num_devices=2"):
        TrainConfig(device='cuda:0', num_devices=2)
    with pytest.raises(ValueError, match='batch_size=30 is the global batch and must divide among num_devices=4'):
        TrainConfig(device='cpu', num_devices=4, batch_size=30)
    with pytest.raises(ValueError, match='less than or equal to 64'):
        TrainConfig(device='cpu', num_devices=65)
    # a task's default batch is rounded up so that it divides among the processes
    items = [Item(id=str(i), text=f'sentence {i}', label=str(i % 2)) for i in range(4)]
    assert decide_task(TrainConfig(device='cpu', num_devices=3), items).config.batch_size == 66


def test_two_processes_train_a_run_and_rank_0_alone_reports(store: RunStore, jobs: JobQueue, digits: str):
    folder = submit(store, jobs, 'ddp', train_data=digits)
    state: RunState = wait_for(lambda: (s := store.get('ddp')).done and s, START_TIMEOUT, 'the run to end')
    log = (folder / 'train.log').read_text()
    assert state.status == 'FINISHED', (state.error, log[-3000:])
    assert state.epoch == 2 and state.epochs == 2 and state.step == 4 and state.pid is None
    assert Path(state.artifact).is_file() and 'train_loss' in state.metrics
    assert [row['epoch'] for row in store.history('ddp')] == [1.0, 2.0]  # one row per epoch, not one per rank
    assert json.loads((folder / 'config.json').read_text())['num_devices'] == 2
    assert sorted(p.name for p in (folder / 'checkpoints').iterdir()) == ['last.pt']
    assert not (folder / 'failures').exists()
    # both ranks joined and trained; only rank 0 settled the run
    assert re.search(r'INFO rank 0 .*joined gloo process group as rank 0 of 2', log)
    assert re.search(r'INFO rank 1 .*joined gloo process group as rank 1 of 2', log)
    assert len(re.findall(r'rank 1 .*epoch 2/2', log)) == 1
    assert re.findall(r'INFO rank (\d) \S+: run ddp finished', log) == ['0']
    wait_for(lambda: not run_processes(folder), 30, 'torchrun and its workers to exit')
    assert 'death signal' not in (folder / 'train.log').read_text()  # they ended by themselves


@pytest.mark.slow
def test_a_failing_rank_fails_the_run_with_its_error(store: RunStore, jobs: JobQueue, digits: str, tmp_path: Path):
    missing = tmp_path / 'no-such-weights.pt'
    folder = submit(store, jobs, 'broken', train_data=digits, weights=str(missing))
    state: RunState = wait_for(lambda: (s := store.get('broken')).done and s, START_TIMEOUT, 'the run to end')
    assert state.status == 'FAILED' and state.pid is None
    assert re.match(r'rank [01] of 2: ', state.error) and str(missing) in state.error, state.error
    assert sorted(p.name for p in (folder / 'failures').iterdir()) == ['rank-0.json', 'rank-1.json']
    wait_for(lambda: not run_processes(folder), 30, 'torchrun and its workers to exit')


def test_the_first_rank_to_fail_gives_the_reason(tmp_path: Path):
    assert first_failure(tmp_path) is None
    (tmp_path / FAILURES_DIR).mkdir()
    # rank 0 failed last: its error only says that its peer went away
    for rank, when, error in ((0, 2.5, 'RuntimeError: Connection closed by peer'), (1, 1.5, 'MemoryError: ...')):
        (tmp_path / FAILURES_DIR / f'rank-{rank}.json').write_text(
            json.dumps({'rank': rank, 'world': 2, 'time': when, 'error': error})
        )
    assert first_failure(tmp_path) == 'rank 1 of 2: MemoryError: ...'


def test_cancel_stops_torchrun_and_its_workers_and_resume_continues(
    store: RunStore, jobs: JobQueue, digits: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    system_tmp = tmp_path / 'system-tmp'  # the service's TMPDIR: a cancelled run used to leave wandb's folders here
    system_tmp.mkdir()
    monkeypatch.setenv('TMPDIR', str(system_tmp))
    folder = submit(store, jobs, 'long', train_data=digits, epochs=1000)
    checkpoint = folder / 'checkpoints' / 'last.pt'
    wait_for(checkpoint.is_file, START_TIMEOUT, 'the first checkpoint')
    assert (folder / 'tmp').is_dir()  # the run's own TMPDIR while it trains
    processes = run_processes(folder)
    assert sorted(processes.values()) == ['', '0', '1'], processes  # torchrun and its two workers
    rank_0 = next(pid for pid, rank in processes.items() if rank == '0')
    assert store.get('long').pid == rank_0  # the status names the process that writes it

    started = time.monotonic()
    state = jobs.cancel('long')
    assert state.status == 'CANCELLED'
    wait_for(lambda: not any(pid_alive(pid) for pid in processes), 10, 'every process of the run to end')
    cancel_seconds = time.monotonic() - started
    assert cancel_seconds < 15, cancel_seconds
    wait_for(lambda: not (folder / 'tmp').exists(), 10, "the run's tmp folder to be removed")
    assert list(system_tmp.iterdir()) == []
    epochs_done = len(store.history('long'))
    assert epochs_done >= 1

    # resume: both ranks load the checkpoint and the history continues where it stopped
    jobs.resume('long')
    wait_for(lambda: len(store.history('long')) > epochs_done + 1, START_TIMEOUT, 'an epoch after resuming')
    assert jobs.cancel('long').status == 'CANCELLED'
    rows = [int(row['epoch']) for row in store.history('long')]
    assert rows == list(range(1, len(rows) + 1)), rows
    log = (folder / 'train.log').read_text()
    assert len(re.findall(r'INFO rank [01] .*resumed from .* at epoch', log)) == 2
    wait_for(lambda: not run_processes(folder), 10, 'every process of the resumed run to end')


@pytest.mark.slow  # about a minute; test_new_users resumes with other epochs over gRPC and HTTP in make test
def test_resume_with_epochs_cuts_a_run_short_or_extends_a_finished_one(store: RunStore, jobs: JobQueue, digits: str):
    def ended(run_id: str) -> RunState:
        return wait_for(lambda: (s := store.get(run_id)).done and s, START_TIMEOUT, f'run {run_id} to end')

    # cut short: a long run, cancelled after its first epochs, resumed to end one epoch later
    submit(store, jobs, 'cut', train_data=digits, epochs=1000, num_devices=1)
    wait_for(lambda: store.get('cut').epoch >= 1, START_TIMEOUT, 'the first epoch')
    done = jobs.cancel('cut').epoch
    with pytest.raises(
        ValueError,
        match=rf"run 'cut' has done {done} epochs already, so it cannot end after "
        rf'{done - 1}: give epochs >= {done}',
    ):
        jobs.resume('cut', epochs=done - 1)
    assert jobs.resume('cut', epochs=done + 1).epochs == done + 1
    state = ended('cut')
    assert (state.status, state.epoch, state.epochs) == ('FINISHED', done + 1, done + 1)
    assert [row['epoch'] for row in store.history('cut')] == list(range(1, done + 2))
    assert store.request('cut')['epochs'] == done + 1
    assert (
        f'resumed from {store.folder("cut") / "checkpoints" / "last.pt"} at epoch {done}'
        in (store.folder('cut') / 'train.log').read_text()
    )
    (store.folder('cut') / 'checkpoints' / 'last.pt').unlink()
    with pytest.raises(ValueError, match=r"run 'cut' has no checkpoint to continue from \(checkpoints/last.pt\)"):
        jobs.resume('cut', epochs=done + 2)

    # extended: a FINISHED run trains two more epochs from its checkpoint
    submit(store, jobs, 'short', train_data=digits, epochs=1, num_devices=1)
    assert ended('short').status == 'FINISHED'
    with pytest.raises(
        ValueError,
        match=r"'short' is FINISHED and cannot be resumed: it finished; resume it with "
        r'epochs=N \(more than its 1\)',
    ):
        jobs.resume('short')
    with pytest.raises(ValueError, match=r"run 'short' finished its 1 epochs: give epochs > 1"):
        jobs.resume('short', epochs=1)
    (store.folder('short') / 'model.onnx').write_bytes(b'an export of the 1-epoch model')
    jobs.resume('short', epochs=3)
    assert not (store.folder('short') / 'model.onnx').exists()  # stale once the run trains on
    state = ended('short')
    assert (state.status, state.epoch, state.epochs) == ('FINISHED', 3, 3)
    assert [row['epoch'] for row in store.history('short')] == [1, 2, 3]
    assert 'resumed from' in (store.folder('short') / 'train.log').read_text()


def test_killing_the_service_ends_torchrun_and_its_workers(store: RunStore, digits: str):
    store.create({**TINY, 'train_data': digits, 'epochs': 1000}, run_id='orphan')
    folder = store.folder('orphan')
    env = {**os.environ, 'PYTHONPATH': str(REPO)}
    service = subprocess.Popen([sys.executable, '-c', SERVICE, str(store.root)], env=env, start_new_session=True)
    try:
        wait_for((folder / 'checkpoints' / 'last.pt').is_file, START_TIMEOUT, 'the first checkpoint')
        processes = run_processes(folder)
        assert sorted(processes.values()) == ['', '0', '1'], processes
        service.kill()  # as kill -9 would: nothing in the service gets to stop the run
        service.wait()
        # the workers see the service's pipe close and exit; torchrun follows its failed workers
        wait_for(lambda: not any(pid_alive(pid) for pid in processes), 30, 'every process of the run to end')
    finally:
        if service.poll() is None:
            os.killpg(service.pid, signal.SIGKILL)
            service.wait()


def test_workers_of_a_killed_torchrun_exit(store: RunStore, jobs: JobQueue, digits: str):
    folder = submit(store, jobs, 'headless', train_data=digits, epochs=1000)
    wait_for((folder / 'checkpoints' / 'last.pt').is_file, START_TIMEOUT, 'the first checkpoint')
    processes = run_processes(folder)
    torchrun = next(pid for pid, rank in processes.items() if rank == '')
    os.kill(torchrun, signal.SIGKILL)  # as the out-of-memory killer might: torchrun cannot stop its workers
    wait_for(lambda: not any(pid_alive(pid) for pid in processes), 30, 'the workers to notice and exit')
    state = wait_for(lambda: (s := store.get('headless')).done and s, 30, 'the run to end')
    assert state.status == 'FAILED' and 'killed by SIGKILL' in state.error, state.error


def test_delete_refuses_a_run_in_progress_and_removes_one_that_ended(store: RunStore):
    queue = JobQueue(store)  # not started: runs stay as the test sets them
    for run_id, status in [('queued', 'CREATED'), ('training', 'STARTED'), ('done', 'FINISHED'), ('bad', 'FAILED')]:
        store.create({'epochs': 1}, run_id=run_id)
        store.update(run_id, status=status)
    with pytest.raises(ValueError, match=r"run 'queued' is CREATED \(queued\); cancel it first with /runs/cancel"):
        queue.delete('queued')
    with pytest.raises(ValueError, match=r"run 'training' is STARTED \(training\); cancel it first"):
        queue.delete('training')
    assert queue.delete('done').status == 'FINISHED' and queue.delete('bad').status == 'FAILED'
    assert store.ids() == ['queued', 'training']
    queue.cancel('queued')
    assert queue.delete('queued').status == 'CANCELLED'
