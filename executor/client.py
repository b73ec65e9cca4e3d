"""A Python client of FinetunerExecutor that reads like Finetuner: ``FinetunerClient(host).fit(...)`` returns a ``Run``.

>>> client = FinetunerClient('grpc://127.0.0.1:12345')  # doctest: +SKIP
>>> run = client.fit(model='efficientnet_lite0', train_data='digits', loss='TripletMarginLoss', epochs=2)  # +SKIP
>>> for line in run.stream_logs():  # doctest: +SKIP
...     print(line)
>>> run.status()['status'], run.metrics(), run.artifact  # doctest: +SKIP
>>> client.encode(docs, run_id=run.name)  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from docarray import BaseDoc, DocList
from jina import Client
from jina.excepts import BadServer
from rich.console import Console
from rich.table import Table

from executor.docs import (
    EvaluationResult,
    ExampleResult,
    FinetunerDoc,
    ModelInfo,
    RunArtifact,
    RunInfo,
    RunLogs,
    RunReport,
)
from executor.tuning.data.finetuner_csv import CSVOptions
from executor.tuning.finetuner_callbacks import (
    BestModelCheckpoint,
    EarlyStopping,
    EvaluationCallback,
    TrainingCheckpoint,
    WandBLogger,
    WiSEFTCallback,
)

__all__ = [
    'BestModelCheckpoint',
    'CSVOptions',
    'EarlyStopping',
    'EvaluationCallback',
    'FinetunerClient',
    'Run',
    'ServiceError',
    'TrainingCheckpoint',
    'WandBLogger',
    'WiSEFTCallback',
]


def as_finetuner_docs(docs: Sequence[BaseDoc]) -> DocList[FinetunerDoc]:
    """The documents as the service's own type: docarray's ``TextDoc``/``ImageDoc`` (or any document whose fields
    it has) are copied field by field; a field it does not know is an error, never dropped silently."""
    out = []
    for doc in docs:
        if not isinstance(doc, FinetunerDoc):
            fields = {k: v for k, v in doc.dict().items() if v is not None}
            unknown = sorted(set(fields) - set(FinetunerDoc.model_fields))
            if unknown:
                raise ValueError(
                    f'{type(doc).__name__} {doc.id!r} has fields {unknown} that the service does not read; it takes '
                    f'{sorted(FinetunerDoc.model_fields)}: put the content in text, uri, blob or tensor'
                )
            doc = FinetunerDoc(**fields)
        out.append(doc)
    return DocList[FinetunerDoc](out)


class ServiceError(RuntimeError):
    """The service answered a request with an error; the message is the service's."""


WHOLE_REQUESTS = ('/train', '/evaluate')  # endpoints whose documents make one whole (a data set)


class FinetunerClient:
    """Talks to one FinetunerExecutor (a Deployment, or a Flow's gateway) over gRPC, HTTP or WebSocket.

    ``host`` carries the protocol and port, as jina's ``Client`` takes it: ``'grpc://127.0.0.1:12345'``,
    ``'http://...'``. ``kwargs`` go to jina's ``Client``.
    """

    def __init__(self, host: str = 'grpc://127.0.0.1:12345', **kwargs: Any) -> None:
        self._client = Client(host=host, **kwargs)

    def post(
        self,
        endpoint: str,
        docs: Sequence[BaseDoc] | None = None,
        parameters: dict[str, Any] | None = None,
        return_type: type[BaseDoc] = FinetunerDoc,
    ) -> DocList:
        """One request; the service's error is raised as ``ServiceError``."""
        docs = as_finetuner_docs(docs or [])
        # jina's Client sends 100 documents per request; a run's training data, or an evaluation's, is one request
        whole = {'request_size': max(1, len(docs))} if endpoint in WHOLE_REQUESTS else {}
        try:
            return self._client.post(
                endpoint, inputs=docs, parameters=parameters or {}, return_type=DocList[return_type], **whole
            )
        except BadServer as err:  # args[0] is the reply's header, which holds the executor's error
            raise ServiceError(err.args[0].status.description) from None

    # --- Finetuner's workflow --------------------------------------------------------------------------------------

    def fit(
        self,
        model: str | None = None,
        train_data: str | Sequence[BaseDoc] | None = None,
        eval_data: str | None = None,
        run_name: str | None = None,
        **options: Any,
    ) -> Run:
        """Start a run and return at once (pass ``wait=True`` to return when it has ended).

        ``model``: a registry name (``'efficientnet_lite0'``, ``'all-MiniLM-L6-v2'``...), a run id or a model file;
        the service's own model when left out. ``train_data``: a CSV file (``uri,label``, ``text,label``,
        ``anchor,positive[,negative]``, ``sentence1,sentence2,score``), a BEIR folder (``corpus.jsonl``,
        ``queries.jsonl``, ``qrels/<split>.tsv``) or image folder on the server (under its data roots), or documents
        with ``uri``/``blob``/``tensor``/``text`` and ``label`` (or ``relevant_ids``). ``options``: any other
        ``/train`` parameter (``loss``, ``epochs``, ``batch_size``, ``learning_rate``, ``miner``, ``freeze``,
        ``output_dim``, ``matryoshka_dims``, ``to_onnx``, ``split``/``eval_split``, ``hard_negatives={...}``,
        ``prompts={'query': ..., 'document': ...}``, ...), and Finetuner's ``fit()`` arguments unchanged:
        ``callbacks=[EvaluationCallback(...), EarlyStopping(...)]`` (this module's classes, or dicts with a
        ``name``), ``csv_options=CSVOptions(is_labeled=True)``, ``model_options``, ``model_artifact``, ...
        """
        parameters = {**({'model': model} if model is not None else {}), **_json_ready(options)}
        docs = None
        if isinstance(train_data, str):
            parameters['train_data'] = train_data
        elif train_data is not None:
            docs = train_data
        if eval_data is not None:
            parameters['eval_data'] = eval_data
        if run_name is not None:
            parameters['run_name'] = run_name
        return Run(self, self.post('/train', docs, parameters, RunInfo)[0])

    def resume(self, run_id: str, wait: bool = False) -> Run:
        """Continue a FAILED or CANCELLED run from its last checkpoint."""
        return Run(self, self.post('/train', None, {'resume': run_id, 'wait': wait}, RunInfo)[0])

    def get_run(self, run_id: str) -> Run:
        return Run(self, self.post('/runs/status', None, {'run_id': run_id}, RunInfo)[0])

    def list_runs(self) -> list[Run]:
        return [Run(self, info) for info in self.post('/runs', None, None, RunInfo)]

    def delete_run(self, run_id: str) -> RunInfo:
        """Remove a FINISHED, FAILED or CANCELLED run and its files on the server (cancel a run in progress first);
        returns the run as it was."""
        return self.post('/runs/delete', None, {'run_id': run_id}, RunInfo)[0]

    def describe_models(self, names: Sequence[str] | None = None, local_only: bool = False) -> list[ModelInfo]:
        """Finetuner's ``describe_models``: every model the service can train and serve (``name``, ``modality``,
        ``output_dim``, ``weights_local``, ``options``), those whose weights are on the server first. ``output_dim``
        is measured for the local models and for each of ``names``."""
        parameters: dict[str, Any] = {'local_only': local_only, **({'names': list(names)} if names else {})}
        return list(self.post('/models', None, parameters, ModelInfo))

    def list_models(self) -> list[str]:
        """The names of every model the service takes, those whose weights are on the server first."""
        return [model.name for model in self.describe_models()]

    # --- models in service -----------------------------------------------------------------------------------------

    def encode(
        self,
        docs: Sequence[BaseDoc],
        run_id: str | None = None,
        model: str | None = None,
        drop_image_content: bool = True,
        prompt_name: str | None = None,
        **parameters: Any,
    ) -> DocList[FinetunerDoc]:
        """The documents with ``embedding`` set, by a finished run, a registry model, or the served model;
        ``prompt_name='query'`` or ``'document'`` puts the model's prompt of that name before each text.

        The reply leaves out the image bytes you sent (``blob``, ``tensor``, ``data:`` URIs), as clip-as-service's
        client does: they would travel back for nothing. ``drop_image_content=False`` keeps them."""
        parameters['drop_image_content'] = drop_image_content
        if prompt_name is not None:
            parameters['prompt_name'] = prompt_name
        return self.post('/encode', docs, _model_params(run_id, model, parameters))

    def classify(
        self, docs: Sequence[BaseDoc], run_id: str | None = None, drop_image_content: bool = True, **parameters: Any
    ) -> DocList[FinetunerDoc]:
        """The documents with the predicted ``label`` and ``scores`` per class (a run trained with a classifier);
        the image bytes are left out of the reply as in ``encode``."""
        parameters['drop_image_content'] = drop_image_content
        return self.post('/classify', docs, _model_params(run_id, None, parameters))

    def evaluate(
        self,
        data: str | Sequence[BaseDoc] | None = None,
        run_id: str | None = None,
        model: str | None = None,
        **parameters: Any,
    ) -> dict[str, float]:
        """Retrieval metrics (and accuracy for a classifier) on labelled data, a path on the server or documents;
        ``spearman_cosine`` and ``pearson_cosine`` on a scored-pairs CSV; ``query_data=`` and ``index_data=`` paths
        for a query set searched in an index; a BEIR folder (``split='test'`` by default) or documents with
        ``relevant_ids`` for ``ndcg@10``, ``map@100``, ``recall@100``...; ``matryoshka_dims=[...]`` for the metrics at
        smaller sizes too."""
        params = _model_params(run_id, model, parameters)
        docs = None
        if isinstance(data, str):
            params['data'] = data
        elif data is not None:
            docs = data
        results = self.post('/evaluate', docs, params, EvaluationResult)
        return dict(results[0].metrics) if results else {}

    def export(self, run_id: str, fp16: bool = False, quantize: bool = False) -> str:
        """Export a finished run to ONNX on the server; returns the file's path there."""
        return self.post('/export', None, {'run_id': run_id, 'fp16': fp16, 'quantize': quantize}, RunInfo)[0].artifact


class Run:
    """A training run, as Finetuner's ``Run``: ``status()``, ``logs()``, ``stream_logs()``, ``metrics()``,
    ``wait()``, ``cancel()``, ``artifact``, ``save_artifact()``, ``display_metrics()``, ``example_results()``,
    ``delete()``."""

    def __init__(self, client: FinetunerClient, info: RunInfo) -> None:
        self._client = client
        self._info = info

    @property
    def name(self) -> str:
        return self._info.run_id

    id = name
    artifact_id = name  # Finetuner's name for what fit(model_artifact=...) takes: here the run id

    def info(self) -> RunInfo:
        """The run's full state, fetched now."""
        self._info = self._client.post('/runs/status', None, {'run_id': self.name}, RunInfo)[0]
        return self._info

    def status(self) -> dict[str, Any]:
        """``{'status': CREATED | STARTED | FINISHED | FAILED | CANCELLED, 'details': ...}`` as Finetuner gave it."""
        info = self.info()
        if info.error:
            details = info.error
        elif info.status == 'STARTED':
            details = f'epoch {info.epoch}/{info.epochs}, step {info.step}/{info.total_steps}'
        else:
            details = f'{info.status.lower()} at {info.finished_at or info.started_at or info.created_at}'
        return {'status': info.status, 'details': details}

    def logs(self) -> str:
        return '\n'.join(self._client.post('/runs/logs', None, {'run_id': self.name}, RunLogs)[0].lines or [])

    def stream_logs(self, interval: float = 1.0) -> Iterator[str]:
        """Yield the log's lines as they are written, until the run has ended."""
        since = 0
        while True:
            done = self.info().status in ('FINISHED', 'FAILED', 'CANCELLED')
            reply = self._client.post('/runs/logs', None, {'run_id': self.name, 'since': since}, RunLogs)[0]
            yield from reply.lines or []
            since = reply.next_since
            if done:
                return
            time.sleep(interval)

    def metrics(self) -> dict[str, float]:
        """The latest metrics: training loss and evaluation metrics of the last epoch (``before/...``: the model
        before fine-tuning, when the run had evaluation data)."""
        return dict(self.info().metrics or {})

    def wait(self, timeout: float | None = None, interval: float = 1.0) -> Run:
        """Block until the run has ended (``TimeoutError`` after ``timeout`` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.info().status not in ('FINISHED', 'FAILED', 'CANCELLED'):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f'run {self.name!r} is still {self._info.status} after {timeout} s')
            time.sleep(interval)
        return self

    def cancel(self) -> Run:
        self._info = self._client.post('/runs/cancel', None, {'run_id': self.name}, RunInfo)[0]
        return self

    @property
    def artifact(self) -> str | None:
        """The path of the trained model on the server (set once the run has FINISHED)."""
        return self.info().artifact

    def export(self, fp16: bool = False, quantize: bool = False) -> str:
        return self._client.export(self.name, fp16=fp16, quantize=quantize)

    def save_artifact(self, directory: str | os.PathLike = 'artifacts') -> Path:
        """Finetuner's ``save_artifact``: download the FINISHED run's artifact (model, ONNX exports, preprocessing,
        config, history, reports) as ``<directory>/<run_id>.zip`` and return its path. A service started with
        ``artifact=<that zip>`` serves it."""
        reply = self._client.post('/runs/artifact', None, {'run_id': self.name}, RunArtifact)[0]
        data = base64.b64decode(reply.blob)
        if hashlib.sha256(data).hexdigest() != reply.sha256:
            raise ServiceError(
                f'the artifact of run {self.name!r} arrived damaged (its sha256 differs); download it again'
            )
        path = Path(directory) / reply.name
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f'.{path.name}.{os.getpid()}.part')
        partial.write_bytes(data)
        os.replace(partial, path)  # a zip in place is a whole one
        return path

    def delete(self) -> RunInfo:
        """Remove the run and its files on the server (cancel it first if it is queued or training)."""
        return self._client.delete_run(self.name)

    def reports(self) -> RunReport:
        """What the run's reports hold: metrics before and after fine-tuning, the history, example results."""
        return self._client.post('/runs/reports', None, {'run_id': self.name}, RunReport)[0]

    def display_metrics(self, console: Console | None = None) -> dict[str, dict[str, float]]:
        """Finetuner's ``display_metrics``: print each evaluation metric of the model before and after fine-tuning
        (from the run's reports: the final model's evaluation) and return ``{'before': {...}, 'after': {...}}``."""
        report, console = self.reports(), console or Console()
        before, after = dict(report.metrics_before or {}), dict(report.metrics_after or {})
        if not after:
            console.print(f'run {self.name!r} has no before/after metrics: {self._why_no_report()}')
            return {'before': before, 'after': after}
        table = Table(title=f'run {self.name}: pre-trained vs fine-tuned')
        for column in ('metric', 'pre-trained', 'fine-tuned', 'change'):
            table.add_column(column, justify='left' if column == 'metric' else 'right')
        for name in dict.fromkeys([*before, *after]):
            old, new = before.get(name), after.get(name)
            change = f'{new - old:+.4f}' if old is not None and new is not None else ''
            table.add_row(name, _shown(old), _shown(new), change)
        console.print(table)
        return {'before': before, 'after': after}

    def example_results(self, console: Console | None = None) -> list[dict[str, Any]]:
        """Finetuner's ``example_results``: print a few evaluation queries (one per label) with the fine-tuned
        model's top matches, each with its score and whether it shares the query's label (+ / -); returns them."""
        report, console = self.reports(), console or Console()
        examples = [_example(result) for result in report.examples]
        if not examples:
            console.print(f'run {self.name!r} has no example results: {self._why_no_report()}')
        for example in examples:
            table = Table(title=f'query: {_named(example["query"])}', title_justify='left')
            for column in ('rank', 'match', 'score', 'relevant'):
                table.add_column(column, justify='left' if column == 'match' else 'right')
            for rank, match in enumerate(example['matches'], start=1):
                table.add_row(str(rank), _named(match), f'{match["score"]:.4f}', '+' if match['relevant'] else '-')
            console.print(table)
        return examples

    def _why_no_report(self) -> str:
        status = self.info().status
        if status != 'FINISHED':
            return f'it is {status} (reports are written when a run finishes)'
        return 'it had no evaluation data (train with eval_data, or query_data and index_data)'

    def __repr__(self) -> str:
        return f'Run({self.name!r}, status={self._info.status!r})'


def _json_ready(options: dict[str, Any]) -> dict[str, Any]:
    """Finetuner's option objects as the JSON the service reads: callbacks as ``{'name': ..., <fields set>}``,
    ``CSVOptions`` as the fields set."""
    out = dict(options)
    if isinstance(out.get('callbacks'), (list, tuple)):
        out['callbacks'] = [c.to_dict() if hasattr(c, 'to_dict') else c for c in out['callbacks']]
    if isinstance(out.get('csv_options'), CSVOptions):
        out['csv_options'] = out['csv_options'].model_dump(exclude_unset=True)
    return out


def _shown(value: float | None) -> str:
    return '' if value is None else f'{value:.4f}'


def _named(item: dict[str, Any]) -> str:
    """How an example shows an item: its text, else its name, and its label."""
    label = item.get('label')
    return f'{item.get("text") or item.get("name")}' + (f' (label {label})' if label is not None else '')


def _example(result: ExampleResult) -> dict[str, Any]:
    """An example result as reports/examples.json holds it: ``{'query': {...}, 'matches': [{...}, ...]}``."""
    shown = ('name', 'text', 'uri', 'label')
    query = {key: getattr(result, key) for key in shown if getattr(result, key) is not None}
    matches = [
        {key: getattr(m, key) for key in (*shown, 'score', 'relevant') if getattr(m, key) is not None}
        for m in result.matches
    ]
    return {'query': query, 'matches': matches}


def _model_params(run_id: str | None, model: str | None, parameters: dict[str, Any]) -> dict[str, Any]:
    chosen = {'run_id': run_id, 'model': model}
    return {**{k: v for k, v in chosen.items() if v is not None}, **parameters}
