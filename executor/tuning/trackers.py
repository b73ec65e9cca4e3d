"""Experiment trackers, as training callbacks: TensorBoard (the default), Weights & Biases and MLflow (``loggers``).

Each logs the same scalars, ``train/batch_loss`` per optimizer step and ``epoch/<metric>`` per epoch (``train_loss``,
``lr``, the evaluation metrics); W&B and MLflow also get the run's configuration (its ``config.json``) as parameters
and, once the final model is saved, the artifact's files (``artifact.artifact_files``).

- W&B runs offline (``WANDB_MODE=offline``) unless ``WANDB_MODE`` says otherwise: the run is written under
  ``<run>/wandb/`` for a later ``wandb sync``, and nothing is sent. ``WANDB_PROJECT`` names the project. Its artifact
  staging and cache folders default to ``<run>/wandb/`` too (``WANDB_DATA_DIR``, ``WANDB_CACHE_DIR`` win).
- MLflow logs to a file store in ``<run>/mlruns/`` unless ``MLFLOW_TRACKING_URI`` is set (a server, a database);
  ``MLFLOW_EXPERIMENT_NAME`` names the experiment. MLflow 3 keeps its file store in maintenance mode and refuses it
  unless ``MLFLOW_ALLOW_FILE_STORE`` is set: this module sets it in the training process when it uses one. MLflow
  names allow letters, digits and ``_-. :/``: ``@`` becomes ``_at_`` (``epoch/ndcg@10`` -> ``epoch/ndcg_at_10``),
  anything else ``_``. A resumed run continues the same MLflow run; W&B starts a new one.

Both packages are optional (``requirements-trackers.txt``); ``config.check_loggers`` refuses a tracker that is not
installed before a run is created.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from executor.tuning.artifact import CONFIG_FILE, artifact_files
from executor.tuning.callbacks import Callback, FinetunerCallback, TrainerState
from executor.tuning.config import TRACKER_PACKAGES

logger = logging.getLogger(__name__)

PROJECT = 'finetuner-executor'  # the W&B project and MLflow experiment when the environment names none
MAX_PARAM_CHARS = 500  # MLflow keeps a parameter's value in a bounded column; config.json is in the artifact whole
_MLFLOW_BAD = re.compile(r'[^\w\-. :/]')


def tracker_callbacks(loggers: Sequence[str], output_dir: Path) -> list[Callback]:
    """A callback per tracker in ``loggers`` (checked by ``TrainConfig``), logging the run in ``output_dir``."""
    kinds = {'tensorboard': TensorBoardLogger, 'wandb': WandBLogger, 'mlflow': MlflowLogger}
    return [kinds[name](output_dir=Path(output_dir)) for name in loggers]


def run_config(output_dir: Path) -> dict[str, Any]:
    """The run's resolved configuration, as the trainer wrote it before the first epoch."""
    path = output_dir / CONFIG_FILE
    return json.loads(path.read_text(encoding='utf-8')) if path.is_file() else {}


def epoch_scalars(logs: dict[str, float]) -> dict[str, float]:
    """An epoch's row as TensorBoard names its scalars (``epoch/<metric>``), non-finite values left out."""
    return {f'epoch/{k}': float(v) for k, v in logs.items() if k != 'epoch' and math.isfinite(v)}


def _require(name: str) -> Any:
    try:
        return importlib.import_module(TRACKER_PACKAGES[name][0])
    except ImportError as err:
        package = TRACKER_PACKAGES[name][1]
        raise ImportError(
            f'logger {name!r} needs the {package!r} package: `pip install -r requirements-trackers.txt` (or `pip '
            f'install {package}`), or leave {name!r} out of loggers'
        ) from err


@contextlib.contextmanager
def _environment_defaults(**values: str) -> Iterator[None]:
    """Set the variables the user has not set, for the duration (what a tracker reads at that moment)."""
    added = [key for key in values if key not in os.environ]
    os.environ.update({key: values[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


class TensorBoardLogger(Callback):
    """Writes the batch loss and every epoch metric as TensorBoard scalars under ``<output_dir>/tensorboard``."""

    def __init__(self, output_dir: Path) -> None:
        self.log_dir = str(output_dir / 'tensorboard')
        self.writer = None

    def on_fit_start(self, trainer: TrainerState) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(self.log_dir)

    def on_batch_end(self, trainer: TrainerState, loss: float) -> None:
        self.writer.add_scalar('train/batch_loss', loss, trainer.step)

    def on_epoch_end(self, trainer: TrainerState, logs: dict[str, float]) -> None:
        for key, value in epoch_scalars(logs).items():
            self.writer.add_scalar(key, value, int(logs['epoch']))
        self.writer.flush()

    def on_fit_end(self, trainer: TrainerState) -> None:
        if self.writer is not None:
            self.writer.close()


class WandBLogger(FinetunerCallback):
    """A Weights & Biases run per training attempt, offline unless ``WANDB_MODE`` says otherwise.

    Finetuner's ``WandBLogger``, its arguments too: given to ``fit()`` or ``/train`` it stands for
    ``loggers=['tensorboard', 'wandb']`` (both steps are logged; ``wandb_args`` is refused: W&B's environment variables
    set the project); the run builds the one that runs, with its ``output_dir``.

    Steps: ``train/*`` against ``step`` (optimizer steps), ``epoch/*`` against ``epoch``. The artifact is logged as a
    W&B artifact of type ``model`` named ``<run name>-model``. System statistics and metadata are not collected.
    """

    internal = ('output_dir',)

    def __init__(
        self,
        metrics_logger_step: Literal['batch', 'epoch'] = 'epoch',
        wandb_args: dict[str, Any] | None = None,
        log_zero_shot: bool = True,
        output_dir: Path | None = None,
    ) -> None:
        self.metrics_logger_step, self.wandb_args, self.log_zero_shot = metrics_logger_step, wandb_args, log_zero_shot
        self.output_dir = output_dir
        self.name = re.sub(r'[^\w.-]', '-', output_dir.resolve().name) if output_dir is not None else None
        self.run = None
        self.logged_artifact = False

    def _folders(self) -> dict[str, str]:
        return {'WANDB_DATA_DIR': str(self.output_dir / 'wandb'), 'WANDB_CACHE_DIR': str(self.output_dir / 'wandb')}

    def on_fit_start(self, trainer: TrainerState) -> None:
        wandb = _require('wandb')
        mode = os.environ.get('WANDB_MODE') or 'offline'
        settings = wandb.Settings(silent=True, console='off', x_disable_stats=True, x_disable_meta=True)
        with _environment_defaults(**self._folders()):
            self.run = wandb.init(
                project=os.environ.get('WANDB_PROJECT') or PROJECT,
                name=self.name,
                dir=str(self.output_dir),
                config=run_config(self.output_dir),
                mode=mode,
                settings=settings,
                reinit='create_new',
            )
        self.run.define_metric('step')
        self.run.define_metric('train/*', step_metric='step')
        self.run.define_metric('epoch')
        self.run.define_metric('epoch/*', step_metric='epoch')
        logger.info('logging to Weights & Biases (%s) in %s', mode, self.run.dir)

    def on_batch_end(self, trainer: TrainerState, loss: float) -> None:
        self.run.log({'train/batch_loss': loss, 'step': trainer.step})

    def on_epoch_end(self, trainer: TrainerState, logs: dict[str, float]) -> None:
        self.run.log({**epoch_scalars(logs), 'epoch': int(logs['epoch'])})

    def on_artifact(self, trainer: TrainerState, folder: Path) -> None:
        wandb = _require('wandb')
        with _environment_defaults(**self._folders()):  # where the artifact's files are staged
            model = wandb.Artifact(f'{self.name}-model', type='model', metadata={'run_folder': str(folder)})
            for path in artifact_files(folder):
                model.add_file(str(path), name=path.relative_to(folder).as_posix())
            self.run.log_artifact(model)
        self.logged_artifact = True

    def on_fit_end(self, trainer: TrainerState) -> None:
        if self.run is not None:
            with _environment_defaults(**self._folders()):
                self.run.finish(exit_code=0 if self.logged_artifact else 1)
            self.run = None


def mlflow_name(key: str) -> str:
    """``key`` as MLflow takes a metric or parameter name."""
    return _MLFLOW_BAD.sub('_', key.replace('@', '_at_'))


def flat_params(config: dict[str, Any], prefix: str = '') -> dict[str, str]:
    """A nested configuration as MLflow parameters: ``scheduler_options.num_warmup_steps`` -> ``'0.05'``."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f'{prefix}{key}'
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f'{name}.'))
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        out[mlflow_name(name)] = text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + '...'
    return out


class MlflowLogger(Callback):
    """An MLflow run, in a file store under ``<output_dir>/mlruns`` unless ``MLFLOW_TRACKING_URI`` is set.

    The artifact's files go under the run's artifact path ``model/``. A resumed run continues the same MLflow run
    (its id is kept in the checkpoint).
    """

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.client = None
        self.run_id: str | None = None
        self.logged_artifact = False

    def _connect(self) -> Any:
        _require('mlflow')
        from mlflow.tracking import MlflowClient

        uri = os.environ.get('MLFLOW_TRACKING_URI')
        if not uri:
            uri = (self.output_dir / 'mlruns').resolve().as_uri()
            os.environ.setdefault('MLFLOW_ALLOW_FILE_STORE', 'true')  # MLflow 3 refuses its file store without it
        return MlflowClient(tracking_uri=uri)

    def on_fit_start(self, trainer: TrainerState) -> None:
        self.client = self._connect()
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        if self.run_id is not None:  # resumed: the run of the earlier attempt continues
            try:
                self.client.update_run(self.run_id, status='RUNNING')
                return
            except MlflowException:
                logger.warning('MLflow run %s of the earlier attempt is gone; starting a new one', self.run_id)
        name = os.environ.get('MLFLOW_EXPERIMENT_NAME') or PROJECT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=self.output_dir.resolve().name)
        self.run_id = run.info.run_id
        params = [Param(key, value) for key, value in flat_params(run_config(self.output_dir)).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        logger.info('logging to MLflow run %s at %s', self.run_id, self.client.tracking_uri)

    def on_batch_end(self, trainer: TrainerState, loss: float) -> None:
        self.client.log_metric(self.run_id, 'train/batch_loss', loss, step=trainer.step)

    def on_epoch_end(self, trainer: TrainerState, logs: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now, epoch = int(time.time() * 1000), int(logs['epoch'])
        metrics = [Metric(mlflow_name(k), v, now, epoch) for k, v in epoch_scalars(logs).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def on_artifact(self, trainer: TrainerState, folder: Path) -> None:
        for path in artifact_files(folder):
            where = Path('model') / path.relative_to(folder).parent
            self.client.log_artifact(self.run_id, str(path), artifact_path=where.as_posix())
        self.logged_artifact = True

    def on_fit_end(self, trainer: TrainerState) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, 'FINISHED' if self.logged_artifact else 'FAILED')

    def state_dict(self) -> dict[str, Any]:
        return {'run_id': self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get('run_id')
