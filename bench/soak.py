"""Soak test of FinetunerExecutor: concurrent clients send /encode and /runs/status while a run trains, and hostile
clients send what should be refused.

Starts the service as users do (`jina executor --uses config.yml`, in a temporary workspace), starts a training run
on scikit-learn's digits that outlasts the soak, then runs `--clients` client threads for `--seconds`, each
alternating an /encode of one image (the served default model) and a /runs/status of the training run, and
`--hostile` threads cycling through issue 21's hostile requests: an oversized batch_size, a decompression bomb
(a 17 KB PNG of 12000 x 12000), a folder whose class folder links outside the data roots, a /train reusing the
training run's name, a NUL byte in a uri, bytes that are no image, a CSV naming URLs; and issue 32's: /models with
20,000 names, 65 names, and 64 names given up by the client after 2 s, ArcFace sized beyond the serving process's
budget (matryoshka_dims of 62.5 million, 100,000 classes of 65,536), a CSV with a byte that is not UTF-8 (checked for
its contents in the answer), one with 10^5 columns, one naming a column twice, a FIFO, the rot13 encoding, callbacks
nested 40 deep, a loss option naming os.system, a 200 KB path and a 100 KB model name. Prints the request rate,
latencies, errors of the good requests (by message), how each hostile kind was answered, whether the worker
process is the one that started, and the serving processes' RSS at the start and at the end (the training process
is apart and not counted), then cancels the run and stops the service with SIGTERM during a /models request,
printing how long its processes took to end.

    .venv/bin/python bench/soak.py                  # 10 minutes, 16 good clients, 4 hostile (the acceptance run)
    .venv/bin/python bench/soak.py --seconds 90     # a short one

Targets: 0 failed good requests, every hostile request refused, the same worker throughout, RSS growth under 5 %.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PORT = [0]  # the service's port, for stop_service
sys.path.insert(0, str(REPO))

from executor.client import FinetunerClient, ServiceError  # noqa: E402
from executor.docs import FinetunerDoc  # noqa: E402
from executor.tuning.data.digits import digits, write_digits_folder  # noqa: E402
from executor.tuning.models import list_models  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seconds', type=float, default=600, help='how long the clients send requests')
    parser.add_argument('--clients', type=int, default=16, help='concurrent client threads')
    parser.add_argument('--image-size', type=int, default=64, help='pixels of the images sent to /encode')
    parser.add_argument('--hostile', type=int, default=4, help='client threads sending requests to be refused')
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix='soak-') as tmp:
        workspace, data = Path(tmp) / 'ws', Path(tmp) / 'data'
        write_digits_folder(data / 'digits', per_class=20, size=64)
        hostile_data(data, Path(tmp) / 'outside')
        port = PORT[0] = free_port()
        service = start_service(workspace, data, port)
        try:
            soak(args, port, service)
        finally:
            stop_service(service)


def stop_service(service: subprocess.Popen) -> None:
    """SIGTERM to the service's process group, while a long /models request is in flight, and the time until every
    serving process has ended (SIGKILL after 30 s)."""
    pids = serving_pids(service.pid)
    thread = threading.Thread(target=given_up, args=(PORT[0], {'names': list_models()[:64]}), daemon=True)
    thread.start()
    time.sleep(1)
    started = time.monotonic()
    os.killpg(service.pid, signal.SIGTERM)
    while serving_pids(service.pid) and time.monotonic() - started < 30:
        time.sleep(0.1)
    stopped = time.monotonic() - started
    left = serving_pids(service.pid)
    if left:
        os.killpg(service.pid, signal.SIGKILL)
    service.wait()
    print(
        f'SIGTERM during a /models request: {len(pids)} serving processes ended in {stopped:.1f} s'
        + (f'; {left} still ran and were killed' if left else '')
    )


def soak(args: argparse.Namespace, port: int, service: subprocess.Popen) -> None:
    client = FinetunerClient(f'grpc://127.0.0.1:{port}')
    images, _ = digits(per_class=1, size=args.image_size)
    run = client.fit(
        model='resnet18',
        pretrained=False,
        train_data='digits',
        image_size=64,
        epochs=10_000,
        batch_size=32,
        run_name='soak',
    )
    while run.status()['status'] != 'STARTED':
        time.sleep(0.5)
    client.encode([FinetunerDoc(tensor=images[0])])  # load the model before the first RSS reading
    warm_up = Stats()
    for kind, call in hostile_calls(client, port):  # each kind once before the first RSS reading
        hostile_call(kind, call, warm_up)
    rss_start = serving_rss(service.pid)
    workers = serving_pids(service.pid)

    stats = Stats()
    stop = time.monotonic() + args.seconds
    threads = [
        threading.Thread(target=client_loop, args=(port, images[i % len(images)], stop, stats))
        for i in range(args.clients)
    ]
    threads += [threading.Thread(target=hostile_loop, args=(port, i, stop, stats)) for i in range(args.hostile)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    samples = [rss_start]  # the RSS every tenth of the soak: growth that levels off is warm-up, not a leak
    while any(thread.is_alive() for thread in threads):
        time.sleep(min(args.seconds / 10, max(0.0, stop - time.monotonic())) or 0.5)
        samples.append(serving_rss(service.pid))
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    rss_end = samples[-1]
    progress = run.info()
    run.cancel()

    total = sum(len(v) for v in stats.latency.values())
    print(
        f'{args.clients} clients for {elapsed:.0f} s while run "soak" trained (epoch {progress.epoch}, '
        f'step {progress.step}, status {progress.status})'
    )
    print(f'requests: {total} ok, {stats.error_count} errors, {total / elapsed:.1f} requests/s')
    for endpoint, values in sorted(stats.latency.items()):
        ms = np.array(values) * 1000
        p50, p95 = np.percentile(ms, [50, 95])
        print(f'  {endpoint:12s} {len(ms):6d} ok  p50 {p50:7.1f} ms  p95 {p95:7.1f} ms  max {ms.max():7.1f} ms')
    for message, count in stats.errors.most_common(5):
        print(f'  error x{count}: {message[:200]}')
    print(f'hostile requests: {sum(stats.hostile.values())}, by kind and answer:')
    for (kind, answer), count in sorted(stats.hostile.items()):
        print(f'  {kind:14s} x{count:5d}  {answer[:150]}')
    same = serving_pids(service.pid) == workers
    print(f'serving processes: {workers} at the start, {"the same" if same else serving_pids(service.pid)} at the end')
    growth = 100 * (rss_end - rss_start) / rss_start
    print(
        f'service RSS: {rss_start / 2**20:.0f} MiB at the start, {rss_end / 2**20:.0f} MiB at the end '
        f'({growth:+.1f} %; target < 5 %); every tenth: {" ".join(f"{r / 2**20:.0f}" for r in samples)} MiB'
    )


class Stats:
    """Latencies per endpoint and errors by message, from every client thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = collections.defaultdict(list)
        self.errors: collections.Counter[str] = collections.Counter()
        self.hostile: collections.Counter[tuple[str, str]] = collections.Counter()

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def record(self, endpoint: str, seconds: float, error: str | None) -> None:
        with self.lock:
            if error is None:
                self.latency[endpoint].append(seconds)
            else:
                self.errors[f'{endpoint}: {error}'] += 1


def client_loop(port: int, image: np.ndarray, stop: float, stats: Stats) -> None:
    client = FinetunerClient(f'grpc://127.0.0.1:{port}')
    doc = FinetunerDoc(tensor=image)
    calls = [('/encode', lambda: client.encode([doc])), ('/runs/status', lambda: client.get_run('soak'))]
    i = 0
    while time.monotonic() < stop:
        endpoint, call = calls[i % 2]
        i += 1
        started = time.monotonic()
        try:
            call()
            error = None
        except (ServiceError, ConnectionError, OSError) as err:
            error = f'{type(err).__name__}: {err}'
        stats.record(endpoint, time.monotonic() - started, error)


def hostile_data(data: Path, outside: Path) -> None:
    """A folder whose class folder links outside the data roots, a CSV naming URLs, and issue 32's files: a CSV with
    a byte that is not UTF-8, one with a header of 10^5 columns, one naming a column twice, and a FIFO."""
    write_digits_folder(outside / 'elsewhere', per_class=2, size=32)
    write_digits_folder(data / 'linked', per_class=2, size=32)
    shutil.rmtree(data / 'linked' / '9')
    (data / 'linked' / '9').symlink_to(outside / 'elsewhere' / '9')
    (data / 'urls.csv').write_text('uri,label\nhttp://example.com/a.png,1\nhttp://example.com/b.png,2\n')
    lines = ''.join(f'secret-{i},x\n' for i in range(5000))
    (data / 'leak.csv').write_bytes(b'text,label\n' + lines.encode() + b'\xff,y\n')
    (data / 'wide.csv').write_text(','.join(f'c{i}' for i in range(10**5)) + '\n1,2\n')
    (data / 'dup.csv').write_text('uri,label,uri\ndigits/0/a.png,0,x\n')
    os.mkfifo(data / 'fifo.csv')


def hostile_calls(client: FinetunerClient, port: int) -> list[tuple[str, Callable[[], object]]]:
    buffer = io.BytesIO()
    Image.new('1', (12000, 12000)).save(buffer, format='PNG')
    bomb = buffer.getvalue()
    tiny = np.zeros((3, 3), np.uint8)
    train = {'model': 'resnet18', 'pretrained': False, 'image_size': 32, 'epochs': 1}
    classes = {'loss_options': {'num_classes': 100_000}}
    nested: list = []
    for _ in range(40):
        nested = [nested]
    return [
        ('batch_size', lambda: client.encode([FinetunerDoc(tensor=tiny)] * 100, batch_size=4096)),
        ('bomb', lambda: client.encode([FinetunerDoc(blob=bomb)] * 4)),
        ('symlink', lambda: client.fit(train_data='linked', **train)),
        ('run_name', lambda: client.fit(train_data='digits', run_name='soak', **train)),
        ('nul_uri', lambda: client.encode([FinetunerDoc(uri='digits/\x00.png')])),
        ('not_an_image', lambda: client.encode([FinetunerDoc(blob=b'GIF89a junk')])),
        ('url_csv', lambda: client.fit(train_data='urls.csv', **train)),
        # issue 32
        ('names_x20000', lambda: client.post('/models', [], {'names': ['efficientnet_lite0'] * 20_000})),
        ('names_65', lambda: client.post('/models', [], {'names': list_models()[:65]})),
        ('models_gone', lambda: given_up(port, {'names': list_models()[:64]})),
        ('matryoshka', lambda: client.fit(train_data='digits', loss='ArcFaceLoss', matryoshka_dims=[62_500_000])),
        ('arcface_size', lambda: client.fit(train_data='digits', loss='ArcFaceLoss', output_dim=65536, **classes)),
        ('bad_byte_csv', lambda: leaked(lambda: client.fit(train_data='leak.csv', **train))),
        ('wide_csv', lambda: client.fit(train_data='wide.csv', **train)),
        ('dup_header', lambda: client.fit(train_data='dup.csv', **train)),
        ('fifo', lambda: client.fit(train_data='fifo.csv', **train)),
        ('rot13', lambda: client.fit(train_data='urls.csv', csv_options={'encoding': 'rot13'}, **train)),
        ('nested', lambda: client.fit(train_data='digits', callbacks=nested, **train)),
        ('os_system', lambda: client.fit(train_data='digits', loss_options={'distance': 'os.system'}, **train)),
        ('long_path', lambda: client.fit(train_data='a/' * 100_000, **train)),
        ('long_model', lambda: client.encode([FinetunerDoc(tensor=tiny)], model='m' * 100_000)),
    ]


def given_up(port: int, parameters: dict) -> str:
    """A /models request whose client gives up after 2 s (the service stops measuring then)."""
    from docarray import DocList
    from jina import Client

    try:
        Client(host=f'grpc://127.0.0.1:{port}').post(
            '/models', inputs=DocList[FinetunerDoc](), parameters=parameters, timeout=2
        )
    except ConnectionError as err:
        if 'DEADLINE_EXCEEDED' in str(err):
            return 'given up by the client after 2 s'
        raise
    return 'answered within 2 s'


def leaked(call: Callable[[], object]) -> object:
    """``call``, its refusal checked for the contents of the file it names."""
    try:
        return call()
    except ServiceError as err:
        if 'secret' in str(err):
            return f'LEAKED the file: {str(err)[:100]}'
        raise


def hostile_call(kind: str, call: Callable[[], object], stats: Stats) -> None:
    try:
        result = call()
        answer = result if isinstance(result, str) else 'ACCEPTED (should have been refused)'
    except ServiceError as err:
        answer = f'refused: {str(err)[:120]}'
    except (ConnectionError, OSError) as err:
        answer = f'NO ANSWER: {type(err).__name__}: {err}'
    with stats.lock:
        stats.hostile[kind, re.sub(r"'[0-9a-f]{32}'", "'<id>'", answer)] += 1


def hostile_loop(port: int, offset: int, stop: float, stats: Stats) -> None:
    calls = hostile_calls(FinetunerClient(f'grpc://127.0.0.1:{port}'), port)
    i = offset
    while time.monotonic() < stop:
        kind, call = calls[i % len(calls)]
        i += 1
        hostile_call(kind, call, stats)


def start_service(workspace: Path, data: Path, port: int) -> subprocess.Popen:
    command = [
        sys.executable,
        '-m',
        'jina',
        'executor',
        '--uses',
        'config.yml',
        '--host',
        '127.0.0.1',
        '--port',
        str(port),
        '--workspace',
        str(workspace),
        '--uses-with',
        json.dumps({'data_roots': [str(data)], 'runtime': 'torch'}),
    ]
    env = {**os.environ, 'JINA_OPTOUT_TELEMETRY': '1', 'PYTHONPATH': str(REPO)}
    service = subprocess.Popen(
        command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    client = FinetunerClient(f'grpc://127.0.0.1:{port}')
    deadline = time.monotonic() + 180
    while True:
        try:
            client.list_runs()
            return service
        except (ServiceError, ConnectionError):
            if service.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    'the service did not start; run the command by hand to see why: ' + ' '.join(command)
                ) from None
            time.sleep(0.5)


def serving_rss(group: int) -> int:
    """Total RSS in bytes of the service's processes (its process group), training processes left out."""
    total = 0
    for proc in Path('/proc').iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / 'stat').read_text().rsplit(')', 1)[1].split()
            if int(stat[2]) != group or b'executor.service.worker' in (proc / 'cmdline').read_bytes():
                continue
            fields = dict(line.split(':', 1) for line in (proc / 'status').read_text().splitlines() if ':' in line)
            total += int(fields['VmRSS'].split()[0]) * 1024
        except (OSError, KeyError, IndexError, ValueError):  # the process ended meanwhile
            continue
    return total


def serving_pids(group: int) -> list[int]:
    """The service's live processes (its process group; an ended one not yet reaped, a zombie, is no longer one),
    training processes left out: a restarted worker changes it."""
    pids = []
    for proc in Path('/proc').iterdir():
        try:
            if not proc.name.isdigit():
                continue
            stat = (proc / 'stat').read_text().rsplit(')', 1)[1].split()
            if stat[0] != 'Z' and int(stat[2]) == group:
                if b'executor.service.worker' not in (proc / 'cmdline').read_bytes():
                    pids.append(int(proc.name))
        except (OSError, IndexError, ValueError):
            continue
    return sorted(pids)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


if __name__ == '__main__':
    main()
