"""The training loop: AMP, channels_last, schedulers, callbacks, checkpoint and exact resume, DDP.

``fit(model=..., train_data=..., loss=..., epochs=...)`` is the whole API: Finetuner's names, run on this machine.
What is trained, on which batches and how its loss is computed is the run's ``Task`` (``tasks/``); how items become
batches is the model's ``Inputs`` (``inputs/``). The loop here knows neither images nor objectives.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from executor.tuning import artifact
from executor.tuning.callbacks import BestModelCheckpoint, Callback, EarlyStopping, EvaluationCallback, ProgressBar
from executor.tuning.config import TrainConfig
from executor.tuning.data import BatchSampler, Collate, ItemDataset
from executor.tuning.devices import to_device
from executor.tuning.distributed import agree_on_minimum, check_local_world, init_distributed, training_device
from executor.tuning.evaluation import Evaluator, ModelEmbedder
from executor.tuning.files import atomic_torch_save, atomic_write_json, atomic_write_text
from executor.tuning.finetuner_compat import finetuner_config
from executor.tuning.hard_negatives import MINED_FILE, mine_hard_negatives
from executor.tuning.inputs import Batch
from executor.tuning.models import EmbeddingModel, TwoTowerModel, save_model
from executor.tuning.optim import build_optimizer, parameter_groups
from executor.tuning.plan import RunPlan, config_record, plan_run, read_items, write_items
from executor.tuning.reports import write_reports
from executor.tuning.schedulers import build_scheduler
from executor.tuning.trackers import tracker_callbacks
from executor.tuning.wise_ft import WiSEFT

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What a finished run leaves: the trained model and where its artifact lies."""

    model: EmbeddingModel
    output_dir: Path
    artifact: Path
    history: list[dict[str, float]] = field(default_factory=list)
    onnx: Path | None = None
    metrics_before: dict[str, float] | None = None
    metrics_after: dict[str, float] | None = None


class Trainer:
    """Trains one run as its ``RunPlan`` describes it; see ``fit`` for the usual entry point."""

    def __init__(self, plan: RunPlan | TrainConfig) -> None:
        """``plan``: the run as ``plan_run`` decided it (a ``TrainConfig`` is planned here first)."""
        plan = plan if isinstance(plan, RunPlan) else plan_run(plan)
        config = plan.config
        torch.manual_seed(config.seed)  # before the model exists: random heads and inits are part of the run
        self.device = training_device(config.device)
        self.world, self.rank = init_distributed(self.device)
        check_local_world(config.num_devices)
        self.plan, self.config, self.task = plan, config, plan.task
        self.items, self.class_names = plan.items, plan.class_names
        self.output_dir = Path(config.output_dir or Path('runs') / time.strftime('run-%Y%m%d-%H%M%S'))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.model = self._build_model()
        self.wise_ft = WiSEFT(self.model.backbone, config.wise_ft_alpha)
        self.task.build(self.model, self.class_names, self.world)
        self._place_on_device()
        self.epoch, self.step, self.should_stop = 0, 0, False
        self.mined_epoch: int | None = None  # the epoch the hard negatives were mined before (None: not mined)
        self.items = self._training_rows(reuse=True)
        self.batch_size = self._batch_size()
        self._build_loader()
        self._build_optimizers()
        cuda = self.device.type == 'cuda'
        self.amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
        self.use_amp = config.amp and cuda
        self.scaler = torch.amp.GradScaler('cuda', enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.history: list[dict[str, float]] = []
        self.metrics_before: dict[str, float] | None = None
        self.metrics_after: dict[str, float] | None = None
        self.callbacks = self._callbacks() if self.rank == 0 else []  # evaluation, checkpoints, logs: rank 0

    # --- set-up ---------------------------------------------------------------------------------------------------

    def _build_model(self) -> EmbeddingModel | TwoTowerModel:
        config = self.config
        model = self.task.build_model(self.class_names)
        # Small class-balanced batches make poor BatchNorm statistics: measured on digits (efficientnet_lite0, 64 px,
        # 3 epochs) ndcg@10 went 0.785 -> 0.934 with pre-trained statistics kept, 0.785 -> 0.474 with them updated.
        model.freeze_batchnorm = (
            config.freeze_batchnorm
            if config.freeze_batchnorm is not None
            else bool(config.pretrained or config.weights)
        )
        model.inputs = model.inputs.with_options(**config.input_options())
        return model

    def _place_on_device(self) -> None:
        self.model.to(self.device)
        # channels_last speeds up convolutions (design §3: 7.2 -> 19.8 img/s training efficientnet-lite0 on CPU)
        self.channels_last = self.config.channels_last and any(isinstance(m, nn.Conv2d) for m in self.model.modules())
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        for module in self.task.modules():
            module.to(self.device)
        self.net: nn.Module = self.model
        if self.world > 1:
            device_ids = [self.device.index] if self.device.type == 'cuda' else None
            self.net = DistributedDataParallel(self.model, device_ids=device_ids)

    def _batch_size(self) -> int:
        batch_size = self._auto_batch_size() if self.config.auto_batch_size else self.config.batch_size
        if batch_size > len(self.items):
            logger.warning(
                'batch_size=%d is larger than the %d training items; using %d',
                batch_size,
                len(self.items),
                len(self.items),
            )
            batch_size = len(self.items)
        if batch_size % self.world:
            raise ValueError(
                f'batch_size={batch_size} is the global batch and must divide among {self.world} '
                f'processes; use a multiple of {self.world}'
            )
        return batch_size

    def _training_rows(self, reuse: bool) -> list:
        """The plan's items, or with ``hard_negatives`` the rows mined from them with the model as it is now: rank 0
        mines and saves them as ``hard_negatives.jsonl`` in the run folder, which a resumed run (``reuse``) reads
        back instead of mining again."""
        options = self.config.hard_negatives
        if options is None:
            return self.plan.items
        saved = self.output_dir / MINED_FILE
        if not (reuse and saved.is_file()):
            if self.rank == 0:
                mined = mine_hard_negatives(
                    self.plan.items, self.plan.corpus, self.embedder(options.batch_size), options, self.config.seed
                )
                write_items(self.output_dir, Path(MINED_FILE).stem, mined.rows)
                atomic_write_json(self.output_dir / 'hard_negatives_stats.json', {'epoch': self.epoch, **mined.stats})
            if self.world > 1:
                dist.barrier()  # rank 0 has written the rows every rank reads
        else:
            logger.info('hard negatives: reusing %s', saved)
        self.mined_epoch = self.epoch
        return read_items(self.output_dir, Path(MINED_FILE).stem)

    def _build_loader(self) -> None:
        config, task = self.config, self.task
        self.dataset = ItemDataset(
            self.items, self.model.inputs, task.train_transform(self.model.inputs), self.class_names, views=task.views
        )
        self.sampler = BatchSampler(
            self.dataset.labels,
            self.batch_size // self.world,
            task.sampler_mode(),
            config.num_items_per_class,
            config.seed,
            num_replicas=self.world,
            rank=self.rank,
        )
        self.loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=Collate(self.model.inputs, task.views),
            num_workers=config.num_workers,
            pin_memory=self.device.type == 'cuda',
            persistent_workers=config.num_workers > 0,
        )

    def _build_optimizers(self) -> None:
        config = self.config
        heads = [m for m in (self.model.classifier, *self.task.heads.values()) if m is not None]
        groups = parameter_groups(self.model, heads, config.learning_rate)
        self.optimizer = build_optimizer(
            config.optimizer, groups, config.learning_rate, config.optimizer_options, 'optimizer'
        )
        self.loss_optimizer = (
            build_optimizer(
                config.loss_optimizer,
                self.loss.module.parameters(),
                None,
                config.loss_optimizer_options,
                'loss_optimizer',
            )
            if self.loss.has_parameters
            else None
        )
        self.steps_per_epoch = max(1, len(self.sampler) // config.accumulate_grad_batches)
        self.epochs = config.epochs
        self.total_steps = self.steps_per_epoch * self.epochs
        schedule = (config.scheduler, self.optimizer, self.total_steps, config.scheduler_options)
        self.scheduler = build_scheduler(*schedule, steps_per_epoch=self.steps_per_epoch)

    def _auto_batch_size(self) -> int:
        """The largest global batch whose training step fits in memory (``auto_batch_size``), kept for the run."""
        from executor.tuning.batch_size import find_batch_size

        classes = len(self.class_names or []) or 2

        def trial(batch: int) -> None:
            per_rank = batch // self.world
            labels = torch.arange(per_rank, device=self.device) % classes
            self.model.train()
            try:
                self.compute_loss(
                    self.to_device(self.model.inputs.random_batch(per_rank * self.task.views)), labels
                ).backward()
            finally:
                for module in (self.model, *self.task.modules()):
                    module.zero_grad(set_to_none=True)

        found = find_batch_size(
            trial,
            start=self.config.batch_size,
            maximum=len(self.items),
            multiple=self.world * self.task.batch_multiple(),
        )
        return agree_on_minimum(found, self.device, self.world)  # every rank takes a batch that fitted everywhere

    def _callbacks(self) -> list[Callback]:
        config, evaluation = self.config, self.plan.evaluation
        evaluator = self.task.evaluator(*evaluation, config.limit) if evaluation is not None else None
        watched = getattr(evaluator, 'monitor', None) or self.task.monitor  # correlations watch spearman_cosine
        self.monitor = config.monitor or (watched if evaluator is not None else 'train_loss')
        return run_callbacks(config, evaluator, self.monitor, self.output_dir)

    @property
    def loss(self):
        """The task's ``LossSpec`` (its module holds the loss's own parameters, if any)."""
        return self.task.loss

    @property
    def raw_model(self) -> EmbeddingModel:
        return self.model

    def embedder(self, batch_size: int = 64) -> ModelEmbedder:
        """What evaluators embed the items with: the model as it is now, in eval mode for the while."""
        return ModelEmbedder(self.model, self.device, batch_size, self.channels_last)

    # --- the loop -------------------------------------------------------------------------------------------------

    def to_device(self, batch: Batch) -> Batch:
        return to_device(batch, self.device, self.channels_last)

    def compute_loss(self, batch: Batch, labels: torch.Tensor) -> torch.Tensor:
        return self.task.compute_loss(self.net, self.model, batch, labels)

    def _optimizer_step(self) -> None:
        if self.config.gradient_clip is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group['params']]
            torch.nn.utils.clip_grad_norm_(params, self.config.gradient_clip)
        self.scaler.step(self.optimizer)
        if self.loss_optimizer is not None:
            self.scaler.step(self.loss_optimizer)
            self.loss_optimizer.zero_grad(set_to_none=True)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1

    def train_epoch(self) -> float:
        options = self.config.hard_negatives
        if options is not None and options.mine_every_epoch and self.mined_epoch != self.epoch:
            self.items = self._training_rows(reuse=False)  # mined again with the model as it is now
            self._build_loader()
        self.model.train()
        self.sampler.set_epoch(self.epoch)
        accumulate = self.config.accumulate_grad_batches
        autocast = torch.autocast('cuda', dtype=self.amp_dtype) if self.use_amp else nullcontext()
        total, count = 0.0, 0
        for i, (batch, labels) in enumerate(self.loader):
            batch, labels = self.to_device(batch), labels.to(self.device, non_blocking=True)
            with autocast:
                loss = self.compute_loss(batch, labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f'loss is {loss.item()} at epoch {self.epoch + 1}, batch {i}: lower '
                    'learning_rate or set gradient_clip'
                )
            self.scaler.scale(loss / accumulate).backward()
            value = loss.item() / self.task.loss_scale
            total, count = total + value, count + 1
            if (i + 1) % accumulate == 0:
                self._optimizer_step()
                for callback in self.callbacks:
                    callback.on_batch_end(self, value)
        return total / max(1, count)

    def fit(self, resume: bool = False) -> FitResult:
        """Train ``epochs`` epochs (continuing from the last checkpoint when ``resume``) and save the artifact."""
        if resume:
            self.load_checkpoint(self.output_dir / artifact.CHECKPOINT)
        if self.rank == 0:
            self._write_config()
        for callback in self.callbacks:
            callback.on_fit_start(self)
        try:
            while self.epoch < self.epochs and not self.should_stop:
                self._run_epoch()
            result = self._finish()
        finally:
            for callback in self.callbacks:
                callback.on_fit_end(self)
        return result

    def _run_epoch(self) -> None:
        started = time.perf_counter()
        train_loss = self.train_epoch()
        self.epoch += 1
        logs = {
            'epoch': float(self.epoch),
            'train_loss': train_loss,
            'lr': self.optimizer.param_groups[0]['lr'],
            'epoch_seconds': time.perf_counter() - started,
        }
        for callback in self.callbacks:
            callback.on_epoch_end(self, logs)
        if self.world > 1:  # every rank follows rank 0's metrics and stopping decision
            shared = [logs, self.should_stop]
            dist.broadcast_object_list(shared, src=0)
            logs, self.should_stop = shared
        self.history.append(logs)
        if self.rank == 0:
            self._write_history()
            self.save_checkpoint(self.output_dir / artifact.CHECKPOINT)
            for callback in self.callbacks:
                callback.on_checkpoint(self, logs)
        logger.info(
            'epoch %d/%d: %s',
            self.epoch,
            self.epochs,
            ', '.join(f'{k}={v:.4g}' for k, v in logs.items() if k != 'epoch'),
        )

    def _finish(self) -> FitResult:
        if self.rank != 0:
            dist.barrier()  # rank 0 is writing the artifact
            return FitResult(self.model, self.output_dir, self.output_dir / artifact.MODEL_FILE, self.history)
        result = self._save_artifact()
        for callback in self.callbacks:
            callback.on_artifact(self, self.output_dir)
        if self.world > 1:
            dist.barrier()
        return result

    def _save_artifact(self) -> FitResult:
        best = next((c for c in self.callbacks if isinstance(c, BestModelCheckpoint)), None)
        if best is not None and best.best_state is not None:
            self.model.load_state_dict(best.best_state)
            logger.info('final model: epoch %d, best %s=%.4f', best.best_epoch, best.monitor, best.best)
        self.wise_ft.apply(self.model.backbone)
        self.model.to('cpu', memory_format=torch.contiguous_format).eval()
        self.device = torch.device('cpu')  # where the final evaluation runs, beside the model
        model_file = save_model(self.model, self.output_dir / artifact.MODEL_FILE)
        artifact.write_preprocessing(self.output_dir, self.model)
        evaluation = next((c for c in self.callbacks if isinstance(c, EvaluationCallback)), None)
        self.metrics_after = write_reports(
            self.output_dir / artifact.REPORTS_DIR,
            self.history,
            self.metrics_before,
            evaluation and evaluation.evaluator,
            evaluation and self.embedder(evaluation.batch_size),
            self.model.inputs,
        )
        onnx_path = None
        if self.config.to_onnx:
            from executor.tuning.export import export_onnx, export_towers

            if isinstance(self.model, TwoTowerModel):  # one file per tower, in a folder each
                export_towers(self.model, self.output_dir)
            else:
                onnx_path = export_onnx(self.model, self.output_dir / artifact.ONNX_FILE).path
        return FitResult(
            self.model, self.output_dir, model_file, self.history, onnx_path, self.metrics_before, self.metrics_after
        )

    # --- checkpoints ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs after an epoch: weights, optimizers, schedule, scaler, heads, RNG states,
        the callbacks' state, the history and the pre-training metrics."""
        return {
            'epoch': self.epoch,
            'step': self.step,
            'history': self.history,
            'model': self.model.state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'loss': self.loss.module.state_dict(),
            'loss_optimizer': self.loss_optimizer.state_dict() if self.loss_optimizer else None,
            'scheduler': self.scheduler.state_dict() if self.scheduler else None,
            'scaler': self.scaler.state_dict(),
            'heads': {name: head.state_dict() for name, head in self.task.heads.items()},
            'rng': torch.get_rng_state(),
            'cuda_rng': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            'callbacks': [c.state_dict() for c in self.callbacks],
            'metrics_before': self.metrics_before,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Back where ``state`` was taken, RNG included, so the run continues bit for bit."""
        self.model.load_state_dict(state['model'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.loss.module.load_state_dict(state['loss'])
        if self.loss_optimizer is not None:
            self.loss_optimizer.load_state_dict(state['loss_optimizer'])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state['scheduler'])
        # checkpoints written before tasks were classes kept the SimCLR head as `ssl_head`
        heads = state.get('heads') or {'ssl_head': state.get('ssl_head')}
        for name, head in self.task.heads.items():
            head.load_state_dict(heads[name])
        self.scaler.load_state_dict(state['scaler'])
        for callback, callback_state in zip(self.callbacks, state['callbacks']):
            callback.load_state_dict(callback_state)
        self.epoch, self.step, self.history = state['epoch'], state['step'], list(state['history'])
        self.metrics_before = state['metrics_before']
        torch.set_rng_state(state['rng'].cpu())
        if state['cuda_rng'] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda_rng']])

    def save_checkpoint(self, path: Path) -> None:
        atomic_torch_save(self.state_dict(), path)

    def load_checkpoint(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f'no checkpoint at {str(path)!r} to resume from; the run never finished an epoch')
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
        logger.info('resumed from %s at epoch %d, step %d', path, self.epoch, self.step)

    def _write_config(self) -> None:
        config = config_record(self.config)
        config.update(task=self.task.name, class_names=self.class_names, device=str(self.device))
        atomic_write_json(self.output_dir / artifact.CONFIG_FILE, config)

    def _write_history(self) -> None:
        atomic_write_text(
            self.output_dir / artifact.HISTORY_FILE, ''.join(json.dumps(row) + '\n' for row in self.history)
        )


def fit(config: TrainConfig | None = None, *, resume: bool = False, **kwargs: Any) -> FitResult:
    """Fine-tune a model. Takes a ``TrainConfig`` or its fields as keywords (Finetuner's ``fit`` names).

    >>> result = fit(model='efficientnet_lite0', train_data='data/train.csv', loss='TripletMarginLoss', epochs=2,
    ...              output_dir='runs/demo')  # doctest: +SKIP
    >>> result.artifact  # runs/demo/model.pt  # doctest: +SKIP
    """
    if config is not None and kwargs:
        raise TypeError(f'pass a TrainConfig or keyword arguments, not both (got config and {sorted(kwargs)})')
    config = config if config is not None else finetuner_config(**kwargs)
    return Trainer(plan_run(config)).fit(resume=resume)


def run_callbacks(config: TrainConfig, evaluator: Evaluator | None, monitor: str, output_dir: Path) -> list[Callback]:
    """A run's callbacks, in the order they run: evaluation first (the others watch its metrics), best model, early
    stopping, the caller's own, the trackers of ``loggers`` (TensorBoard, W&B, MLflow), the progress bar (unless
    ``FINETUNER_PROGRESS=0``)."""
    callbacks: list[Callback] = []
    if evaluator is not None:
        callbacks.append(EvaluationCallback(batch_size=64, evaluator=evaluator))
    if config.save_best and evaluator is not None:
        callbacks.append(BestModelCheckpoint(monitor))
    if config.early_stopping_patience is not None:
        callbacks.append(
            EarlyStopping(
                monitor,
                patience=config.early_stopping_patience,
                min_delta=config.early_stopping_min_delta,
                baseline=config.early_stopping_baseline,
            )
        )
    callbacks += list(config.callbacks)
    callbacks += tracker_callbacks(config.active_loggers, output_dir)
    if os.environ.get('FINETUNER_PROGRESS', '1') != '0':
        callbacks.append(ProgressBar())
    return callbacks
