"""FinetunerExecutor: fine-tune, serve, evaluate and export embedding models as a Jina executor, on your own machine.

The Jina layer only: each endpoint validates its parameters (``executor.params``), turns documents into the core's
items and arrays, calls the core (``executor.tuning``) off the event loop, and turns the results back into
documents. Training runs in child processes (``service.jobs``); runs live in ``<workspace>/runs/`` (``service.store``).
"""

# No `from __future__ import annotations` here: jina reads the endpoints' annotations as live objects.
import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
from docarray import DocList
from jina import requests

from executor import rest
from executor.catalog import CatalogEndpoints
from executor.docs import EvaluationResult, FinetunerDoc, RunInfo, RunLogs, drop_content, items_of
from executor.guards import PrivateTmp, check_parameters, check_request, make_public, watch_parent
from executor.params import (
    DATA_FIELDS,
    ClassifyParams,
    EmbedParams,
    EncodeParams,
    EndpointParams,
    EvaluateParams,
    ExportParams,
    IndexParams,
    LogsParams,
    ModelParams,
    ParameterError,
    RunParams,
    SearchParams,
    TrainParams,
    executor_names,
    parse,
    resolve_path,
    train_config,
)
from executor.service.artifact_io import open_artifact
from executor.service.batcher import RequestBatcher
from executor.service.encoder_cache import EncoderCache, file_encoder, registry_encoder
from executor.service.jobs import JobQueue
from executor.service.store import RunState, RunStore
from executor.settings import ServiceConfig
from executor.tuning.artifact import EXPORT_FILES
from executor.tuning.data import load_items
from executor.tuning.data.judgements import from_documents, is_judgements, read_judgements
from executor.tuning.evaluation import evaluator_for
from executor.tuning.inputs.image import limit_pixels
from executor.tuning.models import TOWERS, family_of, is_model_file, list_models, load_model, unknown_model
from executor.tuning.plan import plan_run

if TYPE_CHECKING:
    from executor.tuning.inference import Encoder

logger = logging.getLogger(__name__)

WAIT_POLL = 0.25  # seconds between status reads while /train waits for its run


class FinetunerExecutor(CatalogEndpoints):
    """Endpoints: /train, /runs, /runs/status, /runs/logs, /runs/cancel, /encode, /evaluate, /export, /classify,
    /index, /search (embedding for the VectorIndexer after it in flows/search.yml); CatalogEndpoints' /models,
    /runs/artifact, /runs/reports, /runs/delete."""

    def __init__(
        self,
        metas: Optional[dict] = None,
        requests: Optional[dict] = None,
        runtime_args: Optional[dict] = None,
        workspace: Optional[str] = None,
        dynamic_batching: Optional[dict] = None,
        **uses_with,
    ):
        """``uses_with``: the settings of ``executor.settings.ServiceConfig`` (docs/service.md, "uses_with"); a
        misspelt or unknown one stops the start. The other arguments are jina's own."""
        settings = parse(ServiceConfig, uses_with, 'uses_with')  # checked: names, bounds, device
        super().__init__(
            metas=metas,
            requests=requests,
            runtime_args=runtime_args,
            workspace=workspace,
            dynamic_batching=dynamic_batching,
        )
        self.settings = settings
        self.names = executor_names(self)  # what per-executor parameters address it by
        limit_pixels(self.settings.max_image_pixels)
        rest.set_body_limit(self.settings.max_request_bytes)
        workspace = Path(self.workspace)
        self.tmp = PrivateTmp(workspace / 'tmp')
        (workspace / 'data').mkdir(parents=True, exist_ok=True)
        extra_roots = [str(Path(root).expanduser().resolve()) for root in self.settings.data_roots]
        self.data_roots = [str(workspace / 'data'), *extra_roots]
        self.store, self.unpack_dir = RunStore(workspace / 'runs'), workspace / 'artifacts'
        self.model_cache = Path(self.settings.model_cache or workspace / 'models').expanduser()
        os.environ.setdefault('FINETUNER_EXECUTOR_CACHE', str(self.model_cache))  # where the text default unpacks
        self.encoders = EncoderCache(self.settings.max_cached_models)
        self.batcher = RequestBatcher()
        self.stopping: list[threading.Event] = []  # long requests' stop flags (/models), all set by close()
        # a two-tower artifact's one tower, served alone (the Hub executor's select_model names)
        self.served_tower = self.settings.select_model if self.settings.select_model in TOWERS else None
        try:
            self.served = self._open_served()
            if self.served is not None:
                self._encoder(ModelParams())  # loaded now: a broken artifact stops the start, not the first request
        except BaseException:  # a start that fails gives tempfile its folder back
            self.tmp.close()
            raise
        self.jobs = JobQueue(self.store)
        self.jobs.start()
        watch_parent(self._stop_long_requests)
        served, root = self.served or self.settings.model, self.store.root
        logger.info('FinetunerExecutor: serving %s, runs in %s, data roots %s', served, root, self.data_roots)

    def _open_served(self) -> Optional[Path]:
        """The model file of `artifact`, or None (and the registry `model` checked) when there is none."""
        if self.settings.artifact is None:
            family_of(self.settings.model)  # the operator's choice: a registry name or a model folder anywhere
            return None
        self.unpack_dir.mkdir(parents=True, exist_ok=True)
        file, limit = None if self.served_tower else self.settings.select_model, self.settings.max_artifact_bytes
        return open_artifact(self.settings.artifact, self.store, self.unpack_dir, self.settings.runtime, file, limit)

    async def __acall__(self, req_endpoint: str, **kwargs):
        """jina's one entry for every request: the request's bounds first, and its error without server paths."""
        try:
            check_request(kwargs.get('docs'), self.settings.max_request_docs, self.settings.max_request_bytes)
            check_parameters(kwargs.get('parameters'), self.settings.max_parameter_items)
            return await super().__acall__(req_endpoint, **kwargs)
        except Exception as err:
            public = make_public(err, self.workspace)
            if public is err:
                raise
            raise public from None

    # --- training and runs -----------------------------------------------------------------------------------------

    @requests(on='/train')
    async def train(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[RunInfo]:
        """Start a run (queued behind the one training); with `wait=true`, answer when it has ended."""
        params = parse(TrainParams, parameters, '/train', self.names)
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
        parse(EndpointParams, parameters, '/runs', self.names)
        return DocList[RunInfo]([_run_info(s) for s in await asyncio.to_thread(self.store.list)])

    @requests(on='/runs/status')
    async def status(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[RunInfo]:
        params = parse(RunParams, parameters, '/runs/status', self.names)
        return DocList[RunInfo]([_run_info(self.store.get(params.run_id))])

    @requests(on='/runs/logs')
    async def logs(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[RunLogs]:
        """Log lines from `since` on; pass the reply's `next_since` as `since` to follow the log."""
        params = parse(LogsParams, parameters, '/runs/logs', self.names)
        lines, next_since = await asyncio.to_thread(self.store.read_log, params.run_id, params.since, params.limit)
        return DocList[RunLogs]([RunLogs(run_id=params.run_id, lines=lines, next_since=next_since)])

    @requests(on='/runs/cancel')
    async def cancel(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[RunInfo]:
        params = parse(RunParams, parameters, '/runs/cancel', self.names)
        return DocList[RunInfo]([_run_info(await asyncio.to_thread(self.jobs.cancel, params.run_id))])

    @requests(on='/export')
    async def export(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[RunInfo]:
        """Export a finished run to ONNX (checked against torch); the reply's `artifact` is the file written."""
        params = parse(ExportParams, parameters, '/export', self.names)
        state, path = await asyncio.to_thread(self._export, params)
        return DocList[RunInfo]([RunInfo(**{**state.info(), 'artifact': str(path)})])

    # --- models in service -----------------------------------------------------------------------------------------

    @requests(on='/encode')
    async def encode(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[FinetunerDoc]:
        """Set each document's `embedding`. Concurrent requests for the same model share forward passes."""
        return await self._embed(docs, parse(EncodeParams, parameters, '/encode', self.names))

    @requests(on='/index')
    async def index(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[FinetunerDoc]:
        """Embed the documents to index, as /encode does; in flows/search.yml the VectorIndexer stores them next."""
        return await self._embed(docs, parse(IndexParams, parameters, '/index', self.names))

    @requests(on='/search')
    async def search(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[FinetunerDoc]:
        """Embed the queries, as /encode does; in flows/search.yml the VectorIndexer finds their `limit` matches."""
        return await self._embed(docs, parse(SearchParams, parameters, '/search', self.names))

    @requests(on='/classify')
    async def classify(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[FinetunerDoc]:
        """Set each document's predicted `label` and its `scores` (softmax probability per class)."""
        params = parse(ClassifyParams, parameters, '/classify', self.names)
        if len(docs) == 0:
            return docs
        logits, encoder = await self._run_model(docs, params, 'classify')  # (N, C)
        classes = encoder.class_names
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        for doc, row in zip(docs, probs):
            doc.label = classes[int(row.argmax())]
            doc.scores = {name: float(p) for name, p in zip(classes, row)}
        return drop_content(docs) if params.drop_image_content else docs

    @requests(on='/evaluate')
    async def evaluate(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[EvaluationResult]:
        """Retrieval metrics (and accuracy for a classifier) of a run's model, or of the pre-trained one."""
        params = parse(EvaluateParams, parameters, '/evaluate', self.names)
        if len(docs) == 0 and params.data is None and params.query_data is None:
            return DocList[EvaluationResult]()
        return DocList[EvaluationResult]([await asyncio.to_thread(self._evaluate, docs, params)])

    def _stop_long_requests(self) -> None:
        for stop in list(self.stopping):
            stop.set()

    def close(self) -> None:
        self._stop_long_requests()
        self.jobs.close()
        super().close()
        self.tmp.close()

    # --- the work, off the event loop ------------------------------------------------------------------------------

    def _create_run(self, docs: DocList[FinetunerDoc], params: TrainParams) -> RunState:
        request = params.config_dict()
        for key in DATA_FIELDS:
            if request.get(key) is not None:
                request[key] = resolve_path(request[key], self.data_roots, key)
        if 'model' in request:
            request['model'] = self._model_source(request['model'])
        if request.get('weights') is not None:
            request['weights'] = resolve_path(request['weights'], self.data_roots, 'weights')
        request.setdefault('device', self.settings.device)
        request.setdefault('model', self.settings.model)  # the service's model (uses_with) when the request names none
        request['data_roots'] = self.data_roots
        items = None
        if len(docs):
            if request.get('train_data') is not None:
                raise ParameterError('/train got documents and train_data: send the training data one way')
            items = self._items(docs)
        config = train_config({**request, 'train_data': items} if items else request)
        # documents are decoded now too: a bad image is an error of this request, not a failed run
        plan = plan_run(config, decode=items is not None)
        state = self.store.create(request, plan, run_id=params.run_name)
        self.jobs.submit(state.run_id)
        return state

    def _model_source(self, model: str) -> str:
        """What a run starts from: a model file under the data roots, a finished run's model, or a registry name
        (checked now, so that a typo is an error of the request)."""
        if is_model_file(model):
            return resolve_path(model, self.data_roots, 'model')
        if model not in list_models() and model in self.store.ids():
            return str(self.store.model_file(model, 'torch'))
        return self._model_name(model)

    def _model_name(self, name: str) -> str:
        """A registry name as it is, or a model folder (a transformers one) under the data roots; else the unknown
        model error, with close names."""
        if name in list_models():
            return name
        if '/' in name or name.startswith(('.', '~')):
            folder = Path(resolve_path(name, self.data_roots, 'model'))
            if (folder / 'config.json').is_file():
                family_of(str(folder))
                return str(folder)
        raise unknown_model(name)

    def _items(self, docs: DocList[FinetunerDoc]) -> list:
        return items_of(docs, self.data_roots)

    def _encoder(self, params: ModelParams) -> 'Encoder':
        runtime, device = params.runtime or self.settings.runtime, self.settings.device
        if params.run_id is not None:
            path = self.store.model_file(params.run_id, runtime)
        elif params.model is None and self.served is not None:
            path = self.served
        else:
            name = self._model_name(params.model) if params.model else self.settings.model
            return self.encoders.get(
                ('model', name, runtime, device, None),
                lambda: registry_encoder(name, runtime, device, self.model_cache),
            )
        tower = self.served_tower if path == self.served else None
        key = ('file', str(path), path.stat().st_mtime_ns, device, params.run_id, runtime, tower)
        return self.encoders.get(key, lambda: file_encoder(path, runtime, device, tower))

    async def _embed(self, docs: DocList[FinetunerDoc], params: EmbedParams) -> DocList[FinetunerDoc]:
        if len(docs) == 0:
            return docs
        embeddings, _ = await self._run_model(docs, params, 'encode')  # (N, D)
        embeddings = params.truncated(embeddings)
        for doc, embedding in zip(docs, embeddings):
            doc.embedding = embedding
        return drop_content(docs) if params.drop_image_content else docs

    async def _run_model(self, docs: DocList[FinetunerDoc], params: ModelParams, task: str) -> tuple:
        """Embeddings (or logits) of the documents and the encoder; small requests go through the batcher."""
        batch_size = self._batch_size(params)
        with self.batcher.expecting():
            encoder, contents, names, batch = await asyncio.to_thread(self._prepare, docs, params, task, batch_size)
        run = encoder.encode if task == 'encode' else encoder.classify
        if batch is None:  # too large to share a batch: encoded on its own, preparing overlapped with the model
            return await asyncio.to_thread(run, contents, batch_size, names), encoder
        out = await self.batcher.run(
            (task, id(encoder), batch_size), batch, lambda rows: run(rows, batch_size), encoder.inputs
        )
        return out, encoder

    def _batch_size(self, params: ModelParams) -> int:
        """The request's ``batch_size`` (else the service's), within the service's bound."""
        asked, bound = params.batch_size or self.settings.batch_size, self.settings.max_batch_size
        if asked > bound:
            raise ParameterError(
                f'batch_size={asked} is more than this service runs in one forward pass (max_batch_size={bound}, '
                f'set in uses_with); send batch_size <= {bound}, or leave it out for the default '
                f'{self.settings.batch_size}'
            )
        return asked

    def _prepare(self, docs: DocList[FinetunerDoc], params: ModelParams, task: str, batch_size: int) -> tuple:
        """The encoder, the documents' contents and names, and their batch, preprocessed when the request is small
        enough for the batcher (else None): one trip to a worker thread per request."""
        encoder = self._encoder(params)
        if task == 'classify' and not encoder.has_classifier:
            raise ValueError(
                'this model has no classifier head: /classify needs the run_id of a run trained with '
                'loss="CrossEntropyLoss"'
            )
        prompt = None
        if isinstance(params, EmbedParams):
            prompt = encoder.inputs.prompt_name(params.prompt_name, params.default_prompt)
        contents, names = encoder.items(self._items(docs), prompt_name=prompt)
        if len(contents) > self.batcher.max_rows or not encoder.shares_batches:
            return encoder, contents, names, None
        return encoder, contents, names, encoder.preprocess(contents, batch_size, names)

    def _evaluate(self, docs: DocList[FinetunerDoc], params: EvaluateParams) -> EvaluationResult:
        if params.query_data is not None:
            query = self._load(params.query_data, 'query_data', params)
            index = self._load(params.index_data, 'index_data', params)
        elif params.data is not None and is_judgements(path := resolve_path(params.data, self.data_roots, 'data')):
            judgements = read_judgements(path, params.split, self.data_roots, params.csv_options)
            query, index = judgements.queries, judgements.corpus
        elif params.data is not None:
            query, index = self._load(params.data, 'data', params), None
        else:
            query, index = self._items(docs), None
            if is_judgements(query):
                judgements = from_documents(query)
                query, index = judgements.queries, judgements.corpus
        evaluator = evaluator_for(query, index, params.limit, params.matryoshka_dims)  # checks labels or scores
        encoder = self._encoder(params)
        evaluation = evaluator(encoder.embedder(self._batch_size(params)))
        result = EvaluationResult(
            run_id=params.run_id,
            model=None if params.run_id else params.model or str(self.served or self.settings.model),
            metrics=evaluation.metrics,
        )
        if evaluation.confusion is not None:
            result.confusion_matrix, result.class_names = evaluation.confusion, encoder.class_names
        return result

    def _load(self, path: str, what: str, params: EvaluateParams) -> list:
        """The items of a data file or folder of ``/evaluate`` (under the data roots), read as ``csv_options`` say."""
        return load_items(resolve_path(path, self.data_roots, what), self.data_roots, params.csv_options)

    def _export(self, params: ExportParams) -> tuple:
        from executor.tuning.export import export_onnx  # the ONNX exporter and quantizer: loaded on first use

        model_file = self.store.model_file(params.run_id, 'torch')
        variant = 'fp16' if params.fp16 else 'int8' if params.quantize else 'fp32'
        report = export_onnx(
            load_model(model_file),
            model_file.with_name(EXPORT_FILES[variant]),
            fp16=params.fp16,
            quantize=params.quantize,
        )
        self.encoders.drop(lambda key: key[-1] == params.run_id)
        return self.store.get(params.run_id), report.path


def _run_info(state: RunState) -> RunInfo:
    return RunInfo(**state.info())
