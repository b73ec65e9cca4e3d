"""Inference: one ``Encoder`` interface over torch and onnxruntime, fed through the model's own ``Inputs``.

Both runtimes preprocess items the same way (``model.inputs``), on a small thread pool that prepares the next batch
while the model runs the current one, so the model is not kept waiting.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

# torch is imported before onnxruntime on purpose: it loads the CUDA/cuDNN libraries of its wheel, which
# onnxruntime-gpu then finds without a system-wide CUDA install.
import torch
from torch import nn

# isort: split
import onnxruntime as ort

from executor.tuning import artifact
from executor.tuning.artifact import Runtime
from executor.tuning.data.sources import Item
from executor.tuning.devices import resolve_device, to_device, usable_cores, usable_cpus
from executor.tuning.evaluation.evaluator import ItemEmbedder
from executor.tuning.inputs import Batch, Inputs, inputs_from_config
from executor.tuning.inputs.base import item_names
from executor.tuning.models import TOWERS, EmbeddingModel, TwoTowerModel, load_model
from executor.tuning.two_tower_encoder import TwoTowerEncoder

logger = logging.getLogger(__name__)

Contents = Sequence[Any] | Batch | torch.Tensor  # items' contents, or a batch preprocessed already
ONNX_DTYPES = {
    'tensor(float)': np.float32,
    'tensor(float16)': np.float16,
    'tensor(int64)': np.int64,
    'tensor(int32)': np.int32,
}


def iter_batches(
    inputs: Inputs, contents: Contents, batch_size: int, names: Sequence[str] | None, workers: int
) -> Iterator[Batch]:
    """Batches of ``batch_size``; the next one is preprocessed on ``workers`` threads while the caller runs this one."""
    if isinstance(contents, (dict, torch.Tensor)):
        yield from inputs.split(inputs.as_batch(contents), batch_size)
        return
    if isinstance(contents, (str, bytes, os.PathLike, np.ndarray)) or not isinstance(contents, Sequence):
        raise TypeError(
            f'items must be a list (or a preprocessed batch), got one {type(contents).__name__}; wrap a '
            'single item in a list'
        )
    names = item_names(len(contents), names, inputs.kind)
    if len(contents) == 1:  # nothing to overlap: a pool would only cost its thread
        yield inputs.batch(contents, names)
        return
    starts = deque(range(0, len(contents), batch_size))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix='decode')
    pending: deque[list[Future]] = deque()

    def submit() -> None:
        start = starts.popleft()
        stop = min(start + batch_size, len(contents))
        pending.append([pool.submit(inputs.preprocess, contents[i], names[i]) for i in range(start, stop)])

    try:
        for _ in range(min(2, len(starts))):  # the batch to run and the one to prepare meanwhile
            submit()
        while pending:
            futures = pending.popleft()
            if starts:
                submit()
            yield inputs.collate([f.result() for f in futures])
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class Encoder(ABC):
    """Embeds items (and classifies them when the model has a classifier head) on one runtime.

    ``encode(contents)`` takes a list of the items' contents (for an image model: PIL images, file paths, encoded
    bytes or arrays), preprocessed through the model's ``inputs``, or a batch preprocessed already (for an image model
    an ``(N, 3, H, W)`` float tensor), and returns ``(N, D)`` float32 embeddings; ``classify`` returns ``(N, C)``
    logits, in the order of ``class_names``.
    """

    runtime: Runtime
    #: whether the service's request batcher may merge this encoder's requests (``preprocess`` gives one batch)
    shares_batches = True

    def __init__(
        self, inputs: Inputs, embed_dim: int, class_names: list[str] | None, device: str, decode_workers: int | None
    ) -> None:
        self.inputs = inputs
        self.embed_dim = int(embed_dim)
        self.class_names = list(class_names) if class_names else None
        self.device = device
        self.decode_workers = decode_workers or min(4, len(usable_cpus()))

    @property
    def has_classifier(self) -> bool:
        return self.class_names is not None

    def encode(self, contents: Contents, batch_size: int = 32, names: Sequence[str] | None = None) -> np.ndarray:
        """``(N, embed_dim)`` float32 embeddings (not normalised); ``names`` label the items in error messages."""
        return self._collect(contents, batch_size, names, artifact.EMBEDDINGS, self.embed_dim)

    def classify(self, contents: Contents, batch_size: int = 32, names: Sequence[str] | None = None) -> np.ndarray:
        """``(N, len(class_names))`` float32 logits."""
        if not self.has_classifier:
            raise ValueError(
                'this model has no classifier head: train it with loss="CrossEntropyLoss" first, then export it again'
            )
        return self._collect(contents, batch_size, names, artifact.LOGITS, len(self.class_names))

    def preprocess(self, contents: Sequence[Any], batch_size: int, names: Sequence[str] | None = None) -> Batch:
        """The items as one batch, prepared on the encoder's threads (what the service's batcher queues)."""
        return self.inputs.concat(list(iter_batches(self.inputs, contents, batch_size, names, self.decode_workers)))

    def items(
        self, items: Sequence[Item], what: str = 'documents', prompt_name: str | None = None
    ) -> tuple[list[Any], list[str]]:
        """The contents (behind the model's prompt ``prompt_name``, where it has one) and names of ``items``, after
        checking that this model takes each."""
        self.inputs.check_items(items, what)
        return [self.inputs.content_of(it, prompt_name) for it in items], [it.name for it in items]

    def embedder(self, batch_size: int = 32) -> ItemEmbedder:
        """This encoder as an ``Evaluator``'s ``Embedder``, at ``batch_size`` items per forward pass."""
        return ItemEmbedder(self, batch_size)

    def _collect(
        self, contents: Contents, batch_size: int, names: Sequence[str] | None, output: str, width: int
    ) -> np.ndarray:
        if batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {batch_size}')
        # text runs longest first, so that each batch pads its sentences to similar lengths; the order is restored
        order = None if isinstance(contents, torch.Tensor) else self.inputs.order(contents)
        if order is not None:
            contents = (
                {k: v[order] for k, v in contents.items()}
                if isinstance(contents, dict)
                else [contents[i] for i in order]
            )
            names = item_names(len(order), names, self.inputs.kind)  # errors name the items by their own place
            names = [names[i] for i in order]
        batches = iter_batches(self.inputs, contents, batch_size, names, self.decode_workers)
        outs = [self._run(batch, output) for batch in batches]
        out = np.concatenate(outs).astype(np.float32, copy=False) if outs else np.zeros((0, width), np.float32)
        if order is not None and len(out):
            restored = np.empty_like(out)
            restored[order] = out
            out = restored
        return out

    @abstractmethod
    def _run(self, batch: Batch, output: str) -> np.ndarray:
        """One preprocessed CPU batch -> the named output, ``(B, D)`` or ``(B, C)``."""

    def __repr__(self) -> str:
        return (
            f'{type(self).__name__}(runtime={self.runtime!r}, device={self.device!r}, embed_dim={self.embed_dim}, '
            f'classes={len(self.class_names) if self.class_names else 0})'
        )


class TorchEncoder(Encoder):
    """Runs an ``EmbeddingModel`` in eager PyTorch under ``inference_mode``, channels_last for conv models.

    The model is deep-copied unless ``copy_model=False``: the encoder puts it in eval mode, on ``device`` and in
    channels_last layout, which the caller's training should not inherit.
    """

    runtime = 'torch'

    def __init__(
        self, model: EmbeddingModel, device: str = 'auto', copy_model: bool = True, decode_workers: int | None = None
    ) -> None:
        device = resolve_device(device)
        if device.startswith('cuda') and not torch.cuda.is_available():
            logger.warning('device=%r was asked for but torch sees no CUDA GPU: running on the CPU instead', device)
            device = 'cpu'
        super().__init__(model.inputs, model.embed_dim, model.class_names, device, decode_workers)
        model = copy.deepcopy(model) if copy_model else model
        # channels_last speeds up convolutions on CPU too (resnet50 10.4 -> 15.5 img/s on this project's machine)
        self.channels_last = any(isinstance(m, nn.Conv2d) for m in model.modules())
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = model.eval().to(device=device, memory_format=memory_format)

    @torch.inference_mode()
    def _run(self, batch: Batch, output: str) -> np.ndarray:
        batch = to_device(batch, torch.device(self.device), self.channels_last)
        out = self.model(batch) if output == artifact.EMBEDDINGS else self.model.classify(batch)
        return out.float().cpu().numpy()


def onnx_providers(device: str, tensorrt: bool = False) -> list[str | tuple[str, dict[str, Any]]]:
    """The execution providers for ``device``, best first; CPU is always last as the fallback."""
    if device == 'cpu':
        return ['CPUExecutionProvider']
    options = {'device_id': int(device.partition(':')[2] or 0)}
    gpu: list[str | tuple[str, dict[str, Any]]] = [('CUDAExecutionProvider', options)]
    if tensorrt:  # opt-in: it needs the TensorRT libraries, and builds an engine per input shape on first use
        gpu.insert(0, ('TensorrtExecutionProvider', options))
    return [*gpu, 'CPUExecutionProvider']


class OnnxEncoder(Encoder):
    """Runs an exported ``.onnx`` model in onnxruntime with explicit providers and thread counts.

    ``device``: ``'auto'`` (CUDA when torch sees a GPU), ``'cpu'``, ``'cuda'`` or ``'cuda:N'``; ``tensorrt=True``
    puts TensorRT before CUDA. ``intra_op_threads`` defaults to the physical cores this process may use.
    """

    runtime = 'onnx'

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = 'auto',
        intra_op_threads: int | None = None,
        tensorrt: bool = False,
        decode_workers: int | None = None,
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f'ONNX model {str(path)!r} does not exist; export one with export_onnx(model, path)'
            )
        config = artifact.read_preprocessing(path)
        asked = resolve_device(device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads or usable_cores()
        options.inter_op_num_threads = 1
        # Idle intra-op threads sleep instead of spinning: a service decodes the next requests' images while a batch
        # runs, and spinning threads took their cores (measured here: decoding 107 -> 150 img/s beside a batch of 16,
        # inference unchanged at 80 img/s).
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
        try:
            self.session = ort.InferenceSession(str(path), options, providers=onnx_providers(asked, tensorrt))
        except Exception as err:  # onnxruntime raises its own exception types for unreadable or invalid models
            raise ValueError(
                f'onnxruntime cannot load {str(path)!r} ({err}); export the model again with export_onnx'
            ) from err
        used = self.session.get_providers()
        if asked.startswith('cuda') and 'CUDAExecutionProvider' not in used:
            logger.warning(
                'device=%r was asked for, but onnxruntime runs %s on %s only (CUDA provider unavailable: check that '
                "onnxruntime-gpu, CUDA and cuDNN match, see onnxruntime's log above); running on the CPU instead",
                device,
                path.name,
                used,
            )
        elif tensorrt and 'TensorrtExecutionProvider' not in used:
            logger.warning('tensorrt=True was asked for, but the TensorRT provider did not load; using %s', used)
        super().__init__(
            inputs_from_config(config['inputs']),
            config['embed_dim'],
            config.get('class_names'),
            asked if 'CUDAExecutionProvider' in used else 'cpu',
            decode_workers,
        )
        self.path = path
        self.providers = used
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.input_dtypes = {i.name: ONNX_DTYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        if self.has_classifier and artifact.LOGITS not in self.outputs:
            raise ValueError(
                f'{str(path)!r} names classes but has no {artifact.LOGITS!r} output; export the model again'
            )
        logger.info(
            'onnxruntime session for %s on %s, %d intra-op threads', path.name, used, options.intra_op_num_threads
        )

    def _run(self, batch: Batch, output: str) -> np.ndarray:
        feeds = {name: tensor.numpy().astype(self.input_dtypes[name], copy=False) for name, tensor in batch.items()}
        return self.session.run([output], feeds)[0]


def create_encoder(
    source: EmbeddingModel | str | os.PathLike,
    runtime: Runtime | None = None,
    device: str = 'auto',
    *,
    export_dir: str | os.PathLike | None = None,
    **options: Any,
) -> Encoder:
    """An encoder for ``source``: an ``EmbeddingModel``, a model artifact (``.pt``) or an exported ``.onnx`` file.

    ``runtime`` defaults to ``'onnx'`` for an ``.onnx`` file and ``'torch'`` otherwise. A model or artifact asked
    for on ``'onnx'`` is exported first, into ``export_dir`` when given (kept), else into a temporary directory
    (the session holds the model in memory, so the file is not needed afterwards). ``options`` go to the encoder
    (``intra_op_threads``, ``tensorrt``, ``decode_workers``).
    """
    path = None if isinstance(source, nn.Module) else Path(source)
    if path is not None and not path.is_file():
        raise FileNotFoundError(
            f'model file {str(path)!r} does not exist; pass an EmbeddingModel, a .pt artifact '
            'written by save_model, or an .onnx file written by export_onnx'
        )
    is_onnx = path is not None and path.suffix == '.onnx'
    runtime = runtime or ('onnx' if is_onnx else 'torch')
    if runtime not in ('torch', 'onnx'):
        raise ValueError(f"unknown runtime {runtime!r}; use 'torch' or 'onnx'")
    if is_onnx:
        if runtime == 'torch':
            raise ValueError(
                f"{str(path)!r} is an ONNX file, which runs on runtime='onnx' only; pass the .pt "
                "artifact for runtime='torch'"
            )
        return OnnxEncoder(path, device=device, **options)
    model = source if path is None else load_model(path)
    if isinstance(model, TwoTowerModel):  # on 'onnx', each tower from the file its run exported, where there is one
        served = {name: None if path is None else artifact.served_file(path, runtime, tower=name) for name in TOWERS}
        towers = {
            name: OnnxEncoder(served[name], device=device, **options)
            if served[name] is not None and served[name].suffix == '.onnx'
            else create_encoder(model.tower(name), runtime, device, **options)
            for name in TOWERS
        }
        return TwoTowerEncoder(towers, model.inputs)
    if runtime == 'torch':
        return TorchEncoder(model, device=device, copy_model=path is None, **options)
    from executor.tuning.export import export_onnx  # the exporter and quantizer: loaded when an export is asked for

    if export_dir is not None:
        report = export_onnx(model, Path(export_dir) / 'model.onnx')
        return OnnxEncoder(report.path, device=device, **options)
    with tempfile.TemporaryDirectory(prefix='onnx-export-') as tmp:
        report = export_onnx(model, Path(tmp) / 'model.onnx')
        return OnnxEncoder(report.path, device=device, **options)
