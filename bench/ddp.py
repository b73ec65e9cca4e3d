"""DDP throughput on CPU: 1 vs 2 gloo processes (torchrun-style) on the same global batch, samples/s and ratio.

On a 2-core machine two processes share the cores one process already uses, so expect a ratio near 1 or below:
the point is that the distributed path runs and what it costs, not a speed-up (that needs more cores or GPUs).

    .venv/bin/python bench/ddp.py [--size 64] [--batch 32] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault('FINETUNER_PROGRESS', '0')

from executor.tuning import TrainConfig, Trainer
from executor.tuning.data.digits import digits_items


def config(args, output_dir: str) -> TrainConfig:
    return TrainConfig(
        model='efficientnet_lite0',
        train_data=digits_items(per_class=args.per_class, size=32),
        image_size=args.size,
        batch_size=args.batch,
        epochs=args.epochs,
        freeze=3,
        tensorboard=False,
        output_dir=output_dir,
    )


def timed_fit(args, output_dir: str) -> tuple[float, int]:
    trainer = Trainer(config(args, output_dir))
    started = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - started, len(trainer.sampler) * trainer.batch_size * args.epochs


def worker(rank: int, world: int, port: int, args, output_dir: str, results: dict) -> None:
    os.environ.update(
        WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port)
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    results[rank] = timed_fit(args, output_dir)
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, default=64)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--per-class', type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(os.cpu_count() or 1)
        single_s, samples = timed_fit(args, f'{tmp}/single')
        with socket.socket() as sock:
            sock.bind(('127.0.0.1', 0))
            port = sock.getsockname()[1]
        with mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(worker, args=(2, port, args, f'{tmp}/ddp', results), nprocs=2, join=True)
            ddp_s = max(r[0] for r in dict(results).values())
    print(f'efficientnet_lite0 {args.size}px, global batch {args.batch}, {samples} samples, {os.cpu_count()} cores')
    print(f'{"processes":<12}{"seconds":>10}{"samples/s":>12}')
    print(f'{"1":<12}{single_s:>10.2f}{samples / single_s:>12.1f}')
    print(f'{"2 (gloo)":<12}{ddp_s:>10.2f}{samples / ddp_s:>12.1f}')
    print(f'2 processes / 1 process throughput: {single_s / ddp_s:.2f}x')


if __name__ == '__main__':
    main()
