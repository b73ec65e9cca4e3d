"""Benchmark of exact top-k search: executor.tuning.evaluation.knn vs numpy brute force vs faiss IndexFlatIP.

The default case is a 100k x 1280 float32 index (random, L2-normalised), 1k queries, top-10, cosine (= inner
product on normalised vectors). Each method runs in its own subprocess on the same saved arrays, so peak memory
is measured apart; the timed searches are interleaved round by round (one search of each method per round, the
order rotating) so that load from other processes hits every method alike, and the best round of each is compared.
The ratios are printed side by side in one run.

Peak memory is the method's own: the subprocess loads the data, warms up on a small slice, resets the kernel's
peak-RSS counter (/proc/self/clear_refs) and reads VmHWM - VmRSS after the timed runs (on systems without it,
the ru_maxrss growth, which can under-count).

    .venv/bin/python bench/knn.py                 # the full case
    .venv/bin/python bench/knn.py --n 20000       # a quick one

`--backends` measures VectorIndexer's backends instead (executor/indexing/, the code the indexer runs, without jina
around it): seeded random unit vectors (default 100k x 384), `--queries` queries, recall@10 against exact search,
queries per second at batch 1 and 64, index time (upserts of 1000), memory (the process's RSS growth; Milvus: the
server's RSS) and disk. Milvus runs on a Milvus Lite server the benchmark starts; Qdrant in its embedded local mode,
which does not quantize: `qdrant-int8` needs `--qdrant-url` of a Qdrant server, and is skipped without one.

    .venv/bin/python bench/knn.py --backends hnsw,qdrant,milvus,milvus-ivf-sq8 --n 100000 --dim 384

faiss is only a yardstick, not a dependency: `.venv/bin/pip install faiss-cpu` (the faiss row is skipped without it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ('executor', 'numpy', 'faiss')
FAISS_HINT = 'faiss is not installed: .venv/bin/pip install faiss-cpu'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--n', type=int, default=100_000, help='index rows')
    parser.add_argument('--dim', type=int, default=1280)
    parser.add_argument('--queries', type=int, default=1000)
    parser.add_argument('--k', type=int, default=10)
    parser.add_argument('--repeats', type=int, default=5, help='timed rounds; each runs every method once')
    parser.add_argument('--query-chunk', type=int, default=None, help='knn query_chunk (default: its own)')
    parser.add_argument('--index-chunk', type=int, default=None, help='knn index_chunk (default: its own)')
    parser.add_argument(
        '--backends', help=f'measure these VectorIndexer backends instead (comma-separated: {", ".join(BACKENDS)})'
    )
    parser.add_argument('--qdrant-url', help='a Qdrant server for the qdrant-int8 row')
    parser.add_argument('--worker', choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument('--data', type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backends:
        bench_backends(args)
    elif args.worker:
        run_worker(args)
    else:
        run_all(args)


def run_all(args: argparse.Namespace) -> None:
    import numpy as np

    cores = os.cpu_count() or 1
    print(
        f'exact top-{args.k}: {args.queries} queries x {args.n} x {args.dim} float32 index, cosine, '
        f'{cores} CPU threads, best of {args.repeats} interleaved rounds; '
        f'load average at start {os.getloadavg()[0]:.1f}'
    )
    with tempfile.TemporaryDirectory(prefix='bench-knn-') as tmp:
        data = Path(tmp)
        rng = np.random.default_rng(0)
        for name, rows in (('index', args.n), ('queries', args.queries)):
            x = rng.standard_normal((rows, args.dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            np.save(data / f'{name}.npy', x)
        del x
        env = {
            **os.environ,
            'OMP_NUM_THREADS': str(cores),
            'OPENBLAS_NUM_THREADS': str(cores),
            'MKL_NUM_THREADS': str(cores),
        }
        workers = {}
        for method in METHODS:
            cmd = [sys.executable, __file__, '--worker', method, '--data', str(data), '--k', str(args.k)]
            for flag in ('query_chunk', 'index_chunk'):
                if getattr(args, flag) is not None:
                    cmd += [f'--{flag.replace("_", "-")}', str(getattr(args, flag))]
            workers[method] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        try:
            results = {method: _ask(worker, 'ready') for method, worker in workers.items()}
            live = [method for method in METHODS if 'error' not in results[method]]
            times: dict[str, list[float]] = {method: [] for method in live}
            # Interleaved rounds (the order rotating) so that load from elsewhere hits every method alike.
            for round_ in range(args.repeats):
                for method in live[round_ % len(live) :] + live[: round_ % len(live)]:
                    times[method].append(_ask(workers[method], 'run')['seconds'])
            for method in live:
                results[method].update(_ask(workers[method], 'done'))
                results[method]['best_s'] = min(times[method])
                results[method]['median_s'] = float(np.median(times[method]))
        finally:
            for worker in workers.values():
                try:
                    worker.stdin.close()
                except BrokenPipeError:  # it has left already
                    pass
                worker.wait(timeout=60)
        reference = np.load(data / 'numpy_idx.npy')
        for method, result in results.items():
            if 'error' not in result:
                got = np.load(data / f'{method}_idx.npy')
                result['same_lists'] = float((got == reference).all(axis=1).mean())
    report(results)


def _ask(worker: subprocess.Popen, command: str) -> dict:
    worker.stdin.write(command + '\n')
    worker.stdin.flush()
    line = worker.stdout.readline()
    if not line:
        raise SystemExit(f'a benchmark worker died (exit code {worker.wait()}); its error is above')
    return json.loads(line)


def report(results: dict[str, dict]) -> None:
    faiss_time = results['faiss'].get('best_s')
    print(f'{"method":<10} {"best s":>8} {"median s":>9} {"x faiss":>8} {"peak MB":>8} {"same top-k as numpy":>20}')
    for method, r in results.items():
        if 'error' in r:
            print(f'{method:<10} skipped: {r["error"]}')
            continue
        ratio = f'{r["best_s"] / faiss_time:.2f}' if faiss_time else 'n/a'
        print(
            f'{method:<10} {r["best_s"]:>8.3f} {r["median_s"]:>9.3f} {ratio:>8} {r["peak_mb"]:>8.0f} '
            f'{r["same_lists"]:>20.1%}'
        )
    if 'add_s' in results['faiss']:
        print(
            f'(faiss add, not counted above: {results["faiss"]["add_s"]:.3f} s; its copy of the index is '
            'counted in its peak)'
        )
    executor_time = results['executor']['best_s']
    print(
        f'executor knn vs numpy: {executor_time / results["numpy"]["best_s"]:.2f}x the time, '
        f'{results["executor"]["peak_mb"]:.0f} MB vs {results["numpy"]["peak_mb"]:.0f} MB peak'
    )


def run_worker(args: argparse.Namespace) -> None:
    """Answer the parent's commands on stdin, one JSON line each: ready, then run (repeatedly), then done."""
    import numpy as np

    cores = os.cpu_count() or 1
    index = np.load(args.data / 'index.npy')
    queries = np.load(args.data / 'queries.npy')
    try:
        search, prepare = _method(args, cores)
    except ImportError:
        sys.stdin.readline()  # answer 'ready' with the reason, then leave
        _reply({'error': FAISS_HINT})
        return
    search(prepare(index[:2000]), queries[:8])  # warm-up: thread pools, BLAS, lazy imports

    baseline = _reset_peak()
    started = time.perf_counter()
    state = prepare(index)
    add_s = time.perf_counter() - started
    idx = None
    for command in sys.stdin:
        command = command.strip()
        if command == 'ready':
            _reply({'add_s': add_s} if args.worker == 'faiss' else {})
        elif command == 'run':
            started = time.perf_counter()
            idx = search(state, queries)
            _reply({'seconds': time.perf_counter() - started})
        elif command == 'done':
            np.save(args.data / f'{args.worker}_idx.npy', idx)
            _reply({'peak_mb': _peak_since(baseline)})


def _reply(message: dict) -> None:
    print(json.dumps(message), flush=True)


def _method(args: argparse.Namespace, cores: int):
    """(search(state, queries) -> (Q, k) int64 indices, prepare(index) -> state) for the worker's method."""
    import numpy as np

    k = args.k
    if args.worker == 'executor':
        import torch

        from executor.tuning.evaluation import knn

        torch.set_num_threads(cores)

        def search(index, queries):
            _, idx = knn(
                queries, index, k, 'cosine', query_chunk=args.query_chunk, index_chunk=args.index_chunk, device='cpu'
            )
            return idx.numpy()

        return search, lambda index: index
    if args.worker == 'numpy':

        def search(index, queries):
            scores = queries @ index.T  # (Q, N)
            part = np.argpartition(-scores, k, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind='stable')
            return np.take_along_axis(part, order, axis=1)

        return search, lambda index: index
    import faiss

    faiss.omp_set_num_threads(cores)

    def prepare(index):
        flat = faiss.IndexFlatIP(index.shape[1])
        flat.add(index)
        return flat

    return (lambda flat, queries: flat.search(queries, k)[1]), prepare


def _proc_status(field: str) -> int | None:
    try:
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> tuple[str, int]:
    """Start a peak-memory measurement: ('hwm', current RSS) if the kernel's peak could be reset, else maxrss."""
    try:
        Path('/proc/self/clear_refs').write_text('5')
        rss = _proc_status('VmRSS')
        if rss is not None:
            return 'hwm', rss
    except OSError:
        pass
    return 'maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_since(baseline: tuple[str, int]) -> float:
    kind, start = baseline
    peak = _proc_status('VmHWM') if kind == 'hwm' else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(0, peak - start) / 2**20


# name -> VectorIndexer settings (besides the folder or server each run gets)
BACKENDS = {
    'hnsw': {'backend': 'hnsw'},
    'qdrant': {'backend': 'qdrant'},
    'qdrant-int8': {'backend': 'qdrant', 'quantization': 'int8'},
    'milvus': {'backend': 'milvus', 'index_type': 'HNSW'},
    'milvus-ivf-sq8': {'backend': 'milvus', 'index_type': 'IVF_SQ8', 'index_params': {'nlist': 256}},
}


def bench_backends(args: argparse.Namespace) -> None:
    import numpy as np

    names = args.backends.split(',')
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown:
        raise SystemExit(f'unknown backends {unknown}; known: {", ".join(BACKENDS)}')
    rng = np.random.default_rng(0)
    index = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    index /= np.linalg.norm(index, axis=1, keepdims=True)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    scores = queries @ index.T  # (Q, N) exact cosine
    truth = np.argsort(-scores, axis=1)[:, : args.k]
    del scores
    print(
        f'VectorIndexer backends: {args.n} x {args.dim} seeded random unit vectors, {args.queries} queries, '
        f'recall@{args.k} vs exact search; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}'
    )
    print(f'{"backend":<15} {"index s":>8} {"recall":>7} {"qps b1":>7} {"qps b64":>8} {"memory MB":>10} {"disk MB":>8}')
    for name in names:
        if name == 'qdrant-int8' and not args.qdrant_url:
            print(f"{name:<15} skipped: Qdrant's embedded local mode does not quantize; give --qdrant-url of a server")
            continue
        with tempfile.TemporaryDirectory(prefix=f'bench-{name}-') as tmp:
            row = _bench_backend(name, args, Path(tmp), index, queries, truth)
        print(
            f'{name:<15} {row["index_s"]:>8.1f} {row["recall"]:>7.3f} {row["qps1"]:>7.0f} {row["qps64"]:>8.0f} '
            f'{row["memory_mb"]:>10.0f} {row["disk_mb"]:>8.0f}',
            flush=True,
        )


def _bench_backend(name, args, folder: Path, index, queries, truth) -> dict:
    import numpy as np

    from executor.indexing import create_backend
    from executor.indexing.base import Stored
    from executor.indexing.settings import load_settings

    settings = dict(BACKENDS[name])
    server = None
    if name.startswith('milvus'):
        server, port = _milvus_lite(folder / 'milvus')
        settings.update(host='127.0.0.1', port=port)
    elif name.startswith('qdrant'):
        settings.update({'url': args.qdrant_url, 'collection_name': f'bench_{os.getpid()}'} if 'int8' in name else {})
        settings.setdefault('url', None)
        if not settings['url']:
            settings.update(path=str(folder / 'qdrant'))
    else:
        settings.update(index_dir=str(folder / 'hnsw'))
    try:
        rss_before = _rss(os.getpid())
        server_before = _rss(server.pid) if server else 0
        backend = create_backend(load_settings(settings), str(folder))
        backend.open(args.dim)
        started = time.perf_counter()
        for start in range(0, len(index), 1000):
            backend.upsert(
                [Stored(f'd{i}', None, None, None, index[i]) for i in range(start, min(start + 1000, len(index)))]
            )
        index_s = time.perf_counter() - started
        found = []
        started = time.perf_counter()
        for query in queries:
            found += backend.search(query[None], args.k, None)
        qps1 = len(queries) / (time.perf_counter() - started)
        started = time.perf_counter()
        for start in range(0, len(queries), 64):
            backend.search(queries[start : start + 64], args.k, None)
        qps64 = len(queries) / (time.perf_counter() - started)
        ids = [[int(m.id[1:]) for m in matches] for matches in found]
        recall = float(np.mean([len(set(got) & set(want)) / len(want) for got, want in zip(ids, truth.tolist())]))
        memory = (_rss(server.pid) - server_before) if server else (_rss(os.getpid()) - rss_before)
        backend.close()
        disk = sum(f.stat().st_size for f in folder.rglob('*') if f.is_file())
        return {
            'index_s': index_s,
            'recall': recall,
            'qps1': qps1,
            'qps64': qps64,
            'memory_mb': memory / 2**20,
            'disk_mb': disk / 2**20,
        }
    finally:
        if server:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)


def _milvus_lite(data_dir: Path):
    import signal
    import socket

    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    command = [str(Path(sys.executable).with_name('milvus-lite')), 'server', '--data-dir', str(data_dir)]
    server = subprocess.Popen(
        [*command, '--host', '127.0.0.1', '--port', str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(('127.0.0.1', port), timeout=0.5).close()
            return server, port
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                os.killpg(server.pid, signal.SIGKILL)
                raise SystemExit('the Milvus Lite server did not start') from None
            time.sleep(0.2)


def _rss(pid: int) -> int:
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024
    return 0


if __name__ == '__main__':
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
