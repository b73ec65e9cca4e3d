"""Same seed, same data, same machine: the per-epoch training losses and retrieval metrics of three short CPU runs.

Run it on two commits and compare the printed lines: a change that claims no change of behaviour (issue 17's
restructuring) must print the same numbers. The runs are a metric-learning run (TripletMarginLoss on the default
efficientnet_lite0 at 64 px, evaluated each epoch), a classification run (CrossEntropyLoss on resnet18, random init)
and a SimCLR run (NTXentLoss on unlabelled digits), each 2 epochs on scikit-learn's digits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault('FINETUNER_PROGRESS', '0')
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from executor.tuning import fit
from executor.tuning.data.digits import digits_items

RUNS = {
    'metric': dict(
        model='efficientnet_lite0', image_size=64, loss='TripletMarginLoss', batch_size=20, learning_rate=1e-4
    ),
    'classification': dict(
        model='resnet18', pretrained=False, image_size=32, loss='CrossEntropyLoss', batch_size=20, learning_rate=1e-3
    ),
    'self_supervised': dict(
        model='resnet18', pretrained=False, image_size=32, loss='NTXentLoss', batch_size=20, learning_rate=1e-3
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--json', type=Path, help='also write the figures to this file')
    args = parser.parse_args()
    torch.set_num_threads(2)
    train = digits_items(per_class=8, size=32)
    evaluation = digits_items(per_class=4, offset=50, size=32)
    figures = {}
    for name, options in RUNS.items():
        data = [it.__class__(id=it.id, tensor=it.tensor) for it in train] if name == 'self_supervised' else train
        with tempfile.TemporaryDirectory() as tmp:
            result = fit(
                train_data=data,
                eval_data=None if name == 'self_supervised' else evaluation,
                epochs=2,
                seed=0,
                tensorboard=False,
                output_dir=tmp,
                device='cpu',
                **options,
            )
        rows = [{k: v for k, v in row.items() if k not in ('epoch_seconds', 'lr')} for row in result.history]
        figures[name] = {'history': rows, 'before': result.metrics_before, 'after': result.metrics_after}
        for row in rows:
            shown = {k: row[k] for k in ('train_loss', 'ndcg@10', 'hit@1', 'map@10', 'accuracy') if k in row}
            print(f'{name:16s} epoch {int(row["epoch"])}: ' + ', '.join(f'{k}={v:.10f}' for k, v in shown.items()))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, sort_keys=True))


if __name__ == '__main__':
    main()
