"""What the service holds, for clients that do not share its disk: the models it can train and serve (``/models``), a
run's artifact as a zip (``/runs/artifact``) and its reports (``/runs/reports``), and removing a run (``/runs/delete``).

``CatalogEndpoints`` is the base class of ``FinetunerExecutor`` (jina's executors inherit their base's endpoints; a
plain mixin would not do: jina's ``@requests`` gives a class that is no executor a ``requests`` dict of its own, which
hides the executor's); it uses the executor's ``names``, ``store`` (the runs), ``jobs`` (the queue), ``encoders``
(loaded models) and ``served`` (the model file ``uses_with`` ``artifact`` serves).
"""

# No `from __future__ import annotations` here: jina reads the endpoints' annotations as live objects.
import asyncio
import base64
import dataclasses
import hashlib
import json
import threading
from pathlib import Path
from typing import Any, Optional

from docarray import DocList
from jina import Executor, requests

from executor.docs import (
    EpochMetrics,
    ExampleMatch,
    ExampleResult,
    FinetunerDoc,
    ModelInfo,
    RunArtifact,
    RunInfo,
    RunReport,
)
from executor.params import ModelsParams, ParameterError, RunParams, parse
from executor.service.artifact_io import pack_artifact
from executor.service.store import RunState, finite_metrics
from executor.tuning.artifact import REPORTS_DIR
from executor.tuning.models import describe_models
from executor.tuning.reports import EXAMPLES_JSON, METRICS_JSON


class CatalogEndpoints(Executor):
    """Endpoints: /models, /runs/artifact, /runs/reports, /runs/delete."""

    @requests(on='/models')
    async def models(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[ModelInfo]:
        """Every model the service can train and serve, those whose pretrained weights are on the server first."""
        params = parse(ModelsParams, parameters, '/models', self.names)
        bound = self.settings.max_model_names
        if params.names is not None and len(params.names) > bound:
            raise ParameterError(
                f'invalid parameters for /models: names holds {len(params.names)} distinct models, more than the '
                f'{bound} one request describes (max_model_names, set in uses_with): each is built to measure its '
                f'output_dim; ask in requests of at most {bound} names, or leave names out for every model (measured '
                'where the weights are local)'
            )
        stop = threading.Event()  # set when the client is gone or the service stops: the thread ends at the next model
        self.stopping.append(stop)
        try:
            described = await asyncio.to_thread(describe_models, params.names, params.local_only, stop.is_set)
        finally:
            stop.set()
            self.stopping.remove(stop)
        return DocList[ModelInfo]([ModelInfo(**dataclasses.asdict(model)) for model in described])

    @requests(on='/runs/artifact')
    async def run_artifact(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[RunArtifact]:
        """A FINISHED run's artifact as one zip (model, ONNX exports, preprocessing, config, history, reports), which
        ``artifact=<the zip>`` serves."""
        params = parse(RunParams, parameters, '/runs/artifact', self.names)
        return DocList[RunArtifact]([await asyncio.to_thread(self._pack_artifact, params.run_id)])

    @requests(on='/runs/reports')
    async def run_reports(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[RunReport]:
        """What a run's reports hold: metrics before and after fine-tuning, history, example results (whatever a run
        still in progress has so far)."""
        params = parse(RunParams, parameters, '/runs/reports', self.names)
        return DocList[RunReport]([await asyncio.to_thread(self._report, params.run_id)])

    @requests(on='/runs/delete')
    async def delete_run(self, docs: DocList[FinetunerDoc], parameters: dict, **kwargs) -> DocList[RunInfo]:
        """Remove a FINISHED, FAILED or CANCELLED run and its files (a run queued or training is refused: cancel it
        first); the reply is the run as it was."""
        params = parse(RunParams, parameters, '/runs/delete', self.names)
        return DocList[RunInfo]([RunInfo(**(await asyncio.to_thread(self._delete_run, params.run_id)).info())])

    # --- the work, off the event loop ------------------------------------------------------------------------------

    def _pack_artifact(self, run_id: str) -> RunArtifact:
        try:
            folder = self.store.model_file(run_id, 'torch').parent  # raises, saying why, unless the run FINISHED
            data = pack_artifact(folder, f'run {run_id!r}')
        except FileNotFoundError:  # a /runs/delete took its files meanwhile: then the run is unknown (404)
            self.store.folder(run_id)
            raise
        digest, text = hashlib.sha256(data).hexdigest(), base64.b64encode(data).decode('ascii')
        return RunArtifact(run_id=run_id, name=f'{run_id}.zip', blob=text, size=len(data), sha256=digest)

    def _report(self, run_id: str) -> RunReport:
        try:
            return self._read_report(run_id)
        except FileNotFoundError:  # a /runs/delete took its files meanwhile: then the run is unknown (404)
            self.store.folder(run_id)
            raise

    def _read_report(self, run_id: str) -> RunReport:
        reports = self.store.folder(run_id) / REPORTS_DIR
        metrics = _read_json(reports / METRICS_JSON) or {}
        return RunReport(
            run_id=run_id,
            metrics_before=_finite(metrics.get('before')),
            metrics_after=_finite(metrics.get('after')),
            history=DocList[EpochMetrics](
                [EpochMetrics(metrics=finite_metrics(r)) for r in self.store.history(run_id)]
            ),
            examples=DocList[ExampleResult](
                [
                    ExampleResult(
                        **e['query'], matches=DocList[ExampleMatch]([ExampleMatch(**m) for m in e['matches']])
                    )
                    for e in _read_json(reports / EXAMPLES_JSON) or []
                ]
            ),
            files=sorted(p.relative_to(reports).as_posix() for p in reports.rglob('*') if p.is_file()),
        )

    def _delete_run(self, run_id: str) -> RunState:
        folder = self.store.folder(run_id)
        if self.served is not None and folder in Path(self.served).parents:
            raise ValueError(
                f'run {run_id!r} is the model this executor serves (uses_with artifact={run_id!r}); start the '
                'executor with another artifact (or none) first, then delete the run'
            )
        state = self.jobs.delete(run_id)
        self.encoders.drop(lambda key: key[-1] == run_id)
        return state


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding='utf-8')) if path.is_file() else None


def _finite(values: Optional[dict]) -> Optional[dict[str, float]]:
    return None if values is None else finite_metrics(values)
