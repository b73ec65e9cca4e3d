"""Training jobs: each run trains in its own child process, one at a time on the device, watched by the service.

The child is ``python -m executor.service.worker <run folder>``. It owns the run's ``status.json`` while it lives
(STARTED, progress each batch and epoch, then FINISHED or FAILED) and writes its log to ``train.log``. An exception,
an out-of-memory kill or a crash of the child ends that run only: the service marks it FAILED with the cause and
takes the next queued run. The child exits as soon as its service does (it watches a pipe whose other end the
service holds), so a killed service never leaves a training process behind.

With ``num_devices`` > 1 the child is ``torchrun`` (``torch.distributed.run --standalone``) starting that many
copies of the command above, one DDP process per GPU or, on CPU, gloo processes. Rank 0 writes the status; a rank
that fails writes its error to ``failures/rank-<r>.json`` and torchrun stops the others, after which the service
marks the run FAILED with the first error of any rank. Cancelling sends SIGTERM to torchrun, which stops its
workers; the workers also watch the service's pipe, so they end with their service or with a killed torchrun.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from executor.service.store import RESUMABLE, RunState, RunStore, now, pid_alive
from executor.tuning.artifact import CHECKPOINT
from executor.tuning.config import TrainConfig
from executor.tuning.plan import RunPlan

logger = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds the `executor` package
CANCEL_GRACE = 10.0  # seconds a cancelled child gets to exit after SIGTERM before SIGKILL
RUN_TMP = 'tmp'  # under a run folder: the training process's TMPDIR, removed when the process ends
FAILURES_DIR = 'failures'  # under a run folder: one JSON file per rank that failed (num_devices > 1)


def _check_resumed_epochs(run_id: str, state: RunState, epochs: int, extends: bool) -> None:
    if epochs < state.epoch:
        raise ValueError(
            f'run {run_id!r} has done {state.epoch} epochs already, so it cannot end after {epochs}: give '
            f'epochs >= {state.epoch}, or start a new run'
        )
    if extends and epochs == state.epoch:
        raise ValueError(
            f'run {run_id!r} finished its {state.epoch} epochs: give epochs > {state.epoch} to train it further'
        )


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


def planned_devices(store: RunStore, run_id: str) -> int:
    """How many processes the run ``run_id`` trains with, its GPUs checked again: they may be gone since the run was
    planned (a restart with other CUDA_VISIBLE_DEVICES). A run from before plans were saved: from its request."""
    folder = store.folder(run_id)
    config = RunPlan.saved_config(folder) if RunPlan.exists(folder) else TrainConfig(**store.request(run_id))
    config.check_devices()
    return config.num_devices


class JobQueue:
    """Runs queued runs one after another, each in a child process; cancels them; recovers after a restart."""

    def __init__(self, store: RunStore, env: dict[str, str] | None = None) -> None:
        self.store = store
        self.env = env or {}
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()
        self._current: tuple[str, subprocess.Popen] | None = None
        self._cancelled: set[str] = set()
        self._thread = threading.Thread(target=self._work, name='finetuner-jobs', daemon=True)
        self._closed = False

    def start(self) -> None:
        """Mark runs left STARTED by a dead process FAILED, queue those left CREATED, and start taking runs."""
        for run_id in self.store.recover(pid_alive):
            self._queue.put(run_id)
        self._thread.start()

    def submit(self, run_id: str) -> None:
        self._queue.put(run_id)

    def resume(self, run_id: str, epochs: int | None = None) -> RunState:
        """Queue a FAILED or CANCELLED run again; it continues from its last checkpoint.

        ``epochs`` changes how many epochs the run has in all (more or fewer, but not fewer than it has done); with
        more than it has done, a FINISHED run continues too. The learning-rate schedule is rebuilt for the new length
        and taken up at the step the run is at, as Hugging Face's Trainer does on resume.
        """
        self._wait_for_exit(run_id)
        with self._lock:
            state = self.store.get(run_id)
            if self._current is not None and self._current[0] == run_id and state.done:
                raise ValueError(
                    f'run {run_id!r} is {state.status} but its training process is still exiting; '
                    'resume it again in a few seconds'
                )
            extends = state.status == 'FINISHED' and epochs is not None
            if state.status not in RESUMABLE and not extends:
                why = (
                    'it is still queued or training'
                    if not state.done
                    else f'it finished; resume it with epochs=N (more than its {state.epoch}) to train it further, or '
                    f'start a new run with model={run_id!r}'
                )
                raise ValueError(f'run {run_id!r} is {state.status} and cannot be resumed: {why}')
            if epochs is not None:
                _check_resumed_epochs(run_id, state, epochs, extends)
                if extends and not (self.store.folder(run_id) / CHECKPOINT).is_file():
                    raise ValueError(
                        f'run {run_id!r} has no checkpoint to continue from ({CHECKPOINT}); start a new '
                        f'run with model={run_id!r} instead'
                    )
                self.store.update_request(run_id, epochs=epochs)
                if RunPlan.exists(self.store.folder(run_id)):
                    RunPlan.update(self.store.folder(run_id), epochs=epochs)
            changes = {'epochs': epochs} if epochs is not None else {}
            state = self.store.update(run_id, status='CREATED', finished_at=None, error=None, resume=True, **changes)
            if extends:  # its ONNX exports are of the model it had: serving them after it trains on would be stale
                for export in self.store.folder(run_id).glob('model*.onnx*'):
                    export.unlink()
        self._queue.put(run_id)
        return state

    def _wait_for_exit(self, run_id: str) -> None:
        """A run's process writes its final status just before it exits: give it that moment (a resume sooner would
        be taken back by the worker thread settling the process it saw end)."""
        deadline = time.monotonic() + CANCEL_GRACE
        while time.monotonic() < deadline:
            current = self._current
            if current is None or current[0] != run_id or not self.store.get(run_id).done:
                return
            time.sleep(0.05)

    def cancel(self, run_id: str) -> RunState:
        """Stop a run: a queued one at once, a training one by ending its process. Returns its final state."""
        with self._lock:
            state = self.store.get(run_id)
            if state.status == 'CANCELLED':
                return state
            if state.done:
                raise ValueError(f'run {run_id!r} is {state.status} already; there is nothing to cancel')
            current = self._current
            if current is None or current[0] != run_id:
                return self.store.update(run_id, status='CANCELLED', finished_at=now(), pid=None)
            self._cancelled.add(run_id)
        _stop(current[1])
        deadline = time.monotonic() + CANCEL_GRACE
        while not self.store.get(run_id).done and time.monotonic() < deadline:
            time.sleep(0.05)  # the worker thread settles the run once the process is gone
        return self.store.get(run_id)

    def delete(self, run_id: str) -> RunState:
        """Remove a FINISHED, FAILED or CANCELLED run and its files; a run still queued or training is refused."""
        with self._lock:  # no run starts, resumes or is cancelled meanwhile
            state = self.store.get(run_id)
            if not state.done:
                raise ValueError(
                    f'run {run_id!r} is {state.status} ({"queued" if state.status == "CREATED" else "training"}); '
                    f'cancel it first with /runs/cancel run_id={run_id!r}, then delete it'
                )
            if self._current is not None and self._current[0] == run_id:
                raise ValueError(
                    f'run {run_id!r} is {state.status} but its training process is still exiting; delete it again '
                    'in a few seconds'
                )
            return self.store.delete(run_id)

    def close(self) -> None:
        """Stop taking runs; a training run is stopped and marked FAILED (interrupted), resumable later."""
        self._closed = True
        self._queue.put(None)
        with self._lock:
            current = self._current
        if current is not None:
            _stop(current[1])
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    # --- the worker thread ------------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            run_id = self._queue.get()
            if run_id is None or self._closed:
                return
            try:
                self._run(run_id)
            except Exception:  # the queue must keep going whatever one run does
                logger.exception('run %s could not be run', run_id)

    def _run(self, run_id: str) -> None:
        with self._lock:
            if run_id not in self.store.ids() or self.store.get(run_id).status != 'CREATED':  # cancelled (deleted)
                return
            folder = self.store.folder(run_id)
            try:
                num_devices = planned_devices(self.store, run_id)
            except ValueError as err:  # valid when queued, but e.g. the GPUs it asks for are gone since a restart
                self.store.update(run_id, status='FAILED', finished_at=now(), error=str(err))
                return
            shutil.rmtree(folder / FAILURES_DIR, ignore_errors=True)  # left by an earlier attempt of a resumed run
            env = {
                **os.environ,
                **self.env,
                'FINETUNER_PROGRESS': '0',
                'PYTHONUNBUFFERED': '1',
                'PYTHONPATH': os.pathsep.join([str(PACKAGE_ROOT), *filter(None, [os.environ.get('PYTHONPATH')])]),
                # the child's temporary files (wandb's, which `import timm` makes, torch's) in the run folder,
                # removed when it ends: a killed or cancelled child never removes its own
                'TMPDIR': str(_fresh(folder / RUN_TMP)),
            }
            # A session of its own: cancel signals the child's whole group, and a Ctrl-C meant for the service
            # reaches the child only through the service's close().
            with open(folder / 'train.log', 'ab') as log:
                process = subprocess.Popen(
                    child_command(folder, num_devices),
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=str(folder),
                    start_new_session=True,
                )
            self._current = (run_id, process)
        logger.info(
            'run %s: training in process %d (%d device%s)',
            run_id,
            process.pid,
            num_devices,
            's' if num_devices > 1 else '',
        )
        code = process.wait()
        shutil.rmtree(folder / RUN_TMP, ignore_errors=True)
        with self._lock:
            self._current = None
            process.stdin.close()
            self._settle(run_id, code)

    def _settle(self, run_id: str, code: int) -> None:
        """Give a run whose process ended without saying how (killed, crashed) its final status."""
        state = self.store.get(run_id)
        cancelled = run_id in self._cancelled
        self._cancelled.discard(run_id)
        if cancelled and state.status != 'FINISHED':
            self.store.update(run_id, status='CANCELLED', finished_at=now(), pid=None)
            logger.info('run %s cancelled', run_id)
        elif self._closed and not state.done:
            self.store.update(
                run_id,
                status='FAILED',
                finished_at=now(),
                pid=None,
                error=(
                    f'interrupted: the service stopped while the run was training; resume it with /train '
                    f'resume={run_id!r}'
                ),
            )
        elif not state.done:
            error = first_failure(self.store.folder(run_id)) or _exit_reason(code)
            self.store.update(run_id, status='FAILED', finished_at=now(), pid=None, error=error)
            logger.error('run %s: the training process ended with code %d: %s', run_id, code, error)


def child_command(folder: Path, num_devices: int) -> list[str]:
    """The command that trains the run in ``folder``: the child alone, or torchrun starting ``num_devices`` of it."""
    child = ['-m', 'executor.service.worker', str(folder)]
    if num_devices == 1:
        return [sys.executable, *child]
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc-per-node={num_devices}', *child]


def _stop(process: subprocess.Popen) -> None:
    """End a child and its process group: SIGTERM (torchrun passes it on to its workers), SIGKILL after a grace."""
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(CANCEL_GRACE)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        process.wait()


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    if process.poll() is not None:  # reaped: its id may belong to another process now
        return
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:  # it ended since
        pass


def first_failure(folder: Path) -> str | None:
    """The error of the rank that failed first (``failures/``), as ``rank r of w: <error>``; None if none wrote one."""
    records = [json.loads(path.read_text(encoding='utf-8')) for path in (folder / FAILURES_DIR).glob('rank-*.json')]
    if not records:
        return None
    first = min(records, key=lambda record: record['time'])
    return f'rank {first["rank"]} of {first["world"]}: {first["error"]}'


def _exit_reason(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = (
            " (SIGKILL is most often the kernel's out-of-memory killer: lower batch_size or image_size, or "
            'freeze more layers)'
            if -code == signal.SIGKILL
            else ''
        )
        return f"the training process was killed by {name}{hint}; see the run's log (/runs/logs)"
    return f"the training process exited with code {code} before it finished; see the run's log (/runs/logs)"
