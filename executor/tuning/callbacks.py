"""Training callbacks: the interface (``Callback``, and ``TrainerState``, the trainer as callbacks see it) and the
callbacks every run may have: evaluation, best model, early stopping, progress. The experiment trackers, callbacks
too, are in ``trackers``.

A callback sees the trainer at six points (fit start, batch end, epoch end, checkpoint, artifact, fit end); ``logs``
is the epoch's row of the metrics history. Callbacks with state (best score, patience) save it in the checkpoint for
exact resume. The trainer imports this module, never the reverse: what a callback may read of the trainer is
``TrainerState``.
"""

from __future__ import annotations

import inspect
import logging
import math
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from executor.tuning.evaluation import Evaluator, metric_mode

__all__ = [
    'BestModelCheckpoint',
    'Callback',
    'EarlyStopping',
    'EvaluationCallback',
    'FinetunerCallback',
    'ProgressBar',
    'TrainerState',
]

logger = logging.getLogger(__name__)


class TrainerState(Protocol):
    """The trainer as callbacks see it."""

    epoch: int
    epochs: int
    step: int
    total_steps: int
    should_stop: bool
    metrics_before: dict[str, float] | None
    raw_model: torch.nn.Module

    def embedder(self, batch_size: int = 64) -> Any: ...


class Callback:
    """Base class: override the hooks you need; ``state_dict``/``load_state_dict`` for what must survive a resume.

    The hooks, in the order a run calls them: ``on_fit_start``, then per epoch ``on_batch_end`` (each optimizer
    step), ``on_epoch_end`` and ``on_checkpoint``; ``on_artifact`` once the final model is saved; ``on_fit_end``
    always, also when the run fails.
    """

    def on_fit_start(self, trainer: TrainerState) -> None: ...

    def on_batch_end(self, trainer: TrainerState, loss: float) -> None: ...

    def on_epoch_end(self, trainer: TrainerState, logs: dict[str, float]) -> None: ...

    def on_checkpoint(self, trainer: TrainerState, logs: dict[str, float]) -> None:
        """After the epoch's checkpoint is written (rank 0): what has been reported here can be resumed from."""

    def on_artifact(self, trainer: TrainerState, folder: Path) -> None:
        """After the final model, its reports and its ONNX export (``to_onnx``) are written into ``folder``."""

    def on_fit_end(self, trainer: TrainerState) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def higher_is_better(metric: str, mode: str = 'auto') -> bool:
    """Whether a larger ``metric`` is better: by the metric (``mode='auto'``), or as ``mode`` (``'max'``/``'min'``)
    says."""
    return mode == 'max' if mode != 'auto' else metric == 'epoch' or metric_mode(metric) == 'max'


class FinetunerCallback(Callback):
    """A callback Finetuner had, under its name, taking its arguments. Given to ``fit()`` or ``/train`` (as the object,
    or as ``{'name': 'EarlyStopping', 'patience': 2}``), it is translated into the run's options
    (``finetuner_callbacks.callback_options``), from which the run builds the callbacks it runs, of the same classes.

    Each argument is kept as the attribute of its name; ``internal`` names the constructor's arguments that the run
    sets, not the user (left out of ``to_dict``).
    """

    internal: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def arguments(cls) -> dict[str, Any]:
        """Finetuner's arguments of this callback and their defaults (``inspect.Parameter.empty`` when required)."""
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
        return {p.name: p.default for p in parameters if p.name not in cls.internal}

    def to_dict(self) -> dict[str, Any]:
        """The callback's name and the arguments it was given other than their defaults (how it travels as JSON)."""
        given = {
            name: getattr(self, name)
            for name, default in self.arguments().items()
            if default is inspect.Parameter.empty or getattr(self, name) != default
        }
        return {'name': type(self).__name__, **given}


class EvaluationCallback(FinetunerCallback):
    """Runs the task's ``Evaluator`` each epoch and adds its metrics to the epoch's logs; before the first epoch it
    evaluates the pre-trained model, for the before/after report.

    Runs before the other callbacks so that best-model and early stopping can monitor its metrics. A user gives it as
    Finetuner did (``query_data``, ``index_data``: the queries search the index, or each other; ``limit``): the run's
    evaluation data, which the run's plan reads once; the run then builds the one that runs with its ``evaluator``.
    Finetuner's other arguments are taken at their defaults only (``finetuner_callbacks`` says why for each).
    """

    internal = ('evaluator',)

    def __init__(
        self,
        query_data: str | None = None,
        index_data: str | None = None,
        model: str | None = None,
        index_model: str | None = None,
        multi_modal: bool = False,
        batch_size: int = 32,
        exclude_self: bool = True,
        limit: int = 20,
        distance: str = 'cosine',
        steps_per_interval: int | None = None,
        gather_examples: bool = False,
        num_example_queries: int = 5,
        num_workers: int = 8,
        caption: str | None = None,
        output_model_names: bool = False,
        query_sample_size: int | None = None,
        evaluator: Evaluator | None = None,
    ) -> None:
        given = dict(locals())
        for name in self.arguments():
            setattr(self, name, given[name])
        self.evaluator = evaluator

    def on_fit_start(self, trainer: TrainerState) -> None:
        if trainer.metrics_before is None:
            trainer.metrics_before = self.evaluate(trainer)

    def on_epoch_end(self, trainer: TrainerState, logs: dict[str, float]) -> None:
        logs.update(self.evaluate(trainer))

    def evaluate(self, trainer: TrainerState) -> dict[str, float]:
        return self.evaluator(trainer.embedder(self.batch_size)).metrics


class BestModelCheckpoint(FinetunerCallback):
    """Keeps the weights of the epoch with the best ``monitor`` value; the trainer saves them as the final model
    (Finetuner's, its arguments too: ``monitor=None``: the run's own metric; ``mode`` as ``EarlyStopping``'s)."""

    def __init__(self, monitor: str | None = None, mode: str = 'auto') -> None:
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, trainer: TrainerState, logs: dict[str, float]) -> None:
        value = logs.get(self.monitor)
        if value is None:
            raise ValueError(
                f'monitor {self.monitor!r} is not among the logged metrics {sorted(logs)}; choose one of those'
            )
        better = higher_is_better(self.monitor, self.mode)
        if self.best is None or (value > self.best if better else value < self.best):
            self.best, self.best_epoch = float(value), int(logs['epoch'])
            self.best_state = {k: v.detach().clone().cpu() for k, v in trainer.raw_model.state_dict().items()}
            logger.info('best %s so far: %.4f (epoch %d)', self.monitor, value, self.best_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {'best': self.best, 'best_epoch': self.best_epoch, 'best_state': self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.best_state = state['best'], state['best_epoch'], state['best_state']


class EarlyStopping(FinetunerCallback):
    """Stops the run when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs; with a
    ``baseline``, improving means bettering it first (Finetuner's EarlyStopping, its arguments and defaults).
    ``monitor=None``: the run's own metric; ``mode``: ``'auto'`` (better as the metric says), ``'min'`` or ``'max'``."""

    def __init__(
        self,
        monitor: str | None = None,
        mode: str = 'auto',
        patience: int = 2,
        min_delta: float = 0,
        baseline: float | None = None,
    ) -> None:
        self.monitor, self.mode, self.patience, self.min_delta, self.baseline = (
            monitor,
            mode,
            patience,
            min_delta,
            baseline,
        )
        self.best: float | None = baseline
        self.wait = 0

    def on_epoch_end(self, trainer: TrainerState, logs: dict[str, float]) -> None:
        value = logs.get(self.monitor)
        if value is None or math.isnan(value):
            return
        sign = 1.0 if higher_is_better(self.monitor, self.mode) else -1.0
        if self.best is None or sign * (value - self.best) > self.min_delta:
            self.best, self.wait = float(value), 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            logger.info('early stopping: %s did not improve for %d epochs', self.monitor, self.patience)
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {'best': self.best, 'wait': self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait = state['best'], state['wait']


class ProgressBar(Callback):
    """A rich progress bar over all steps, with the running loss and the last epoch's metrics."""

    def __init__(self) -> None:
        self.progress = None
        self.task = None

    def on_fit_start(self, trainer: TrainerState) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn('[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}'),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn('{task.fields[info]}'),
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            'train',
            total=trainer.total_steps,
            completed=trainer.step,
            epoch=trainer.epoch + 1,
            epochs=trainer.epochs,
            info='',
        )

    def on_batch_end(self, trainer: TrainerState, loss: float) -> None:
        self.progress.update(self.task, completed=trainer.step, epoch=trainer.epoch + 1, info=f'loss {loss:.4f}')

    def on_epoch_end(self, trainer: TrainerState, logs: dict[str, float]) -> None:
        shown = {k: v for k, v in logs.items() if k != 'epoch'}
        info = ' '.join(f'{k} {v:.4f}' for k, v in list(shown.items())[:4])
        self.progress.update(self.task, info=info)

    def on_fit_end(self, trainer: TrainerState) -> None:
        if self.progress is not None:
            self.progress.stop()
