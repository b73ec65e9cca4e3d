"""Tune table (a)'s recipe on a validation part of tll-dev's *training* pairs, never on its 400 evaluation pairs.

The 1200 training pairs are split 900 / 300: train on the first 900, search the last 300 (left -> right). Each
configuration is a JSON object of ``fit`` options over table (a)'s recipe; its per-epoch hit@1/5/10 are printed so one
long run shows where the curve flattens.

    .venv/bin/python bench/tune_tll.py '{"epochs": 16}' '{"freeze": 2, "batch_size": 128}'
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault('FINETUNER_PROGRESS', '0')

from bench.paper_tables import COMMON, HARD_MINER, HITS, TRIPLET, tll_items
from executor.tuning import fit
from executor.tuning.data import Item

RECIPE = dict(COMMON, **TRIPLET, **HARD_MINER, image_size=224, epochs=8, augmentation='strong')  # table (a)'s


def dev_split(root: Path) -> tuple[list[Item], list[Item], list[Item]]:
    train, _, _ = tll_items(root)  # the 1200 training pairs only, both sides of each
    ids = sorted({item.label for item in train})
    fit_ids, val_ids = set(ids[:900]), ids[900:]
    side = {item.id: item for item in train}
    queries = [side[f'left/{i}'] for i in val_ids]
    index = [side[f'right/{i}'] for i in val_ids]
    return [item for item in train if item.label in fit_ids], queries, index


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    root = Path(__file__).resolve().parents[2] / 'shared/data/tll-dev'
    train, queries, index = dev_split(root)
    for spec in sys.argv[1:] or ['{}']:
        options = {**RECIPE, **json.loads(spec)}
        started = time.perf_counter()
        result = fit(
            train_data=train,
            query_data=queries,
            index_data=index,
            output_dir=Path(tempfile.mkdtemp(prefix='tune-tll-')),
            **options,
        )
        seconds = time.perf_counter() - started
        before = result.metrics_before
        print(f'\n{spec}  ({seconds:.0f} s)')
        print('  before   ' + ' '.join(f'{k} {before[k]:.3f}' for k in HITS))
        for logs in result.history:
            cells = ' '.join(f'{k} {logs[k]:.3f}' for k in HITS if k in logs)
            print(f'  epoch {int(logs["epoch"]):>2} loss {logs.get("train_loss", float("nan")):.4f} {cells}')
        last, best = result.history[-1].get('hit@10', 0), max(row.get('hit@10', 0) for row in result.history)
        print(
            f'  hit@10 x{last / before["hit@10"]:.2f} (last epoch), x{best / before["hit@10"]:.2f} (best epoch)',
            flush=True,
        )


if __name__ == '__main__':
    main()
