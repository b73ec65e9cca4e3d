"""The training loop: class-balanced batches, AMP, channels_last, schedulers, callbacks, checkpoint and exact resume.

``fit(model=..., train_data=..., loss=..., epochs=...)`` is the whole API: Finetuner's names, run on this machine.
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from executor.tuning import callbacks as cb
from executor.tuning.config import TrainConfig
from executor.tuning.data import (BatchSampler, DataError, ImageDataset, Item, eval_transform, load_items,
                                  simclr_transform, train_transform)
from executor.tuning.losses import build_loss, build_miner
from executor.tuning.models import EmbeddingModel, ProjectionHead, build_model, save_model
from executor.tuning.schedulers import build_scheduler

logger = logging.getLogger(__name__)

CHECKPOINT = 'checkpoints/last.pt'
MODEL_FILE = 'model.pt'
HISTORY_FILE = 'history.jsonl'
SSL_PROJECTION_DIM = 128
HEAD_LR_FACTOR = 10.0


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


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(world size, rank): joins the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    NCCL on GPUs, gloo on CPU (also on a machine with GPUs when ``device='cpu'``); the rendezvous comes from
    torchrun's environment (``MASTER_ADDR``/``MASTER_PORT``).
    """
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1:
        return 1, 0
    if not dist.is_initialized():
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        if device.type == 'cuda':
            torch.cuda.set_device(device)  # NCCL's barrier and communicators use the current GPU, not GPU 0 for all
        dist.init_process_group(backend)
        logger.info('joined %s process group as rank %d of %d', backend, dist.get_rank(), dist.get_world_size())
    return dist.get_world_size(), dist.get_rank()


def resolve_device(device: str) -> torch.device:
    """The device of this process: under ``torchrun``, 'auto' and 'cuda' mean the GPU of its ``LOCAL_RANK``."""
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'device={device!r} but no CUDA device is visible; use device="cpu" or "auto"')
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda' and int(os.environ.get('WORLD_SIZE', '1')) > 1:
        return torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
    return torch.device(device)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    torch.save(obj, tmp)
    os.replace(tmp, path)


def describe_data(data: Any) -> Any:
    """A JSON-able description of a data argument (paths as they are, documents as a count)."""
    if data is None or isinstance(data, (str, os.PathLike)):
        return None if data is None else str(data)
    return f'<{len(data)} documents>'


def check_labels(items: Sequence[Item], task: str) -> list[str] | None:
    """The sorted class names, after checking that supervised data is fully labelled and usable."""
    labelled = [it for it in items if it.label is not None]
    if task == 'self_supervised':
        return None
    missing = [it.id for it in items if it.label is None]
    if missing:
        raise DataError(f'{len(missing)} training items have no label ({missing[:3]}...), but the loss is supervised; '
                        'label every item or use loss="NTXentLoss" on unlabelled data')
    classes = sorted({it.label for it in labelled})
    if len(classes) < 2:
        raise DataError(f'training data has {len(classes)} class ({classes}); supervised training needs at least 2')
    if task == 'metric':
        counts = {c: 0 for c in classes}
        for it in labelled:
            counts[it.label] += 1
        single = [c for c, n in counts.items() if n < 2]
        if single:
            raise DataError(f'classes {single[:5]} have a single item: metric learning needs at least 2 items per '
                            'class (a positive pair); add items or drop those classes')
    return classes


class Trainer:
    """Trains one run described by a ``TrainConfig``; see ``fit`` for the usual entry point."""

    def __init__(self, config: TrainConfig) -> None:
        torch.manual_seed(config.seed)  # before the model exists: random heads and inits are part of the run
        self.device = resolve_device(config.device)
        self.world, self.rank = init_distributed(self.device)
        local = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
        if config.num_devices > 1 and local != config.num_devices:
            raise ValueError(
                f'num_devices={config.num_devices} asks for that many processes on this machine, but this one runs '
                f'among {local}; torchrun starts them: train through the service (/train num_devices=...) or run '
                f'`torchrun --nproc-per-node {config.num_devices} -m executor.tuning run.json` (num_devices=1 when '
                'torchrun decides the count)')
        roots = config.data_roots
        if config.train_data is None:
            raise DataError('train_data is missing: pass a CSV path, an image folder or a list of documents')
        self.items = load_items(config.train_data, roots)
        if len(self.items) < 2:
            raise DataError(f'training data has {len(self.items)} item; training needs at least 2 (one batch)')
        labelled = any(it.label is not None for it in self.items)
        self.config = config = config.resolved(labelled)
        self.task = config.task(labelled)
        self.class_names = check_labels(self.items, 'self_supervised' if self.task == 'self_supervised' else
                                        'classification' if self.task in ('classification', 'linear_probe') else 'metric')
        self.output_dir = Path(config.output_dir or Path('runs') / time.strftime('run-%Y%m%d-%H%M%S'))
        self.output_dir.mkdir(parents=True, exist_ok=True)

        self.model = build_model(
            config.model, weights=config.weights, pretrained=config.pretrained, freeze=config.freeze,
            embedding_layer=config.embedding_layer, output_dim=config.output_dim, pooler=config.pooler,
            class_names=self.class_names if self.task in ('classification', 'linear_probe') else None,
        )
        # Small class-balanced batches make poor BatchNorm statistics: measured on digits (efficientnet_lite0, 64 px,
        # 3 epochs) ndcg@10 went 0.785 -> 0.934 with pre-trained statistics kept, 0.785 -> 0.474 with them updated.
        self.model.freeze_batchnorm = (config.freeze_batchnorm if config.freeze_batchnorm is not None
                                       else bool(config.pretrained or config.weights))
        if config.image_size is not None:
            self.model.data_config['input_size'] = (3, config.image_size, config.image_size)
        self.ssl_head = (ProjectionHead(self.model.embed_dim, SSL_PROJECTION_DIM, config.projection_layers)
                         if self.task == 'self_supervised' else None)

        self.loss = build_loss(config.loss, config.loss_options, num_classes=len(self.class_names or []) or None,
                               embedding_size=self.model.embed_dim, labelled=self.task != 'self_supervised')
        self.miner = build_miner(config.miner, config.miner_options)
        # Under DDP, metric losses and miners see the embeddings of every rank, so negatives come from the global
        # batch; PML's wrapper scales the loss by the world size to undo DDP's gradient averaging.
        self.loss_fn: nn.Module = self.loss.module
        if self.world > 1 and isinstance(self.loss.module, BaseMetricLossFunction) and self.task == 'metric':
            self.loss_fn = DistributedLossWrapper(self.loss.module)
            self.miner = DistributedMinerWrapper(self.miner) if self.miner is not None else None
        self.loss_scale = self.world if isinstance(self.loss_fn, DistributedLossWrapper) else 1

        self.model.to(self.device)
        self.channels_last = config.channels_last and any(isinstance(m, nn.Conv2d) for m in self.model.modules())
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.loss.module.to(self.device)
        if self.ssl_head is not None:
            self.ssl_head.to(self.device)
        self.net: nn.Module = self.model
        if self.world > 1:
            device_ids = [self.device.index] if self.device.type == 'cuda' else None
            self.net = DistributedDataParallel(self.model, device_ids=device_ids)

        batch_size = self._auto_batch_size() if config.auto_batch_size else config.batch_size
        if batch_size > len(self.items):
            logger.warning('batch_size=%d is larger than the %d training items; using %d', batch_size, len(self.items),
                           len(self.items))
            batch_size = len(self.items)
        if batch_size % self.world:
            raise ValueError(f'batch_size={batch_size} is the global batch and must divide among {self.world} '
                             f'processes; use a multiple of {self.world}')
        self.batch_size = batch_size
        transform = (simclr_transform(self.model.data_config) if self.task == 'self_supervised' else
                     train_transform(self.model.data_config, config.augmentation))
        self.dataset = ImageDataset(self.items, transform, self.class_names,
                                    views=2 if self.task == 'self_supervised' else 1)
        use_class = self.task == 'metric' and config.sampler in ('auto', 'class')
        self.sampler = BatchSampler(self.dataset.labels, batch_size // self.world, 'class' if use_class else 'random',
                                    config.num_items_per_class, config.seed, num_replicas=self.world, rank=self.rank)
        self.loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=config.num_workers,
                                 pin_memory=self.device.type == 'cuda', persistent_workers=config.num_workers > 0)


        # New heads start from random weights: next to a fine-tuned backbone they learn at HEAD_LR_FACTOR x its rate.
        # Measured on digits (full fine-tune from lr 1e-4, 5 epochs): accuracy 0.70 with one rate, 0.72 with this.
        heads = [m for m in (self.model.classifier, self.ssl_head) if m is not None]
        head_params = {id(p) for m in heads for p in m.parameters()}
        backbone = [p for p in self.model.parameters() if p.requires_grad and id(p) not in head_params]
        head = [p for m in heads for p in m.parameters() if p.requires_grad]
        if not backbone and not head:
            raise ValueError('every parameter is frozen: nothing to train; freeze fewer layers')
        lr = config.learning_rate
        head_lr = lr * HEAD_LR_FACTOR if backbone else lr
        groups = [g for g in ({'params': backbone}, {'params': head, 'lr': head_lr}) if g['params']]
        self.optimizer = _optimizer(config.optimizer, groups, lr, config.optimizer_options, 'optimizer')
        self.loss_optimizer = (_optimizer(config.loss_optimizer, self.loss.module.parameters(), None,
                                          config.loss_optimizer_options, 'loss_optimizer')
                               if self.loss.has_parameters else None)
        self.steps_per_epoch = max(1, len(self.sampler) // config.accumulate_grad_batches)
        self.epochs = config.epochs
        self.total_steps = self.steps_per_epoch * self.epochs
        self.scheduler = build_scheduler(config.scheduler, self.optimizer, self.total_steps, config.scheduler_options)

        cuda = self.device.type == 'cuda'
        self.amp_dtype = (torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16)
        self.use_amp = config.amp and cuda
        self.scaler = torch.amp.GradScaler('cuda', enabled=self.use_amp and self.amp_dtype == torch.float16)

        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.should_stop = False
        self.metrics_before: dict[str, float] | None = None
        self.metrics_after: dict[str, float] | None = None
        self.callbacks = self._callbacks() if self.rank == 0 else []  # evaluation, checkpoints, logs: rank 0

    def _auto_batch_size(self) -> int:
        """The largest global batch whose training step fits in memory (``auto_batch_size``), kept for the run."""
        from executor.tuning.batch_size import find_batch_size

        c, h, w = self.model.data_config['input_size']
        classes = len(self.class_names or []) or 2
        multiple = self.world * (self.config.num_items_per_class if self.task == 'metric' else 1)
        views = 2 if self.task == 'self_supervised' else 1

        def trial(batch: int) -> None:
            per_rank = batch // self.world
            images = torch.randn(per_rank, views, c, h, w) if views > 1 else torch.randn(per_rank, c, h, w)
            labels = torch.arange(per_rank, device=self.device) % classes
            self.model.train()
            try:
                self.compute_loss(self._to_device(images), labels).backward()
            finally:
                self.model.zero_grad(set_to_none=True)
                self.loss.module.zero_grad(set_to_none=True)
                if self.ssl_head is not None:
                    self.ssl_head.zero_grad(set_to_none=True)

        found = find_batch_size(trial, start=self.config.batch_size, maximum=len(self.items), multiple=multiple)
        if self.world > 1:  # every rank takes the smallest batch that fitted everywhere
            shared = torch.tensor([found], device=self.device)
            dist.all_reduce(shared, op=dist.ReduceOp.MIN)
            found = int(shared.item())
        return found

    @property
    def raw_model(self) -> EmbeddingModel:
        return self.model

    def _callbacks(self) -> list[cb.Callback]:
        config = self.config
        callbacks: list[cb.Callback] = []
        if config.query_data is not None:
            callbacks.append(cb.EvaluationCallback(load_items(config.query_data, config.data_roots),
                                                   load_items(config.index_data, config.data_roots), config.limit))
        elif config.eval_data is not None:
            callbacks.append(cb.EvaluationCallback(load_items(config.eval_data, config.data_roots), None, config.limit))
        self.monitor = config.monitor or (self.default_monitor() if callbacks else 'train_loss')
        if config.save_best and callbacks:
            callbacks.append(cb.BestModel(self.monitor))
        if config.early_stopping_patience is not None:
            callbacks.append(cb.EarlyStopping(self.monitor, config.early_stopping_patience))
        callbacks += list(config.callbacks)
        if config.tensorboard:
            callbacks.append(cb.TensorBoardLogger(str(self.output_dir / 'tensorboard')))
        if os.environ.get('FINETUNER_PROGRESS', '1') != '0':
            callbacks.append(cb.ProgressBar())
        return callbacks

    def default_monitor(self) -> str:
        return 'accuracy' if self.task in ('classification', 'linear_probe') else 'ndcg@10'

    # --- the loop -------------------------------------------------------------------------------------------------

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if images.ndim == 5:  # (B, views, 3, H, W) -> (views * B, 3, H, W), view-major so halves are the views
            images = images.transpose(0, 1).flatten(0, 1)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def compute_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embeddings = self.net(images)  # (B, D)
        if self.task == 'self_supervised':
            projected = self.ssl_head(embeddings)  # (2B, P)
            first, second = projected.chunk(2)
            return self.loss.module(first, second)
        if self.task in ('classification', 'linear_probe'):
            return self.loss.module(self.model.classifier(embeddings), labels)
        embeddings = embeddings.float()
        indices = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss_fn(embeddings, labels, indices)

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
        self.model.train()
        self.sampler.set_epoch(self.epoch)
        accumulate = self.config.accumulate_grad_batches
        autocast = torch.autocast('cuda', dtype=self.amp_dtype) if self.use_amp else nullcontext()
        total, count = 0.0, 0
        for i, (images, labels) in enumerate(self.loader):
            images, labels = self._to_device(images), labels.to(self.device, non_blocking=True)
            with autocast:
                loss = self.compute_loss(images, labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f'loss is {loss.item()} at epoch {self.epoch + 1}, batch {i}: lower '
                                         'learning_rate or set gradient_clip')
            self.scaler.scale(loss / accumulate).backward()
            value = loss.item() / self.loss_scale
            total, count = total + value, count + 1
            if (i + 1) % accumulate == 0:
                self._optimizer_step()
                for callback in self.callbacks:
                    callback.on_batch_end(self, value)
        return total / max(1, count)

    def fit(self, resume: bool = False) -> FitResult:
        """Train ``epochs`` epochs (continuing from the last checkpoint when ``resume``) and save the artifact."""
        if resume:
            self.load_checkpoint(self.output_dir / CHECKPOINT)
        if self.rank == 0:
            self._write_config()
        for callback in self.callbacks:
            callback.on_fit_start(self)
        try:
            while self.epoch < self.epochs and not self.should_stop:
                started = time.perf_counter()
                train_loss = self.train_epoch()
                self.epoch += 1
                logs = {'epoch': float(self.epoch), 'train_loss': train_loss,
                        'lr': self.optimizer.param_groups[0]['lr'], 'epoch_seconds': time.perf_counter() - started}
                for callback in self.callbacks:
                    callback.on_epoch_end(self, logs)
                if self.world > 1:  # every rank follows rank 0's metrics and stopping decision
                    shared = [logs, self.should_stop]
                    dist.broadcast_object_list(shared, src=0)
                    logs, self.should_stop = shared
                self.history.append(logs)
                if self.rank == 0:
                    self._write_history()
                    self.save_checkpoint(self.output_dir / CHECKPOINT)
                    for callback in self.callbacks:
                        callback.on_checkpoint(self, logs)
                logger.info('epoch %d/%d: %s', self.epoch, self.epochs,
                            ', '.join(f'{k}={v:.4g}' for k, v in logs.items() if k != 'epoch'))
        finally:
            for callback in self.callbacks:
                callback.on_fit_end(self)
        return self._finish()

    def _finish(self) -> FitResult:
        if self.rank != 0:
            dist.barrier()  # rank 0 is writing the artifact
            return FitResult(self.model, self.output_dir, self.output_dir / MODEL_FILE, self.history)
        result = self._save_artifact()
        if self.world > 1:
            dist.barrier()
        return result

    def _save_artifact(self) -> FitResult:
        best = next((c for c in self.callbacks if isinstance(c, cb.BestModel)), None)
        if best is not None and best.best_state is not None:
            self.model.load_state_dict(best.best_state)
            logger.info('final model: epoch %d, best %s=%.4f', best.best_epoch, best.monitor, best.best)
        self.model.to('cpu', memory_format=torch.contiguous_format).eval()
        artifact = save_model(self.model, self.output_dir / MODEL_FILE)
        atomic_write_text(self.output_dir / 'preprocessing.json', json.dumps(
            {'data_config': self.model.data_config, 'embed_dim': self.model.embed_dim,
             'class_names': self.model.class_names}, indent=2))
        self.write_reports()
        onnx_path = None
        if self.config.to_onnx:
            from executor.tuning.export import export_onnx

            onnx_path = export_onnx(self.model, self.output_dir / 'model.onnx').path
        return FitResult(self.model, self.output_dir, artifact, self.history, onnx_path, self.metrics_before,
                         self.metrics_after)

    def write_reports(self) -> None:
        """``reports/``: loss and metric curves, and the before/after table and bars when there was evaluation."""
        from executor.tuning import reports

        folder = self.output_dir / 'reports'
        folder.mkdir(exist_ok=True)
        if self.history:
            reports.plot_curves(self.history, folder)
        evaluation = next((c for c in self.callbacks if isinstance(c, cb.EvaluationCallback)), None)
        if evaluation is not None and self.metrics_before is not None:
            if self.task in ('classification', 'linear_probe'):
                self.metrics_after = evaluation.evaluate(self)
            else:  # the final evaluation's embeddings also rank the sprite's matches: the data is embedded once
                self.metrics_after, q_emb, i_emb = self.retrieval(evaluation.query_items, evaluation.index_items,
                                                                  evaluation.limit, evaluation.batch_size)
                self.plot_matches(evaluation.query_items, evaluation.index_items, q_emb, i_emb, folder)
            report = reports.display_metrics(self.metrics_before, self.metrics_after, folder)
            reports.plot_before_after(self.metrics_before, self.metrics_after, folder)
            logger.info('retrieval metrics before/after fine-tuning:\n%s', report.text)

    def plot_matches(self, query_items: Sequence[Item], index_items: Sequence[Item] | None, q_emb: torch.Tensor,
                     i_emb: torch.Tensor, folder: Path, queries: int = 6, k: int = 5) -> Path:
        """``matches.png``: a few queries (one per label, first seen first) and their top ``k`` by the embeddings
        ``q_emb`` ``(Q, D)`` and ``i_emb`` ``(I, D)`` of the items, relevant matches framed green; a query never
        matches itself when queries and index are the same set."""
        from executor.tuning import reports
        from executor.tuning.data import load_image
        from executor.tuning.evaluation import knn

        same = index_items is None
        index_items = query_items if same else index_items
        chosen = list({it.label: row for row, it in enumerate(query_items)}.values())[:queries]
        picked = [query_items[row] for row in chosen]
        _, neighbours = knn(q_emb[chosen], i_emb, min(k + same, len(index_items)))  # (len(chosen), k + same)
        matches, relevant = [], []
        for q, (row, query) in enumerate(zip(chosen, picked)):
            ranked = [col for col in neighbours[q].tolist() if not (same and col == row)][:k]
            matches.append([load_image(index_items[col].content, index_items[col].name) for col in ranked])
            relevant.append([index_items[col].label == query.label for col in ranked])
        images = [load_image(it.content, it.name) for it in picked]
        return reports.plot_matches(images, matches, relevant, folder)

    # --- evaluation -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, items: Sequence[Item], batch_size: int = 64) -> torch.Tensor:
        """Embeddings ``(N, D)`` of ``items`` with the evaluation transform, in eval mode."""
        dataset = ImageDataset(items, eval_transform(self.model.data_config))
        was_training = self.model.training
        self.model.eval()
        out = []
        for start in range(0, len(dataset), batch_size):
            batch = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])
            out.append(self.model(self._to_device(batch)).float().cpu())
        self.model.train(was_training)
        return torch.cat(out)

    def evaluate(self, query_items: Sequence[Item], index_items: Sequence[Item] | None, limit: int,
                 batch_size: int = 64) -> dict[str, float]:
        """Retrieval metrics (or accuracy for a classifier) of the current model on labelled items."""
        from executor.tuning.evaluation import classification_metrics

        if self.task in ('classification', 'linear_probe') and index_items is None:
            known = [it for it in query_items if it.label in self.model.class_names]
            if len(known) < len(query_items):
                logger.warning('%d evaluation items have labels the classifier was not trained on; skipped',
                               len(query_items) - len(known))
            logits = self.model.classifier(self.embed(known, batch_size).to(self.device)).cpu()
            labels = [self.model.class_names.index(it.label) for it in known]
            return classification_metrics(logits, labels, self.model.class_names)[0]
        return self.retrieval(query_items, index_items, limit, batch_size)[0]

    def retrieval(self, query_items: Sequence[Item], index_items: Sequence[Item] | None, limit: int,
                  batch_size: int = 64) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        """Retrieval metrics of the current model, with the query ``(Q, D)`` and index ``(I, D)`` embeddings they
        came from (the same tensor when ``index_items`` is None: the queries search each other, self excluded)."""
        from executor.tuning.evaluation import retrieval_metrics

        index_items = index_items if index_items is not None else query_items
        names = sorted({it.label for it in [*query_items, *index_items] if it.label is not None})
        ids = {n: i for i, n in enumerate(names)}
        q_labels = torch.tensor([ids.get(it.label, -1) for it in query_items])
        i_labels = torch.tensor([ids.get(it.label, -2) for it in index_items])
        q_emb = self.embed(query_items, batch_size)
        i_emb = q_emb if index_items is query_items else self.embed(index_items, batch_size)
        metrics = retrieval_metrics(q_emb, q_labels, i_emb, i_labels, limit=limit,
                                    exclude_self=index_items is query_items)
        return metrics, q_emb, i_emb

    # --- checkpoints ----------------------------------------------------------------------------------------------

    def save_checkpoint(self, path: Path) -> None:
        state = {
            'epoch': self.epoch, 'step': self.step, 'history': self.history,
            'model': self.raw_model.state_dict(), 'optimizer': self.optimizer.state_dict(),
            'loss': self.loss.module.state_dict(),
            'loss_optimizer': self.loss_optimizer.state_dict() if self.loss_optimizer else None,
            'scheduler': self.scheduler.state_dict() if self.scheduler else None,
            'scaler': self.scaler.state_dict(), 'ssl_head': self.ssl_head.state_dict() if self.ssl_head else None,
            'rng': torch.get_rng_state(),
            'cuda_rng': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            'callbacks': [c.state_dict() for c in self.callbacks], 'metrics_before': self.metrics_before,
        }
        atomic_torch_save(state, path)

    def load_checkpoint(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f'no checkpoint at {str(path)!r} to resume from; the run never finished an epoch')
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.raw_model.load_state_dict(state['model'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.loss.module.load_state_dict(state['loss'])
        if self.loss_optimizer is not None:
            self.loss_optimizer.load_state_dict(state['loss_optimizer'])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state['scheduler'])
        if self.ssl_head is not None:
            self.ssl_head.load_state_dict(state['ssl_head'])
        self.scaler.load_state_dict(state['scaler'])
        for callback, cb_state in zip(self.callbacks, state['callbacks']):
            callback.load_state_dict(cb_state)
        self.epoch, self.step, self.history = state['epoch'], state['step'], list(state['history'])
        self.metrics_before = state['metrics_before']
        torch.set_rng_state(state['rng'].cpu())
        if state['cuda_rng'] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda_rng']])
        logger.info('resumed from %s at epoch %d, step %d', path, self.epoch, self.step)

    def _write_config(self) -> None:
        config = self.config.model_dump(mode='json', exclude={'train_data', 'eval_data', 'query_data', 'index_data'})
        for key in ('train_data', 'eval_data', 'query_data', 'index_data'):
            config[key] = describe_data(getattr(self.config, key))
        config.update(task=self.task, class_names=self.class_names, device=str(self.device))
        atomic_write_text(self.output_dir / 'config.json', json.dumps(config, indent=2))

    def _write_history(self) -> None:
        atomic_write_text(self.output_dir / HISTORY_FILE, ''.join(json.dumps(row) + '\n' for row in self.history))


def _optimizer(name: str, params: Any, lr: float | None, options: dict[str, Any], what: str) -> torch.optim.Optimizer:
    cls = {'Adam': torch.optim.Adam, 'AdamW': torch.optim.AdamW, 'SGD': torch.optim.SGD}[name]
    options = dict(options)
    if lr is not None:
        options['lr'] = lr
    try:
        return cls(params, **options)
    except TypeError as err:
        raise ValueError(f'{what} {name} rejected its options {options}: {err}') from err


def fit(config: TrainConfig | None = None, *, resume: bool = False, **kwargs: Any) -> FitResult:
    """Fine-tune a model. Takes a ``TrainConfig`` or its fields as keywords (Finetuner's ``fit`` names).

    >>> result = fit(model='efficientnet_lite0', train_data='data/train.csv', loss='TripletMarginLoss', epochs=2,
    ...              output_dir='runs/demo')  # doctest: +SKIP
    >>> result.artifact  # runs/demo/model.pt  # doctest: +SKIP
    """
    if config is not None and kwargs:
        raise TypeError(f'pass a TrainConfig or keyword arguments, not both (got config and {sorted(kwargs)})')
    config = config if config is not None else TrainConfig(**kwargs)
    return Trainer(config).fit(resume=resume)
