"""SICK for the text benchmarks, and the sweep that chose table (d)'s recipe on trial.tsv (never on test.tsv).

SICK (``../shared/data/sick``, see its README.md): 4500 train, 500 trial and 4927 test sentence pairs, each with a
relatedness score from 1 to 5. The helpers here write its splits as ``sentence1,sentence2,score`` CSVs, give its
sentences (real lengths) to bench/encode.py and bench/train_overhead.py, and train the plain-loop reference of table
(d) in bench/paper_tables.py: a bare PyTorch loop over the same model, loss, optimizer, learning rate, schedule,
batch size, epochs, seed and data order as the service's trainer.

The sweep (run alone): each argument is a JSON object of ``fit`` options over ``TEXT_BASE``; it trains on train.tsv
(all of it, or ``--train-pairs N``) and prints Spearman (spearman_cosine) on trial.tsv before and after each epoch.

    .venv/bin/python bench/text_sick.py [--train-pairs N] '{}' '{"learning_rate": 5e-5}' \\
        '{"loss": "CosineSimilarityLoss"}'

Table (d)'s recipe came from these two runs (all 4500 train pairs; figures in bench/paper_tables.py by TEXT_RECIPE;
about 200 s an epoch on 2 idle cores, up to 4x that beside a test run):

    .venv/bin/python bench/text_sick.py '{}' \\
        '{"learning_rate": 5e-5, "scheduler": "linear", "scheduler_options": {"num_warmup_steps": 0.1}}' \\
        '{"loss": "CosineSimilarityLoss"}'
    .venv/bin/python bench/text_sick.py '{"loss": "CosineSimilarityLoss", "epochs": 2}' \\
        '{"loss": "CosineSimilarityLoss", "learning_rate": 5e-5, "scheduler": "linear",
          "scheduler_options": {"num_warmup_steps": 0.1}}'
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault('FINETUNER_PROGRESS', '0')

import torch

SICK = Path(__file__).resolve().parents[2] / 'shared/data/sick'
SPLITS = ('train', 'trial', 'test')
TEXT_MODEL = 'all-MiniLM-L6-v2'
# What every text run shares (the service's defaults for scored pairs, written out): CoSENT, Adam, lr 2e-5,
# batch 32, constant rate; the sweep and table (d) override some of them.
TEXT_BASE: dict[str, Any] = dict(
    model=TEXT_MODEL,
    loss='CoSENTLoss',
    optimizer='Adam',
    learning_rate=2e-5,
    batch_size=32,
    epochs=1,
    seed=0,
    tensorboard=False,
    save_best=False,  # every run keeps its last epoch: trial is measured each epoch, never used to pick one
    device='cpu',
)

Pair = tuple[str, str, float]


def sick_pairs(split: str, root: Path = SICK) -> list[Pair]:
    """``(sentence_A, sentence_B, relatedness_score)`` of one split, in file order."""
    path = root / f'{split}.tsv'
    if not path.is_file():
        raise SystemExit(f'{path} is missing: SICK lives in ../shared/data/sick (see its README.md)')
    with path.open(encoding='utf-8', newline='') as f:
        rows = list(csv.DictReader(f, delimiter='\t', quoting=csv.QUOTE_NONE))
    return [(r['sentence_A'], r['sentence_B'], float(r['relatedness_score'])) for r in rows]


def subset(pairs: list[Pair], n: int | None, seed: int = 0) -> list[Pair]:
    """``n`` pairs drawn at random (seeded, kept in file order), or all of them."""
    if n is None or n >= len(pairs):
        return pairs
    keep = sorted(random.Random(seed).sample(range(len(pairs)), n))
    return [pairs[i] for i in keep]


def write_csv(rows: list[tuple], path: Path, header: tuple[str, ...] = ('sentence1', 'sentence2', 'score')) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('w', encoding='utf-8', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def sick_csvs(folder: Path, train_pairs: int | None = None, root: Path = SICK) -> dict[str, Path]:
    """train.csv (all 4500 pairs or a seeded subset of ``train_pairs``), trial.csv and test.csv in ``folder``."""
    return {
        split: write_csv(
            subset(sick_pairs(split, root), train_pairs if split == 'train' else None), folder / f'{split}.csv'
        )
        for split in SPLITS
    }


def sick_sentences(split: str = 'test', root: Path = SICK) -> list[str]:
    """Every sentence of a split (both columns, file order): real lengths for the encoding benchmarks."""
    return [s for a, b, _ in sick_pairs(split, root) for s in (a, b)]


def spearman(model: torch.nn.Module, csv_path: Path, batch_size: int = 64) -> float:
    """spearman_cosine of ``model`` on the scored pairs of ``csv_path``, by the service's evaluator; the model is
    embedded through ``TorchEncoder`` (longest sentences first, as the service encodes) and left as it was."""
    from executor.tuning.data import load_items
    from executor.tuning.evaluation import evaluator_for
    from executor.tuning.inference import TorchEncoder

    embedder = TorchEncoder(model, device='cpu', copy_model=True).embedder(batch_size)
    return float(evaluator_for(load_items(str(csv_path)), None, 20)(embedder).metrics['spearman_cosine'])


def reference_fit(
    train_csv: Path,
    *,
    loss: str,
    optimizer: str,
    learning_rate: float,
    batch_size: int,
    epochs: int,
    seed: int,
    scheduler: str | None = None,
    scheduler_options: dict[str, float] | None = None,
    **_: Any,
) -> tuple[torch.nn.Module, list[float]]:
    """The plain-loop reference: ``loss.backward(); optimizer.step()`` over the same model, loss, optimizer,
    learning rate, batch size, epochs, seed and batches (the trainer's seeded random sampler, last partial batch
    dropped) as ``fit``. The schedule, when there is one, is transformers' ``get_scheduler`` (an implementation
    independent of the service's). Returns the model and each epoch's training seconds."""
    from transformers import get_scheduler

    from executor.tuning.data import BatchSampler, load_items
    from executor.tuning.models import build_model
    from executor.tuning.pair_losses import CoSENTLoss, CosineSimilarityLoss

    items = load_items(str(train_csv))
    firsts, seconds = [it.columns[0] for it in items], [it.columns[1] for it in items]
    scores = torch.tensor([it.score for it in items], dtype=torch.float32)
    if loss == 'CosineSimilarityLoss':  # sentence-transformers' targets lie in [0, 1]: scaled from the score range
        scores = (scores - scores.min()) / (scores.max() - scores.min())
    elif loss != 'CoSENTLoss':
        raise ValueError(f'the reference loop runs CoSENTLoss or CosineSimilarityLoss, not {loss}')
    loss_fn = {'CoSENTLoss': CoSENTLoss, 'CosineSimilarityLoss': CosineSimilarityLoss}[loss]()

    torch.manual_seed(seed)  # the trainer seeds before it builds the model: dropout draws start from the same state
    model = build_model(TEXT_MODEL)
    opt = {'Adam': torch.optim.Adam, 'AdamW': torch.optim.AdamW}[optimizer](model.parameters(), lr=learning_rate)
    sampler = BatchSampler([-1] * len(items), batch_size, 'random', seed=seed)
    total = len(sampler) * epochs
    warmup = (scheduler_options or {}).get('num_warmup_steps', 0)
    warmup = int(round(warmup * total)) if 0 < warmup < 1 else int(warmup)
    schedule = get_scheduler(scheduler, opt, warmup, total) if scheduler else None

    times = []
    for epoch in range(epochs):
        started = time.perf_counter()
        model.train()
        sampler.set_epoch(epoch)
        for rows in sampler:
            batch = model.inputs.batch([firsts[i] for i in rows] + [seconds[i] for i in rows])  # 2B rows, column-major
            a, b = model(batch).chunk(2)
            value = loss_fn([a, b], scores[rows])
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            if schedule is not None:
                schedule.step()
        times.append(time.perf_counter() - started)
    return model.eval(), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('specs', nargs='*', default=['{}'], help='JSON objects of fit options over TEXT_BASE')
    parser.add_argument('--train-pairs', type=int, default=None, help='a seeded subset of the 4500 training pairs')
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from executor.tuning import fit

    with tempfile.TemporaryDirectory(prefix='tune-sick-') as tmp:  # each run leaves ~350 MB of checkpoints
        csvs = sick_csvs(Path(tmp) / 'sick', args.train_pairs)
        print(
            f'SICK: trained on {args.train_pairs or 4500} train pairs, Spearman (spearman_cosine) on the 500 trial '
            'pairs'
        )
        for run, spec in enumerate(args.specs):
            options = {**TEXT_BASE, **json.loads(spec)}
            started = time.perf_counter()
            result = fit(
                train_data=str(csvs['train']),
                eval_data=str(csvs['trial']),
                output_dir=Path(tmp) / f'run{run}',
                **options,
            )
            wall = time.perf_counter() - started
            shutil.rmtree(result.output_dir)
            print(f'\n{spec}  ({wall:.0f} s)')
            print(f'  pre-trained   trial spearman {result.metrics_before["spearman_cosine"]:.4f}')
            for logs in result.history:
                print(
                    f'  epoch {int(logs["epoch"]):>2}      trial spearman {logs["spearman_cosine"]:.4f}  '
                    f'loss {logs["train_loss"]:.4f}  {logs["epoch_seconds"]:.0f} s',
                    flush=True,
                )


if __name__ == '__main__':
    main()
