"""FinetunerExecutor: fine-tune, serve, evaluate and export embedding models as a Jina executor, on your own machine.

The Jina layer only: each endpoint validates its parameters (``executor.params``), turns documents into the core's
items and arrays, calls the core (``executor.tuning``) off the event loop, and turns the results back into
documents. Training runs in child processes (``tuning.jobs``); runs live in ``<workspace>/runs/`` (``tuning.runs``).
"""
# No `from __future__ import annotations` here: jina reads the endpoints' annotations as live objects.
import asyncio
import base64
import logging
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from docarray import DocList
from jina import Executor, requests

from executor import params as P
from executor import rest  # noqa: F401  (typed OpenAPI and 4xx answers on the HTTP port)
from executor.docs import (EvaluationResult, FinetunerDoc, RunInfo, RunLogs, blob_of, ensure_ids, label_of,
                           uri_of)
from executor.tuning.config import TrainConfig
from executor.tuning.data import DataError, load_image, load_items
from executor.tuning.data.sources import from_records
from executor.tuning.jobs import JobQueue, check_training_data
from executor.tuning.evaluation import classification_metrics, retrieval_metrics
from executor.tuning.models import build_model, list_models, load_model
from executor.tuning.models.registry import unknown_model
from executor.tuning.runs import EncoderCache, RequestBatcher, RunState, RunStore, concat_rows, open_artifact

if TYPE_CHECKING:
    from executor.tuning.inference import Encoder

logger = logging.getLogger(__name__)

WAIT_POLL = 0.25  # seconds between status reads while /train waits for its run
EXPORT_NAMES = {'fp32': 'model.onnx', 'fp16': 'model-fp16.onnx', 'int8': 'model-int8.onnx'}


class FinetunerExecutor(Executor):
    """Endpoints: /train, /runs, /runs/status, /runs/logs, /runs/cancel, /encode, /evaluate, /export, /classify, and
    /index, /search, which embed documents for the VectorIndexer that follows in flows/search.yml."""

    def __init__(
        self,
        model: str = 'efficientnet_lite0',
        artifact: Optional[str] = None,
        batch_size: int = 32,
        select_model: Optional[str] = None,
        device: str = 'auto',
        runtime: str = 'onnx',
        data_roots: Optional[list] = None,
        max_cached_models: int = 4,
        model_cache: Optional[str] = None,
        **kwargs,
    ):
        """
        :param model: registry model served when a request names none (pre-trained weights must be local).
        :param artifact: serve this instead: a run id of this workspace, an artifact folder or a .zip of one.
        :param batch_size: images per forward pass of /encode, /classify and /evaluate.
        :param select_model: the model file inside `artifact` (default: model.onnx with runtime 'onnx', else model.pt).
        :param device: 'auto', 'cpu', 'cuda' or 'cuda:N', for serving and (by default) for training.
        :param runtime: 'onnx' serves a model's ONNX export where it has one; 'torch' always serves the .pt model.
        :param data_roots: folders requests may read data from, besides `<workspace>/data` (symlinks resolved).
        :param max_cached_models: models held in memory at once; the least recently used is dropped first.
        :param model_cache: folder of the registry models' ONNX exports (default `<workspace>/models`); replicas and
            restarts that share it export each model once (under a file lock).
        """
        super().__init__(**kwargs)
        self.names = P.executor_names(self)  # what per-executor parameters address it by
        self.settings = P.ServiceConfig(
            model=model, artifact=artifact, batch_size=batch_size, select_model=select_model, device=device,
            runtime=runtime, data_roots=list(data_roots or []), max_cached_models=max_cached_models,
            model_cache=model_cache,
        )
        workspace = Path(self.workspace)
        (workspace / 'data').mkdir(parents=True, exist_ok=True)
        extra_roots = [str(Path(root).expanduser().resolve()) for root in self.settings.data_roots]
        self.data_roots = [str(workspace / 'data'), *extra_roots]
        self.store = RunStore(workspace / 'runs')
        self.unpack_dir = workspace / 'artifacts'
        self.model_cache = Path(self.settings.model_cache or workspace / 'models').expanduser()
        self.encoders = EncoderCache(self.settings.max_cached_models)
        self.batcher = RequestBatcher()
        self.served = None
        if self.settings.artifact is None:
            self._check_model_name(self.settings.model)
        else:
            self.unpack_dir.mkdir(parents=True, exist_ok=True)
            self.served = open_artifact(self.settings.artifact, self.store, self.unpack_dir, self.settings.runtime,
                                        self.settings.select_model)
        self.jobs = JobQueue(self.store)
        self.jobs.start()
        logger.info('FinetunerExecutor: serving %s, runs in %s, data roots %s', self.served or self.settings.model,
                    self.store.root, self.data_roots)

    # --- training and runs -----------------------------------------------------------------------------------------

    @requests(on='/train')
    async def train(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[RunInfo]:
        """Start a run (queued behind the one training); with `wait=true`, answer when it has ended."""
        params = P.parse(P.TrainParams, parameters, '/train', self.names)
        if params.resume is not None:
            epochs = params.epochs if 'epochs' in params.model_fields_set else None
            state = await asyncio.to_thread(self.jobs.resume, params.resume, epochs)
        else:
            state = await asyncio.to_thread(self._create_run, docs, params)
        if params.wait:
            while not state.done:
                await asyncio.sleep(WAIT_POLL)
                state = self.store.get(state.run_id)
        return DocList[RunInfo]([_run_info(state)])

    @requests(on='/runs')
    async def runs(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[RunInfo]:
        """Every run of the workspace, oldest first."""
        P.parse(P.EndpointParams, parameters, '/runs', self.names)
        return DocList[RunInfo]([_run_info(s) for s in await asyncio.to_thread(self.store.list)])

    @requests(on='/runs/status')
    async def status(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[RunInfo]:
        params = P.parse(P.RunParams, parameters, '/runs/status', self.names)
        return DocList[RunInfo]([_run_info(self.store.get(params.run_id))])

    @requests(on='/runs/logs')
    async def logs(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[RunLogs]:
        """Log lines from `since` on; pass the reply's `next_since` as `since` to follow the log."""
        params = P.parse(P.LogsParams, parameters, '/runs/logs', self.names)
        lines, next_since = await asyncio.to_thread(self.store.read_log, params.run_id, params.since, params.limit)
        return DocList[RunLogs]([RunLogs(run_id=params.run_id, lines=lines, next_since=next_since)])

    @requests(on='/runs/cancel')
    async def cancel(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[RunInfo]:
        params = P.parse(P.RunParams, parameters, '/runs/cancel', self.names)
        return DocList[RunInfo]([_run_info(await asyncio.to_thread(self.jobs.cancel, params.run_id))])

    @requests(on='/export')
    async def export(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[RunInfo]:
        """Export a finished run to ONNX (checked against torch); the reply's `artifact` is the file written."""
        params = P.parse(P.ExportParams, parameters, '/export', self.names)
        state, path = await asyncio.to_thread(self._export, params)
        return DocList[RunInfo]([RunInfo(**{**state.info(), 'artifact': str(path)})])

    # --- models in service -----------------------------------------------------------------------------------------

    @requests(on='/encode')
    async def encode(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[FinetunerDoc]:
        """Set each document's `embedding`. Concurrent requests for the same model share forward passes."""
        return await self._embed(docs, P.parse(P.EncodeParams, parameters, '/encode', self.names))

    @requests(on='/index')
    async def index(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[FinetunerDoc]:
        """Embed the documents to index, as /encode does; in flows/search.yml the VectorIndexer stores them next."""
        return await self._embed(docs, P.parse(P.IndexParams, parameters, '/index', self.names))

    @requests(on='/search')
    async def search(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[FinetunerDoc]:
        """Embed the queries, as /encode does; in flows/search.yml the VectorIndexer finds their `limit` matches."""
        return await self._embed(docs, P.parse(P.SearchParams, parameters, '/search', self.names))

    @requests(on='/classify')
    async def classify(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[FinetunerDoc]:
        """Set each document's predicted `label` and its `scores` (softmax probability per class)."""
        params = P.parse(P.ClassifyParams, parameters, '/classify', self.names)
        if len(docs) == 0:
            return docs
        logits, encoder = await self._run_model(docs, params, 'classify')  # (N, C)
        classes = encoder.class_names
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        for doc, row in zip(docs, probs):
            doc.label = classes[int(row.argmax())]
            doc.scores = {name: float(p) for name, p in zip(classes, row)}
        return _drop_content(docs) if params.drop_image_content else docs

    @requests(on='/evaluate')
    async def evaluate(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[EvaluationResult]:
        """Retrieval metrics (and accuracy for a classifier) of a run's model, or of the pre-trained one."""
        params = P.parse(P.EvaluateParams, parameters, '/evaluate', self.names)
        if len(docs) == 0 and params.data is None and params.query_data is None:
            return DocList[EvaluationResult]()
        return DocList[EvaluationResult]([await asyncio.to_thread(self._evaluate, docs, params)])

    def close(self) -> None:
        self.jobs.close()
        super().close()

    # --- the work, off the event loop ------------------------------------------------------------------------------

    def _create_run(self, docs: DocList[FinetunerDoc], params: P.TrainParams) -> RunState:
        request = params.config_dict()
        for key in P.DATA_FIELDS:
            if request.get(key) is not None:
                request[key] = P.resolve_path(request[key], self.data_roots, key)
        if 'model' in request:
            request['model'] = self._model_source(request['model'])
        if request.get('weights') is not None:
            request['weights'] = P.resolve_path(request['weights'], self.data_roots, 'weights')
        request.setdefault('device', self.settings.device)
        request['data_roots'] = self.data_roots
        items = None
        if len(docs):
            if request.get('train_data') is not None:
                raise P.ParameterError('/train got documents and train_data: send the training data one way')
            items = self._items(docs)
            for item in items:  # decode now: a bad image is an error of this request, not a failed run
                if item.kind == 'image':
                    load_image(item.content, item.name)
        config = TrainConfig(**request, train_data=items) if items else TrainConfig(**request)
        check_training_data(config)
        state = self.store.create(request, run_id=params.run_name, docs=items)
        self.jobs.submit(state.run_id)
        return state

    def _model_source(self, model: str) -> str:
        """What a run starts from: a model file under the data roots, a finished run's model, or a registry name
        (checked now, so that a typo is an error of the request)."""
        if Path(model).suffix in ('.pt', '.pth'):
            return P.resolve_path(model, self.data_roots, 'model')
        if model not in list_models() and model in self.store.ids():
            return str(self.store.model_file(model, 'torch'))
        self._check_model_name(model)
        return model

    @staticmethod
    def _check_model_name(name: str) -> None:
        if name not in list_models():
            raise unknown_model(name)

    def _items(self, docs: DocList[FinetunerDoc]) -> list:
        """The documents as the core's items; a `data:` URI becomes its bytes; local paths must be under a root."""
        records = []
        for doc in ensure_ids(docs):  # the reply and the indexer after this executor see the same ids
            uri, blob = uri_of(doc), blob_of(doc)
            if uri is not None and uri.startswith('data:'):
                header, _, payload = uri.partition(',')
                base64_coded = header.endswith(';base64')
                blob = base64.b64decode(payload) if base64_coded else urllib.parse.unquote_to_bytes(payload)
                uri = None
            tensor = None if doc.tensor is None else np.asarray(doc.tensor)
            records.append({'id': doc.id, 'uri': uri, 'blob': blob, 'tensor': tensor, 'text': doc.text,
                            'label': label_of(doc)})
        return from_records(records, self.data_roots)

    def _encoder(self, params: P.ModelParams) -> 'Encoder':
        from executor.tuning.inference import create_encoder  # onnxruntime: loaded on first use

        runtime, device = params.runtime or self.settings.runtime, self.settings.device
        if params.run_id is not None:
            path = self.store.model_file(params.run_id, runtime)
        elif params.model is None and self.served is not None:
            path = self.served
        else:
            name = params.model or self.settings.model
            return self.encoders.get(('model', name, runtime, device, None),
                                      lambda: self._registry_encoder(name, runtime, device))
        key = ('file', str(path), path.stat().st_mtime_ns, device, params.run_id)
        return self.encoders.get(key, lambda: create_encoder(path, device=device))

    def _registry_encoder(self, name: str, runtime: str, device: str) -> 'Encoder':
        """A registry model, pre-trained: on runtime 'onnx' through onnxruntime, exported on first use and cached in
        ``model_cache`` by name and weights; a model that does not export is served by torch, with a warning."""
        from executor.tuning.export import ExportError
        from executor.tuning.inference import TorchEncoder, cached_onnx_encoder

        model = build_model(name)
        if runtime == 'onnx':
            try:
                return cached_onnx_encoder(model, name, self.model_cache, device=device)
            except (ExportError, OSError, ValueError) as err:  # no export, or an unwritable or broken cache folder
                logger.warning('model %r cannot be served by onnxruntime from %s (%s); serving it with torch', name,
                               self.model_cache, err)
        return TorchEncoder(model, device=device, copy_model=False)

    def _images(self, items: list) -> tuple:
        text = [it.name for it in items if it.kind == 'text']
        if text:
            raise DataError(f'{text[0]} is text only ({len(text)} such), but this model embeds images; send '
                            'each as uri, blob or tensor')
        return [it.content for it in items], [it.name for it in items]

    async def _embed(self, docs: DocList[FinetunerDoc], params: P.DocModelParams) -> DocList[FinetunerDoc]:
        if len(docs) == 0:
            return docs
        embeddings, _ = await self._run_model(docs, params, 'encode')  # (N, D)
        for doc, embedding in zip(docs, embeddings):
            doc.embedding = embedding
        return _drop_content(docs) if params.drop_image_content else docs

    async def _run_model(self, docs: DocList[FinetunerDoc], params: P.ModelParams, task: str) -> tuple:
        """Embeddings (or logits) of the documents and the encoder; small requests go through the batcher."""
        batch_size = params.batch_size or self.settings.batch_size
        with self.batcher.expecting():
            encoder, images, names, x = await asyncio.to_thread(self._prepare, docs, params, task, batch_size)
        run = encoder.encode if task == 'encode' else encoder.classify
        if x is None:  # too large to share a batch: encoded on its own, decoding overlapped with the model
            return await asyncio.to_thread(run, images, batch_size, names), encoder
        out = await self.batcher.run((task, id(encoder), batch_size), x, lambda batch: run(batch, batch_size))
        return out, encoder

    def _prepare(self, docs: DocList[FinetunerDoc], params: P.ModelParams, task: str, batch_size: int) -> tuple:
        """The encoder, the images and their names, and ``(N, 3, H, W)`` preprocessed when the request is small
        enough for the batcher (else None): one trip to a worker thread per request."""
        encoder = self._encoder(params)
        if task == 'classify' and not encoder.has_classifier:
            raise ValueError('this model has no classifier head: /classify needs the run_id of a run trained with '
                             'loss="CrossEntropyLoss"')
        images, names = self._images(self._items(docs))
        if len(images) > self.batcher.max_rows:
            return encoder, images, names, None
        return encoder, images, names, _preprocess(encoder, images, names, batch_size)

    def _evaluate(self, docs: DocList[FinetunerDoc], params: P.EvaluateParams) -> EvaluationResult:
        if params.query_data is not None:
            query = load_items(P.resolve_path(params.query_data, self.data_roots, 'query_data'), self.data_roots)
            index = load_items(P.resolve_path(params.index_data, self.data_roots, 'index_data'), self.data_roots)
        elif params.data is not None:
            query, index = load_items(P.resolve_path(params.data, self.data_roots, 'data'), self.data_roots), None
        else:
            query, index = self._items(docs), None
        for item in [*query, *(index or [])]:
            if item.label is None:
                raise DataError(f'{item.name} has no label: evaluation needs a label on every item (relevant '
                                'means same label)')
        encoder = self._encoder(params)
        batch_size = params.batch_size or self.settings.batch_size
        q_images, q_names = self._images(query)
        q_emb = encoder.encode(q_images, batch_size, q_names)  # (Q, D)
        q_labels = [it.label for it in query]
        if index is None:
            metrics = retrieval_metrics(q_emb, q_labels, limit=params.limit)
        else:
            i_images, i_names = self._images(index)
            metrics = retrieval_metrics(q_emb, q_labels, encoder.encode(i_images, batch_size, i_names),
                                        [it.label for it in index], limit=params.limit)
        result = EvaluationResult(run_id=params.run_id, model=None if params.run_id else
                                  params.model or str(self.served or self.settings.model), metrics=metrics)
        known = [k for k, it in enumerate(query) if encoder.has_classifier and it.label in encoder.class_names]
        if index is None and known:
            logits = encoder.classify([q_images[k] for k in known], batch_size, [q_names[k] for k in known])
            accuracy, confusion = classification_metrics(logits, [q_labels[k] for k in known], encoder.class_names)
            metrics.update(accuracy)
            result.metrics, result.confusion_matrix, result.class_names = metrics, confusion, encoder.class_names
        return result

    def _export(self, params: P.ExportParams) -> tuple:
        from executor.tuning.export import export_onnx  # the ONNX exporter and quantizer: loaded on first use

        model_file = self.store.model_file(params.run_id, 'torch')
        variant = 'fp16' if params.fp16 else 'int8' if params.quantize else 'fp32'
        report = export_onnx(load_model(model_file), model_file.with_name(EXPORT_NAMES[variant]), fp16=params.fp16,
                             quantize=params.quantize)
        self.encoders.drop(lambda key: key[-1] == params.run_id)
        return self.store.get(params.run_id), report.path


def _run_info(state: RunState) -> RunInfo:
    return RunInfo(**state.info())


def _drop_content(docs: DocList[FinetunerDoc]) -> DocList[FinetunerDoc]:
    """The documents without their image bytes (``blob``, ``tensor``, a ``data:`` URI): a reply of ids and results,
    a tenth of the bytes for a batch of JPEGs. A path or http URI stays: it names the document for the client."""
    for doc in docs:
        doc.blob = doc.bytes_ = doc.tensor = None
        if doc.uri is not None and doc.uri.startswith('data:'):
            doc.uri = None
        if doc.url is not None and doc.url.startswith('data:'):
            doc.url = None
    return docs


def _preprocess(encoder: 'Encoder', images: list, names: list, batch_size: int) -> torch.Tensor:
    """One request's images decoded (on the encoder's decode threads) and stacked: ``(N, 3, H, W)``."""
    return concat_rows(list(encoder.preprocessor.iter_batches(images, batch_size, names, encoder.decode_workers)))
