"""Trainer overhead: one training step of the trainer vs a bare PyTorch loop, same model, batch, loss and data.

The batches are decoded once and held in memory, so only the step itself is compared: the trainer's
``train_epoch`` (callbacks, loss checks, scheduler, AMP scaler) against ``loss.backward(); opt.step()``.
Rounds alternate between the two so machine noise hits both alike. Also prints channels_last vs the default layout.

A text model (``--model all-MiniLM-L6-v2``) trains on SICK training pairs (real sentence lengths, padded per batch):
scored pairs with CoSENTLoss, or ``--loss MultipleNegativesRankingLoss`` on the same pairs as anchor,positive; the
bare loop embeds each batch's 2B sentences in one pass, as the trainer does, at the trainer's learning rate 2e-5.

``--cached``: CachedMultipleNegativesRankingLoss (GradCache) at batch 256 with mini_batch_size 32 against the
uncached MultipleNegativesRankingLoss at batch 32 (and at 256, whose memory the cached loss is meant to save), the
trainer's step on SICK training pairs as anchor,positive. Each configuration runs in a fresh process; its memory is
the peak growth during the timed steps over the process's footprint just before them: resident set size sampled every
2 ms on CPU (the activations a step holds), ``torch.cuda.max_memory_allocated`` on a GPU. The step times are then
measured again in one process, the configurations taking turns (``--rounds``), as the time ratios to trust on a busy
machine.

    .venv/bin/python bench/train_overhead.py [--model efficientnet_lite0] [--size 224] [--batch 32] [--rounds 5]
    .venv/bin/python bench/train_overhead.py --model all-MiniLM-L6-v2 [--loss CoSENTLoss] [--batch 32]
    .venv/bin/python bench/train_overhead.py --cached [--steps 3] [--rounds 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault('FINETUNER_PROGRESS', '0')

from bench.text_sick import sick_pairs, write_csv
from executor.tuning import TrainConfig, Trainer
from executor.tuning.data.digits import digits_items
from executor.tuning.models.registry import inputs_kind


def bare_epoch(model, batches, loss_fn, optimizer, channels_last: bool) -> None:
    model.train()
    for batch, labels in batches:  # a batch is a dict of tensors ({'images': (B, 3, H, W)})
        if channels_last:
            batch = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in batch.items()}
        loss = loss_fn(model(batch), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()


def bare_text_epoch(model, batches, loss_fn, optimizer, scored: bool) -> None:
    model.train()
    for batch, scores in batches:
        loss = loss_fn(list(model(batch).chunk(2)), scores if scored else None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()


def timed_rounds(runs: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each run over ``rounds`` rounds, the runs taking turns within each round (in reverse order
    every other round, so neither always runs first)."""
    for fn in runs.values():  # warm-up: oneDNN picks its kernels on the first pass
        fn()
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name, fn in list(runs.items())[:: 1 if r % 2 == 0 else -1]:
            started = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - started)
    return {k: statistics.median(v) for k, v in timings.items()}


def text_overhead(args: argparse.Namespace) -> None:
    """The text row: the trainer's step vs a bare loop on SICK sentence pairs."""
    scored = args.loss != 'MultipleNegativesRankingLoss'
    pairs = sick_pairs('train')[: args.batch * args.steps]
    with tempfile.TemporaryDirectory() as tmp:
        if scored:
            data = write_csv(pairs, Path(tmp) / 'pairs.csv')
        else:
            data = write_csv([(a, b) for a, b, _ in pairs], Path(tmp) / 'pairs.csv', ('anchor', 'positive'))
        config = TrainConfig(
            model=args.model,
            train_data=str(data),
            loss=args.loss,
            batch_size=args.batch,
            epochs=1,
            tensorboard=False,
            output_dir=Path(tmp) / 'run',
            learning_rate=2e-5,
            device='cpu',
        )
        trainer = Trainer(config)
        trainer.sampler.set_epoch(0)
        batches = [(x, y) for _, (x, y) in zip(range(args.steps), trainer.loader)]
        trainer.loader = batches  # data already in memory for both sides
        low, high = trainer.task.score_range  # the bare loop gets the targets the trainer computes its loss on
        scaled = [(x, (y - low) / (high - low)) for x, y in batches]
        bare_model = copy.deepcopy(trainer.model)
        bare_opt = torch.optim.Adam([p for p in bare_model.parameters() if p.requires_grad], lr=2e-5)
        loss_fn = trainer.loss.module
        med = timed_rounds(
            {
                'trainer': lambda: trainer.train_epoch(),
                'bare': lambda: bare_text_epoch(bare_model, scaled, loss_fn, bare_opt, scored),
            },
            args.rounds,
        )
    tokens = statistics.mean(int(b['attention_mask'].shape[1]) for b, _ in batches)
    print(
        f'{args.model} {args.loss}, batch {args.batch} SICK pairs ({2 * args.batch} sentences padded to '
        f'{tokens:.1f} tokens on average), {args.steps} steps x {args.rounds} rounds, {torch.get_num_threads()} threads'
    )
    print(f'{"loop":<18}{"median s":>10}{"pairs/s":>10}')
    for name, value in med.items():
        print(f'{name:<18}{value:>10.3f}{args.batch * args.steps / value:>10.1f}')
    print(f'trainer / bare step time: {med["trainer"] / med["bare"]:.3f} (target <= 1.05)')


# (name, loss, batch, mini_batch_size): what --cached compares, each in a fresh process
CACHED_RUNS = (
    ('uncached MNRL', 'MultipleNegativesRankingLoss', 32, None),
    ('cached MNRL', 'CachedMultipleNegativesRankingLoss', 256, 32),
    ('uncached MNRL', 'MultipleNegativesRankingLoss', 256, None),
)


def _rss() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


class PeakRSS:
    """The highest resident set size seen while the block runs, sampled every 2 ms by a thread."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, _rss())


def cached_worker(spec: dict) -> dict:
    """One configuration of --cached: the trainer's step time (median over the steps after a warm-up one) and the
    peak memory growth during the steps."""
    pairs = sick_pairs('train')
    batch, steps = spec['batch'], spec['steps']
    with tempfile.TemporaryDirectory() as tmp:
        data = write_csv([(a, b) for a, b, _ in pairs], Path(tmp) / 'pairs.csv', ('anchor', 'positive'))
        options = {'mini_batch_size': spec['mini']} if spec['mini'] else {}
        config = TrainConfig(
            model=spec['model'],
            train_data=str(data),
            loss=spec['loss'],
            loss_options=options,
            batch_size=batch,
            epochs=1,
            tensorboard=False,
            output_dir=Path(tmp) / 'run',
            learning_rate=2e-5,
            device=spec['device'],
        )
        trainer = Trainer(config)
        trainer.sampler.set_epoch(0)
        batches = [(x, y) for _, (x, y) in zip(range(steps + 1), trainer.loader)]
        cuda = trainer.device.type == 'cuda'
        trainer.loader = batches[:1]
        trainer.train_epoch()  # warm-up (kernels, optimizer state); its memory is part of the baseline
        times = []
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as rss:
            for one in batches[1:]:
                trainer.loader = [one]
                started = time.perf_counter()
                trainer.train_epoch()
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
        peak = (torch.cuda.max_memory_allocated() - base) if cuda else (rss.peak - rss.start)
    tokens = statistics.mean(int(b['attention_mask'].shape[1]) for b, _ in batches)
    return {
        'model': spec['model'],
        'step_s': statistics.median(times),
        'peak_mib': peak / 2**20,
        'tokens': tokens,
        'memory': 'CUDA allocated' if cuda else 'RSS',
        'device': str(trainer.device),
    }


def interleaved_worker(spec: dict) -> dict:
    """The step times of every --cached configuration in one process, taking turns (``timed_rounds``), so that a
    busy machine slows them alike: the time ratios, apart from the fresh processes' memory."""
    pairs = sick_pairs('train')
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_csv([(a, b) for a, b, _ in pairs], Path(tmp) / 'pairs.csv', ('anchor', 'positive'))
        for i, (name, loss, batch, mini) in enumerate(CACHED_RUNS):
            config = TrainConfig(
                model=spec['model'],
                train_data=str(data),
                loss=loss,
                loss_options={'mini_batch_size': mini} if mini else {},
                batch_size=batch,
                epochs=1,
                tensorboard=False,
                output_dir=Path(tmp) / f'run{i}',
                learning_rate=2e-5,
                device=spec['device'],
            )
            trainer = Trainer(config)
            trainer.sampler.set_epoch(0)
            trainer.loader = [next(iter(trainer.loader))]  # one step, the same batch each round
            runs[f'{name} {batch}'] = trainer.train_epoch
        return timed_rounds(runs, spec['rounds'])


def cached_overhead(args: argparse.Namespace) -> None:
    """--cached: each configuration in a fresh process, then the ratios."""
    rows = []
    for name, loss, batch, mini in CACHED_RUNS:
        spec = dict(
            model=args.model if inputs_kind(args.model) == 'text' else 'all-MiniLM-L6-v2',
            loss=loss,
            batch=batch,
            mini=mini,
            steps=args.steps,
            device=args.device,
        )
        # glibc returns freed blocks above a fixed mmap threshold to the system at once, so that a step's resident
        # growth is the memory it holds, not what an earlier step left in malloc's free lists
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='0')
        done = subprocess.run(
            [sys.executable, __file__, '--cached-worker', json.dumps(spec)], capture_output=True, text=True, env=env
        )
        if done.returncode != 0:
            print(f'{name} at batch {batch} failed:\n{done.stderr[-2000:]}')
            continue
        rows.append((name, batch, mini, json.loads(done.stdout.strip().splitlines()[-1])))
    print(
        f'{rows[0][3]["device"] if rows else args.device}, {torch.get_num_threads()} threads, SICK train pairs as '
        f'anchor,positive, median of {args.steps} steps after a warm-up one, each configuration in a fresh process'
    )
    print(f'{"configuration":<34}{"step s":>9}{"pairs/s":>10}{"tokens":>8}{"peak MiB":>10}  memory')
    for name, batch, mini, r in rows:
        label = f'{name} batch {batch}' + (f' (mini {mini})' if mini else '')
        pairs_s = batch / r['step_s']
        print(f'{label:<34}{r["step_s"]:>9.3f}{pairs_s:>10.1f}{r["tokens"]:>8.1f}{r["peak_mib"]:>10.1f}  {r["memory"]}')
    if args.rounds:
        spec = dict(model=rows[0][3]['model'] if rows else 'all-MiniLM-L6-v2', device=args.device, rounds=args.rounds)
        done = subprocess.run(
            [sys.executable, __file__, '--interleaved-worker', json.dumps(spec)], capture_output=True, text=True
        )
        if done.returncode == 0:
            med = json.loads(done.stdout.strip().splitlines()[-1])
            print(f'one process, the configurations taking turns, median of {args.rounds} rounds (s per step):')
            print('  ' + ', '.join(f'{name}: {value:.3f}' for name, value in med.items()))
            small, cached, big = (med[f'{name} {batch}'] for name, _, batch, _ in CACHED_RUNS)
            print(
                f'  cached 256 / uncached 32: {cached / small:.2f}x the step time for 8x the pairs; cached 256 / '
                f'uncached 256: {cached / big:.2f}x'
            )
        else:
            print(f'the interleaved timing failed:\n{done.stderr[-2000:]}')
    by = {(name, batch): r for name, batch, _, r in rows}
    small, cached = by.get(('uncached MNRL', 32)), by.get(('cached MNRL', 256))
    big = by.get(('uncached MNRL', 256))
    if small and cached:
        print(
            f'cached 256 / uncached 32: step time {cached["step_s"] / small["step_s"]:.2f}x (8x the pairs), per pair '
            f'{cached["step_s"] / 8 / small["step_s"]:.2f}x, peak memory {cached["peak_mib"] / small["peak_mib"]:.2f}x'
        )
    if small and big:
        print(f'uncached 256 / uncached 32: peak memory {big["peak_mib"] / small["peak_mib"]:.2f}x')
    if cached and big:
        print(
            f'cached 256 / uncached 256: step time {cached["step_s"] / big["step_s"]:.2f}x, peak memory '
            f'{cached["peak_mib"] / big["peak_mib"]:.2f}x'
        )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] in ('--cached-worker', '--interleaved-worker'):
        torch.set_num_threads(os.cpu_count() or 1)
        worker = cached_worker if sys.argv[1] == '--cached-worker' else interleaved_worker
        print(json.dumps(worker(json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='efficientnet_lite0')
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--steps', type=int, default=4, help='batches per timed epoch')
    parser.add_argument('--rounds', type=int, default=None, help='timed rounds (default 5; --cached: 2)')
    parser.add_argument(
        '--loss',
        default='CoSENTLoss',
        choices=['CoSENTLoss', 'CosineSimilarityLoss', 'MultipleNegativesRankingLoss'],
        help='text models only',
    )
    parser.add_argument(
        '--cached',
        action='store_true',
        help='CachedMultipleNegativesRankingLoss at batch 256 (mini-batch 32) vs uncached at 32 and 256: time, memory',
    )
    parser.add_argument('--device', default='cpu', help='--cached: cpu or cuda')
    args = parser.parse_args()
    args.rounds = args.rounds if args.rounds is not None else 2 if args.cached else 5
    torch.set_num_threads(os.cpu_count() or 1)
    if args.cached:
        cached_overhead(args)
        return
    if inputs_kind(args.model) == 'text':
        text_overhead(args)
        return

    items = digits_items(per_class=(args.batch * args.steps) // 10 + 1, size=32)
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            model=args.model,
            train_data=items,
            image_size=args.size,
            batch_size=args.batch,
            epochs=1,
            freeze=3,
            tensorboard=False,
            output_dir=Path(tmp),
            learning_rate=1e-4,
        )
        trainer = Trainer(config)
        trainer.sampler.set_epoch(0)
        batches = [(x, y) for _, (x, y) in zip(range(args.steps), trainer.loader)]
        trainer.loader = batches  # data already in memory for both sides

        bare_model = copy.deepcopy(trainer.model)
        bare_params = [p for p in bare_model.parameters() if p.requires_grad]
        bare_opt = torch.optim.Adam(bare_params, lr=1e-4)
        loss_fn = trainer.loss.module
        plain = copy.deepcopy(bare_model).to(memory_format=torch.contiguous_format)
        plain_opt = torch.optim.Adam([p for p in plain.parameters() if p.requires_grad], lr=1e-4)

        timings: dict[str, list[float]] = {'trainer': [], 'bare': [], 'bare_contiguous': []}
        runs = {
            'trainer': lambda: trainer.train_epoch(),
            'bare': lambda: bare_epoch(bare_model, batches, loss_fn, bare_opt, channels_last=True),
            'bare_contiguous': lambda: bare_epoch(plain, batches, loss_fn, plain_opt, channels_last=False),
        }
        for fn in runs.values():  # warm-up: oneDNN picks its kernels on the first pass
            fn()
        for _ in range(args.rounds):
            for name, fn in runs.items():
                started = time.perf_counter()
                fn()
                timings[name].append(time.perf_counter() - started)

    imgs = args.batch * args.steps
    med = {k: statistics.median(v) for k, v in timings.items()}
    print(
        f'{args.model} {args.size}px batch {args.batch}, {args.steps} steps x {args.rounds} rounds, '
        f'{torch.get_num_threads()} threads (stem + 2 stages frozen)'
    )
    print(f'{"loop":<18}{"median s":>10}{"img/s":>10}')
    for name, value in med.items():
        print(f'{name:<18}{value:>10.3f}{imgs / value:>10.1f}')
    print(f'trainer / bare step time: {med["trainer"] / med["bare"]:.3f} (target <= 1.05)')
    print(f'channels_last speed-up over the default layout (bare loops): {med["bare_contiguous"] / med["bare"]:.2f}x')


if __name__ == '__main__':
    main()
