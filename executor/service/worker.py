"""The training child: ``python -m executor.service.worker <run folder>`` trains one run to its end.

The service's ``JobQueue`` starts it (under ``torchrun`` for ``num_devices`` > 1). It owns the run's ``status.json``
while it lives: STARTED, progress each batch and epoch (``StatusCallback``), then FINISHED or FAILED; its log goes to
``train.log``. Under torchrun every rank runs it, rank 0 alone writes the status, and a rank that fails writes its
error to ``failures/rank-<r>.json``. It exits as soon as its service does: it watches the pipe on its stdin, whose
other end the service holds.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from executor.service.jobs import FAILURES_DIR
from executor.service.store import RunStore, finite_metrics, now
from executor.tuning.artifact import CHECKPOINT
from executor.tuning.callbacks import Callback
from executor.tuning.config import TrainConfig
from executor.tuning.files import atomic_write_text
from executor.tuning.plan import RunPlan, plan_run

if TYPE_CHECKING:
    from executor.tuning.trainer import Trainer

logger = logging.getLogger(__name__)

STATUS_INTERVAL = 1.0  # seconds between progress writes within an epoch


class StatusCallback(Callback):
    """Writes the run's progress to its ``status.json`` from inside the training process."""

    def __init__(self, store: RunStore, run_id: str) -> None:
        self.store = store
        self.run_id = run_id
        self._last_write = 0.0

    def on_fit_start(self, trainer: Trainer) -> None:
        self.store.update(
            self.run_id, epoch=trainer.epoch, epochs=trainer.epochs, step=trainer.step, total_steps=trainer.total_steps
        )

    def on_batch_end(self, trainer: Trainer, loss: float) -> None:
        if time.monotonic() - self._last_write >= STATUS_INTERVAL:
            self._last_write = time.monotonic()
            self.store.update(self.run_id, step=trainer.step, metrics=finite_metrics({'train_loss': loss}))

    def on_checkpoint(self, trainer: Trainer, logs: dict[str, float]) -> None:
        # written once the epoch's checkpoint is, so the status's `epoch` is always what `resume` continues from
        self._last_write = time.monotonic()
        self.store.update(self.run_id, epoch=int(logs['epoch']), step=trainer.step, metrics=finite_metrics(logs))


def _exit_with_parent() -> None:
    """End this process when the service's end of stdin closes (the service exited, was killed or crashed).

    torchrun's workers inherit the pipe from torchrun, and the service closes its end as soon as the process it
    started ends: workers exit with their service, and also when their torchrun was killed (each worker runs in a
    session of its own, out of reach of the signals sent to torchrun's process group).
    """
    fd = sys.stdin.fileno()
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        return  # started by hand, not by a service

    def watch() -> None:
        # os.read, not sys.stdin: a thread blocked in a buffered reader aborts the interpreter's shutdown
        while os.read(fd, 65536):
            pass
        os._exit(3)

    threading.Thread(target=watch, name='parent-watch', daemon=True).start()


def train_run(folder: Path) -> int:
    """Train the run in ``folder`` to its end; returns the process exit code."""
    from executor.tuning.trainer import Trainer

    store, run_id = RunStore(folder.parent), folder.name
    rank, world = int(os.environ.get('RANK', '0')), int(os.environ.get('WORLD_SIZE', '1'))
    if rank == 0:
        state = store.update(run_id, status='STARTED', started_at=now(), pid=os.getpid(), error=None)
    else:
        state = store.get(run_id)
    try:
        # the trainer calls back on rank 0 only, so the status is written by one process
        plan = _load_plan(store, folder, StatusCallback(store, run_id))
        resume = state.resume and (folder / CHECKPOINT).is_file()
        if state.resume and not resume:
            logger.warning('run %s has no checkpoint (it never finished an epoch): training from the start', run_id)
        result = Trainer(plan).fit(resume=resume)
    except Exception as err:
        logger.exception('run %s failed', run_id)
        if world > 1:  # the other ranks fail in turn (a peer closed); the service reports the first of them
            _record_failure(folder, rank, world, err)
        else:
            store.update(run_id, status='FAILED', finished_at=now(), pid=None, error=_describe(err))
        return 1
    if rank == 0:
        metrics = dict(result.history[-1]) if result.history else {}
        metrics.update({f'before/{k}': v for k, v in (result.metrics_before or {}).items()})
        store.update(
            run_id,
            status='FINISHED',
            finished_at=now(),
            pid=None,
            resume=False,
            artifact=str(result.artifact),
            metrics=finite_metrics(metrics),
        )
        logger.info('run %s finished: %s', run_id, result.artifact)
    return 0


def _load_plan(store: RunStore, folder: Path, status: StatusCallback) -> RunPlan:
    """The plan the service saved when it created the run, loaded as it was (nothing validated or decided again);
    a run created before plans were saved is planned here from its request."""
    if RunPlan.exists(folder):
        return RunPlan.load(folder, output_dir=folder, callbacks=[status])
    logger.info('run %s has no saved plan (created by an older version): planning it from its request', folder.name)
    request, docs = store.request(folder.name), store.train_docs(folder.name)
    config = TrainConfig(**request, output_dir=folder, callbacks=[status])
    return plan_run(config.model_copy(update={'train_data': docs}) if docs is not None else config)


def _record_failure(folder: Path, rank: int, world: int, err: BaseException) -> None:
    """Write this rank's error for ``first_failure``, before the process exits and its peers see it gone."""
    (folder / FAILURES_DIR).mkdir(exist_ok=True)
    atomic_write_text(
        folder / FAILURES_DIR / f'rank-{rank}.json',
        json.dumps({'rank': rank, 'world': world, 'time': time.time(), 'error': _describe(err)}),
    )


def _describe(err: BaseException) -> str:
    import torch

    text = f'{type(err).__name__}: {err}'
    if isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)):
        text += '; lower batch_size or image_size, or freeze more layers'
    return text


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print('usage: python -m executor.service.worker <run folder>', file=sys.stderr)
        return 2
    # under torchrun the ranks share train.log: each line says whose it is
    rank = f' rank {os.environ["RANK"]}' if int(os.environ.get('WORLD_SIZE', '1')) > 1 else ''
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f'%(asctime)s %(levelname)s{rank} %(name)s: %(message)s'
    )
    _exit_with_parent()
    return train_run(Path(args[0]).resolve())


if __name__ == '__main__':
    sys.exit(main())
