"""Soak test of FinetunerExecutor: concurrent clients send /encode and /runs/status while a run trains.

Starts the service as users do (`jina executor --uses config.yml`, in a temporary workspace), starts a training run
on scikit-learn's digits that outlasts the soak, then runs `--clients` client threads for `--seconds`, each
alternating an /encode of one image (the served default model) and a /runs/status of the training run. Prints the
request rate, latencies, errors (by message) and the serving processes' RSS at the start and at the end (the
training process is apart and not counted), then cancels the run and stops the service.

    .venv/bin/python bench/soak.py                  # 10 minutes, 16 clients (the acceptance run)
    .venv/bin/python bench/soak.py --seconds 90     # a short one

Targets: 0 errors, RSS growth under 5 %.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from executor.client import FinetunerClient, ServiceError  # noqa: E402
from executor.docs import FinetunerDoc  # noqa: E402
from executor.tuning.data.samples import digits, write_digits_folder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seconds', type=float, default=600, help='how long the clients send requests')
    parser.add_argument('--clients', type=int, default=16, help='concurrent client threads')
    parser.add_argument('--image-size', type=int, default=64, help='pixels of the images sent to /encode')
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix='soak-') as tmp:
        workspace, data = Path(tmp) / 'ws', Path(tmp) / 'data'
        write_digits_folder(data / 'digits', per_class=20, size=64)
        port = free_port()
        service = start_service(workspace, data, port)
        try:
            soak(args, port, service)
        finally:
            os.killpg(service.pid, signal.SIGTERM)
            try:
                service.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(service.pid, signal.SIGKILL)


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
    rss_start = serving_rss(service.pid)

    stats = Stats()
    stop = time.monotonic() + args.seconds
    threads = [
        threading.Thread(target=client_loop, args=(port, images[i % len(images)], stop, stats))
        for i in range(args.clients)
    ]
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


if __name__ == '__main__':
    main()
