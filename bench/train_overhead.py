"""Trainer overhead: one training step of the trainer vs a bare PyTorch loop, same model, batch, loss and data.

The batches are decoded once and held in memory, so only the step itself is compared: the trainer's
``train_epoch`` (callbacks, loss checks, scheduler, AMP scaler) against ``loss.backward(); opt.step()``.
Rounds alternate between the two so machine noise hits both alike. Also prints channels_last vs the default layout.

A text model (``--model all-MiniLM-L6-v2``) trains on SICK training pairs (real sentence lengths, padded per batch):
scored pairs with CoSENTLoss, or ``--loss MultipleNegativesRankingLoss`` on the same pairs as anchor,positive; the
bare loop embeds each batch's 2B sentences in one pass, as the trainer does, at the trainer's learning rate 2e-5.

    .venv/bin/python bench/train_overhead.py [--model efficientnet_lite0] [--size 224] [--batch 32] [--rounds 5]
    .venv/bin/python bench/train_overhead.py --model all-MiniLM-L6-v2 [--loss CoSENTLoss] [--batch 32]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='efficientnet_lite0')
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--steps', type=int, default=4, help='batches per timed epoch')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument(
        '--loss',
        default='CoSENTLoss',
        choices=['CoSENTLoss', 'CosineSimilarityLoss', 'MultipleNegativesRankingLoss'],
        help='text models only',
    )
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
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
