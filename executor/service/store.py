"""The run store: one folder per training run, holding its status, log, metrics history and artifacts.

Layout of ``<root>/<run_id>/``::

    request.json      the training options the run was started with (``TrainConfig`` fields), as sent
    plan.json, plan/  the run as the service planned it (``executor.tuning.plan``: resolved config, task, items)
    status.json       ``RunState``: status, timestamps, progress, latest metrics, error, artifact
    train.log         the training process's output (its log records and any traceback)
    train_docs/       documents sent with the request, in runs created before plans were saved
    config.json       the resolved configuration (the trainer writes it: task, class names, device)
    history.jsonl     one row of metrics per epoch (the trainer writes it)
    checkpoints/      ``last.pt``, what ``resume`` continues from
    model.pt, preprocessing.json, model.onnx, reports/, tensorboard/

Every file is replaced atomically (written beside, then renamed over), so a crash at any moment leaves either the
old or the new version. A status moves CREATED -> STARTED -> FINISHED | FAILED | CANCELLED; FAILED and CANCELLED
runs can be set back to CREATED to resume from their last checkpoint.

The artifact's own file names (``model.pt``, ``model.onnx``, ``history.jsonl``, ...) are ``executor.tuning.artifact``'s;
the names here are those of the run folder around it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from executor.tuning.artifact import HISTORY_FILE, Runtime, served_file
from executor.tuning.data.sources import Item
from executor.tuning.files import atomic_write_text

if TYPE_CHECKING:
    from executor.tuning.plan import RunPlan

logger = logging.getLogger(__name__)

Status = Literal['CREATED', 'STARTED', 'FINISHED', 'FAILED', 'CANCELLED']
TERMINAL: frozenset[str] = frozenset({'FINISHED', 'FAILED', 'CANCELLED'})
RESUMABLE: frozenset[str] = frozenset({'FAILED', 'CANCELLED'})
RUN_ID_PATTERN = r'^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'
_RUN_ID = re.compile(RUN_ID_PATTERN)

STATUS_FILE = 'status.json'
REQUEST_FILE = 'request.json'
LOG_FILE = 'train.log'
DOCS_DIR = 'train_docs'
TRASH_DIR = '.deleted'  # runs being removed: out of the store at once, their files removed after


class RunNotFoundError(LookupError):
    """No run has this id in the store."""

    def __str__(self) -> str:  # LookupError would quote the whole message
        return str(self.args[0])


def now() -> str:
    """The current time in UTC, ISO 8601."""
    return datetime.now(UTC).isoformat(timespec='milliseconds')


def finite_metrics(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of ``values`` as floats (NaN and inf would make the status invalid JSON)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            out[key] = float(value)
    return out


@dataclass
class RunState:
    """What ``status.json`` holds; the fields up to ``artifact`` are the service's ``RunInfo``."""

    run_id: str
    status: Status = 'CREATED'
    created_at: str = field(default_factory=now)
    started_at: str | None = None
    finished_at: str | None = None
    epoch: int = 0
    epochs: int | None = None
    step: int = 0
    total_steps: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    artifact: str | None = None
    pid: int | None = None  # the training process, while the run is STARTED
    resume: bool = False  # the next start continues from the last checkpoint

    INFO_FIELDS = (
        'run_id',
        'status',
        'created_at',
        'started_at',
        'finished_at',
        'epoch',
        'epochs',
        'step',
        'total_steps',
        'metrics',
        'error',
        'artifact',
    )

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def info(self) -> dict[str, Any]:
        """The public fields (``RunInfo``)."""
        return {name: getattr(self, name) for name in self.INFO_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise ValueError(
            f'run_id {run_id!r} is not valid: use 1-128 letters, digits, ".", "_" or "-", starting with a '
            'letter or digit'
        )
    return run_id


class RunStore:
    """The runs under ``root``, one folder each. Thread-safe within a process.

    The service and a run's training process both write ``status.json``, never at the same time: the training
    process owns it from its start to its end, and the service writes only before the start or after the end.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._creating: set[str] = set()  # run ids being written by create()
        shutil.rmtree(self.root / TRASH_DIR, ignore_errors=True)  # what a delete interrupted by a crash left

    # --- runs ------------------------------------------------------------------------------------------------------

    def folder(self, run_id: str) -> Path:
        """The folder of an existing run; ``RunNotFoundError`` names the known runs otherwise."""
        check_run_id(run_id)
        path = self.root / run_id
        if not (path / STATUS_FILE).is_file():
            known = self.ids()
            shown = ', '.join(repr(r) for r in known[-10:]) or 'none yet'
            raise RunNotFoundError(f'unknown run_id {run_id!r}; known runs (latest): {shown}. List them with /runs')
        return path

    def ids(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / STATUS_FILE).is_file())

    def create(self, request: dict[str, Any], plan: RunPlan | None = None, run_id: str | None = None) -> RunState:
        """A new CREATED run with its request and its plan (the items it trains on) written before its status; a run
        without a plan (made by hand) is planned from its request when it starts.

        ``run_id`` defaults to a fresh time-ordered id. A run's status file is written last, so a run that was
        half-created (a crash while the documents were written) is not a run and never shows up.
        """
        with self._lock:
            if run_id is None:
                run_id = time.strftime('run-%Y%m%d-%H%M%S-', time.gmtime()) + secrets.token_hex(3)
            check_run_id(run_id)
            folder = self.root / run_id
            # a name is taken from the moment a request claims it: concurrent requests for one run_name must not
            # all be told CREATED while only the first one's run exists
            if (folder / STATUS_FILE).exists() or run_id in self._creating:
                raise ValueError(
                    f'a run named {run_id!r} exists already; choose another run_name, or resume it with '
                    f'resume={run_id!r}'
                )
            self._creating.add(run_id)
            folder.mkdir(parents=True, exist_ok=True)
        try:
            if plan is not None:
                plan.save(folder)
            atomic_write_text(folder / REQUEST_FILE, json.dumps(request, indent=2))
            state = RunState(run_id)
            self._write(state)
        finally:
            with self._lock:
                self._creating.discard(run_id)
        logger.info('created run %s', run_id)
        return state

    def get(self, run_id: str) -> RunState:
        path = self.folder(run_id) / STATUS_FILE
        return RunState.from_dict(json.loads(path.read_text(encoding='utf-8')))

    def list(self) -> list[RunState]:
        """Every run, oldest first."""
        states = []
        for run_id in self.ids():
            try:
                states.append(self.get(run_id))
            except (OSError, ValueError) as err:  # one unreadable folder must not hide the others
                logger.warning('skipping run folder %s: %s', run_id, err)
        return sorted(states, key=lambda s: (s.created_at, s.run_id))

    def delete(self, run_id: str) -> RunState:
        """Remove a run that has ended and all its files; returns its last state. The folder is first renamed out of
        the store (at once, atomically: the run is gone for every reader), then removed. Whether a run may go is the
        caller's decision (``JobQueue.delete`` refuses a run in progress)."""
        with self._lock:
            state = self.get(run_id)
            trash = self.root / TRASH_DIR
            trash.mkdir(exist_ok=True)
            doomed = trash / f'{run_id}-{secrets.token_hex(4)}'
            os.replace(self.root / run_id, doomed)
        shutil.rmtree(doomed)
        logger.info('deleted run %s', run_id)
        return state

    def update(self, run_id: str, **changes: Any) -> RunState:
        """Read, change and write back a run's status atomically."""
        with self._lock:
            state = self.get(run_id)
            for key, value in changes.items():
                if not hasattr(state, key):
                    raise AttributeError(f'RunState has no field {key!r}')
                setattr(state, key, value)
            self._write(state)
            return state

    def _write(self, state: RunState) -> None:
        atomic_write_text(self.root / state.run_id / STATUS_FILE, json.dumps(asdict(state), indent=2))

    def update_request(self, run_id: str, **changes: Any) -> dict[str, Any]:
        """Change options of a run's request (``resume`` with other ``epochs``), written back atomically."""
        with self._lock:
            request = {**self.request(run_id), **changes}
            atomic_write_text(self.folder(run_id) / REQUEST_FILE, json.dumps(request, indent=2))
            return request

    def request(self, run_id: str) -> dict[str, Any]:
        return json.loads((self.folder(run_id) / REQUEST_FILE).read_text(encoding='utf-8'))

    def recover(self, alive: Callable[[int], bool]) -> list[str]:
        """After a restart: runs left STARTED by a process that is gone become FAILED ("interrupted").

        Returns the ids of runs still CREATED (queued when the service stopped), oldest first, to queue again.
        """
        queued = []
        for state in self.list():
            if state.status == 'STARTED' and not (state.pid and alive(state.pid)):
                self.update(
                    state.run_id,
                    status='FAILED',
                    finished_at=now(),
                    pid=None,
                    error=(
                        'interrupted: the service stopped while the run was training; resume it with '
                        f'/train resume={state.run_id!r} (it continues from its last checkpoint)'
                    ),
                )
                logger.warning('run %s was interrupted by a stop of the service; marked FAILED', state.run_id)
            elif state.status == 'CREATED':
                queued.append(state.run_id)
        return queued

    # --- what a run left ------------------------------------------------------------------------------------------

    def read_log(self, run_id: str, since: int = 0, limit: int | None = None) -> tuple[list[str], int]:
        """Lines ``since`` (0-based) onwards, at most ``limit``, and the line number to ask for next."""
        path = self.folder(run_id) / LOG_FILE
        if not path.is_file():
            return [], since
        lines = []
        with open(path, encoding='utf-8', errors='replace') as fh:
            for number, line in enumerate(fh):
                if number < since:
                    continue
                if limit is not None and len(lines) >= limit:
                    break
                lines.append(line.rstrip('\n'))
        return lines, since + len(lines)

    def history(self, run_id: str) -> list[dict[str, float]]:
        path = self.folder(run_id) / HISTORY_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding='utf-8').splitlines() if line.strip()]

    def model_file(self, run_id: str, runtime: Runtime) -> Path:
        """The model file of a FINISHED run (``artifact.served_file``): ``model.onnx`` for ``runtime='onnx'`` when it
        was exported, else ``model.pt``."""
        state = self.get(run_id)
        if state.status != 'FINISHED':
            hint = (
                'wait until it reads FINISHED'
                if not state.done
                else f'resume it with /train resume={run_id!r}'
                if state.status in RESUMABLE
                else ''
            )
            raise ValueError(f'run {run_id!r} is {state.status}, it has no model to serve yet; {hint}'.rstrip('; '))
        return served_file(self.folder(run_id), runtime)

    # --- documents sent with /train -------------------------------------------------------------------------------

    def train_docs(self, run_id: str) -> list[Item] | None:
        """The documents sent with the request of a run created before plans were saved, as items (``None`` when it
        named its data by path)."""
        folder = self.folder(run_id) / DOCS_DIR
        index = folder / 'records.jsonl'
        if not index.is_file():
            return None
        items = []
        for line in index.read_text(encoding='utf-8').splitlines():
            record = json.loads(line)
            uri = str(folder / record['file']) if 'file' in record else record.get('uri')
            items.append(
                Item(
                    id=record['id'],
                    uri=uri,
                    text=record.get('text'),
                    label=record.get('label'),
                    name=record.get('name', ''),
                )
            )
        return items


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (and is not a zombie) on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f'/proc/{pid}/stat')
    if stat.is_file():
        try:
            return stat.read_text().rsplit(')', 1)[1].split()[0] != 'Z'
        except (OSError, IndexError):
            return False
    return True
