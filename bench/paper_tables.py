"""Finetuner's published tables, reproduced side by side on this machine (2 CPU cores, offline).

(a) the Totally-Looks-Like tutorial: hit@1/5/10 of the pre-trained vs the fine-tuned model (TripletMarginLoss with a
    hard miner); Finetuner's ResNet50 on full TLL moved hit@10 0.183 -> 0.301 (x1.645).
(b) the self-supervised tutorial, whose results column said "placeholder": SimCLR pre-training on the training
    images without labels, then supervised fine-tuning on 10 % of the pairs, against pre-trained, 10 % supervised
    only, and fully supervised.
(c) linear probe vs full fine-tune accuracy on scikit-learn's digits.
(d) text (``--text``, or ``--only text`` alone): SICK relatedness (``../shared/data/sick``), Spearman of cosine
    similarity vs the score (spearman_cosine) on trial.tsv and test.tsv of the pre-trained all-MiniLM-L6-v2, of the
    service's ``fit`` and of a bare PyTorch loop with the same loss, optimizer, learning rate, batch size, epochs,
    seed and batches (bench/text_sick.py), trained one after the other in the same run. Some 15-20 minutes on 2 idle
    cores (an epoch of the 4500 pairs at batch 32 is ~200 s per trainer; 50 minutes beside a test run), so
    ``--train-pairs N`` trains both on a seeded subset and ``--text-epochs 1`` halves it.

(e) text -> image (``--only text-to-image``): flickr8k-dev (``../shared/data/flickr8k-dev``), a two-tower model of
    the offline towers with only its projections trained vs fine-tuned, recall@1/5/10 and mrr@10 of caption queries
    over 100 held-out images, settings chosen on validation images of the training part (bench/text_to_image.py).

(f) search on judgements (``--only scifact``): BEIR SciFact (``../shared/data/scifact``), nDCG@10 of the pre-trained
    all-MiniLM-L6-v2 vs fine-tuned with in-batch negatives, with mined hard negatives and with the cached loss at a
    batch of 256, and a plain sentence-transformers loop, on claims never used to choose the settings
    (bench/scifact.py).

Data: ``../shared/data/tll-dev`` (1600 pairs; 1200 train, 400 evaluate: queries = left, index = right, relevant =
same id). The model is the offline default (efficientnet_lite0): no other pretrained weights are reachable here.

    .venv/bin/python bench/paper_tables.py [--tll ../shared/data/tll-dev] [--size 224] [--epochs 8]
                                          [--augmentation strong] [--text]
    .venv/bin/python bench/paper_tables.py --only text [--train-pairs N] [--text-epochs E]
    .venv/bin/python bench/paper_tables.py --only scifact
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault('FINETUNER_PROGRESS', '0')

from bench.text_sick import TEXT_BASE, TEXT_MODEL, reference_fit, sick_csvs, spearman
from executor.tuning import fit
from executor.tuning.data import Item
from executor.tuning.data.digits import digits_items
from executor.tuning.models import build_model

HITS = ['hit@1', 'hit@5', 'hit@10']
FINETUNER_HIT10 = (0.183, 0.301)  # the TLL tutorial's ResNet50 on full TLL, pre-trained and fine-tuned
# Table (a)'s recipe, shared with bench/tune_tll.py, which tunes it on the training pairs.
# freeze=4 (stem and the first three block stages, under 2 % of the weights but most of the pixels): as good as
# freeze=2 on the validation split and a third faster per epoch.
COMMON = dict(model='efficientnet_lite0', limit=10, tensorboard=False, freeze=4, seed=0)
# learning rate 2e-4 decaying on a cosine after 5 % warmup: validation hit@10 0.577 at epoch 8 against 0.530 at a
# constant 1e-4 and 0.510 with the cosine from 1e-4.
TRIPLET = dict(
    loss='TripletMarginLoss',
    loss_options={'margin': 0.2},
    num_items_per_class=2,
    learning_rate=2e-4,
    scheduler='cosine',
    scheduler_options={'num_warmup_steps': 0.05},
)
# The tutorial's miner: each anchor's hardest negative in the batch (Finetuner's TripletEasyHardMiner with
# neg_strategy='hard'; pytorch-metric-learning's BatchHardMiner).
HARD_MINER = dict(miner='BatchHardMiner', batch_size=64)
# Table (d)'s recipe, chosen on SICK's trial.tsv (500 pairs; pre-trained 0.7980) by bench/text_sick.py, training on
# all 4500 train pairs at batch 32 with Adam, seed 0: trial spearman_cosine of each setting (printed with the table)
TEXT_SWEEP = {
    'CoSENTLoss, lr 2e-5 constant, 1 epoch': 0.8124,
    'CoSENTLoss, lr 5e-5 linear, 10 % warmup, 1 epoch': 0.8105,
    'CosineSimilarityLoss, lr 2e-5 constant, 1 epoch': 0.8390,
    'CosineSimilarityLoss, lr 2e-5 constant, 2 epochs': 0.8431,
    'CosineSimilarityLoss, lr 5e-5 linear, 10 % warmup, 1 epoch': 0.8414,
}
# -> CosineSimilarityLoss at a constant 2e-5 for 2 epochs (the service's default for scored pairs, CoSENTLoss, is the
# weaker one here).
TEXT_RECIPE = dict(TEXT_BASE, loss='CosineSimilarityLoss', learning_rate=2e-5, epochs=2)


def tll_items(root: Path) -> tuple[list[Item], list[Item], list[Item]]:
    ids = sorted(p.stem for p in (root / 'left').glob('*.jpg') if (root / 'right' / p.name).is_file())
    if len(ids) < 1600:
        raise SystemExit(f'{root} has {len(ids)} pairs; expected the 1600 of tll-dev')
    train_ids, eval_ids = ids[:1200], ids[1200:1600]
    train = [
        Item(id=f'{side}/{i}', uri=str(root / side / f'{i}.jpg'), label=i)
        for i in train_ids
        for side in ('left', 'right')
    ]
    queries = [Item(id=f'left/{i}', uri=str(root / 'left' / f'{i}.jpg'), label=i) for i in eval_ids]
    index = [Item(id=f'right/{i}', uri=str(root / 'right' / f'{i}.jpg'), label=i) for i in eval_ids]
    return train, queries, index


def row(name: str, metrics: dict, seconds: float | None = None) -> str:
    cells = ''.join(f'{metrics[k]:>9.3f}' for k in HITS)
    return f'{name:<44}{cells}{"" if seconds is None else f"{seconds:>10.0f}"}'


def image_tables(args: argparse.Namespace) -> None:
    train, queries, index = tll_items(args.tll)
    # save_best=False: every run keeps its last epoch. The 400 evaluation pairs are only measured each epoch, never
    # used to pick one (the recipe and its epoch count come from bench/tune_tll.py on the training pairs).
    common = dict(COMMON, image_size=args.size, query_data=queries, index_data=index, save_best=False)
    supervised_opts = dict(TRIPLET, augmentation=args.augmentation, epochs=args.epochs)
    out = Path(tempfile.mkdtemp(prefix='paper-tables-'))

    started = time.perf_counter()
    supervised = fit(train_data=train, output_dir=out / 'supervised', **HARD_MINER, **supervised_opts, **common)
    t_sup = time.perf_counter() - started
    before, after = supervised.metrics_before, supervised.metrics_after

    tenth = train[: len(train) // 10]  # 120 pairs: both images of each
    started = time.perf_counter()
    few = fit(train_data=tenth, batch_size=48, output_dir=out / 'few', **supervised_opts, **common)
    t_few = time.perf_counter() - started

    started = time.perf_counter()
    unlabelled = [Item(id=it.id, uri=it.uri) for it in train]
    ssl = fit(
        train_data=unlabelled,
        loss='NTXentLoss',
        epochs=args.ssl_epochs,
        batch_size=64,
        output_dir=out / 'simclr',
        **{**common, 'model': 'efficientnet_lite0'},
    )
    ssl_then_few = fit(
        train_data=tenth,
        batch_size=48,
        output_dir=out / 'simclr-few',
        **supervised_opts,
        **{**common, 'model': str(ssl.artifact)},
    )
    t_ssl = time.perf_counter() - started

    started = time.perf_counter()
    train_d, held = digits_items(per_class=20, size=32), digits_items(per_class=10, offset=100, size=32)
    digit_opts = dict(
        model='efficientnet_lite0',
        image_size=64,
        train_data=train_d,
        eval_data=held,
        loss='CrossEntropyLoss',
        tensorboard=False,
        seed=0,
        save_best=False,
    )
    probe = fit(freeze=True, epochs=10, output_dir=out / 'probe', **digit_opts)
    full = fit(freeze=2, epochs=5, learning_rate=1e-4, output_dir=out / 'full', **digit_opts)
    t_cls = time.perf_counter() - started

    head = f'{"":<44}{"hit@1":>9}{"hit@5":>9}{"hit@10":>9}{"wall s":>10}'
    print(
        f'\n(a) TLL tutorial: efficientnet_lite0 {args.size}px, 1200 pairs, {args.epochs} epochs, '
        f'augmentation {args.augmentation!r}, TripletMarginLoss + {HARD_MINER["miner"]}; 400 left -> 400 right; '
        'last epoch'
    )
    print(head)
    print(row('pre-trained', before))
    print(row('fine-tuned', after, t_sup))
    pre, tuned = FINETUNER_HIT10
    ratio, theirs = after['hit@10'] / before['hit@10'], tuned / pre
    print(
        f'hit@10 x{ratio:.4f}: {before["hit@10"] * len(queries):.0f} -> {after["hit@10"] * len(queries):.0f} of '
        f'{len(queries)} queries (Finetuner, ResNet50 on full TLL: {pre} -> {tuned}, x{theirs:.4f}; '
        f'{"beaten" if ratio > theirs else "not beaten"})'
    )
    print('\n(b) self-supervised tutorial, its "placeholder" column filled (10 % = 120 pairs)')
    print(head)
    print(row('pre-trained', before))
    print(row('supervised on 10 % only', few.metrics_after, t_few))
    print(row(f'SimCLR ({args.ssl_epochs} ep, no labels) + 10 % supervised', ssl_then_few.metrics_after, t_ssl))
    print(row('fully supervised (100 %)', after, t_sup))
    print('\n(c) classification on scikit-learn digits (200 train, 100 held out, 64 px)')
    print(f'{"":<44}{"accuracy":>9}')
    print(f'{"pre-trained features + linear probe (10 ep)":<44}{probe.metrics_after["accuracy"]:>9.3f}')
    print(f'{"full fine-tune (5 ep, stem+1 stage frozen)":<44}{full.metrics_after["accuracy"]:>9.3f}{t_cls:>10.0f}')


def text_table(args: argparse.Namespace) -> None:
    """(d): SICK test Spearman of the pre-trained model, of the service's ``fit`` and of a bare PyTorch loop with the
    same recipe, trained one after the other in this run."""
    recipe = dict(TEXT_RECIPE, epochs=args.text_epochs or TEXT_RECIPE['epochs'])
    with tempfile.TemporaryDirectory(prefix='paper-tables-text-') as tmp:  # the run's ~350 MB of checkpoints
        text_runs(args, recipe, Path(tmp))


def text_runs(args: argparse.Namespace, recipe: dict, out: Path) -> None:
    """Table (d)'s three models measured, and the table printed; ``out`` holds the CSVs and the service's run."""
    csvs = sick_csvs(out / 'sick', args.train_pairs)
    pre = build_model(TEXT_MODEL)
    rows = {'pre-trained': (spearman(pre, csvs['trial']), spearman(pre, csvs['test']), None, None)}
    del pre

    started = time.perf_counter()
    # eval_data=trial: the service's per-epoch evaluation, as a user runs it; save_best=False keeps the last epoch
    service = fit(train_data=str(csvs['train']), eval_data=str(csvs['trial']), output_dir=out / 'service', **recipe)
    t_service = time.perf_counter() - started
    train_service = sum(h['epoch_seconds'] for h in service.history)
    rows['fine-tuned: the service (fit)'] = (
        spearman(service.model, csvs['trial']),
        spearman(service.model, csvs['test']),
        train_service,
        t_service,
    )
    started = time.perf_counter()
    reference, epoch_seconds = reference_fit(csvs['train'], **recipe)
    t_reference = time.perf_counter() - started
    rows['fine-tuned: bare PyTorch loop'] = (
        spearman(reference, csvs['trial']),
        spearman(reference, csvs['test']),
        sum(epoch_seconds),
        t_reference,
    )

    shown = {k: v for k, v in recipe.items() if k not in ('model', 'tensorboard', 'save_best', 'device')}
    print(
        f'\n(d) SICK relatedness: {TEXT_MODEL}, {args.train_pairs or 4500} train pairs, '
        f'{", ".join(f"{k}={v}" for k, v in shown.items())}; Spearman of cosine vs score (spearman_cosine), '
        'last epoch; recipe chosen on trial.tsv'
    )
    print(
        'trial spearman_cosine of the settings tried (bench/text_sick.py): '
        + '; '.join(f'{name} {value:.4f}' for name, value in TEXT_SWEEP.items())
    )
    print(f'{"":<36}{"trial":>9}{"test":>9}{"train s":>10}{"wall s":>10}')
    for name, (trial, test, train_s, wall) in rows.items():
        times = '' if train_s is None else f'{train_s:>10.0f}{wall:>10.0f}'
        print(f'{name:<36}{trial:>9.4f}{test:>9.4f}{times}')
    (_, pre_test, _, _), (_, svc, _, _), (_, ref, _, _) = rows.values()
    verdict = 'service >= loop' if svc >= ref else 'service BELOW the loop'
    print(
        f'test: service - bare loop {svc - ref:+.4f} ({verdict}); '
        f'service - pre-trained {svc - pre_test:+.4f}; training time service / bare loop '
        f'{train_service / sum(epoch_seconds):.3f} (wall s: fit with its trial evaluations, artifact and reports; '
        'the loop alone)'
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--tll', type=Path, default=Path(__file__).resolve().parents[2] / 'shared/data/tll-dev')
    parser.add_argument('--size', type=int, default=224, help='image size (bench/tune_tll.py chose 224)')
    parser.add_argument('--epochs', type=int, default=8)
    parser.add_argument('--ssl-epochs', type=int, default=2)
    parser.add_argument(
        '--augmentation',
        default='strong',
        choices=['none', 'light', 'strong'],
        help='training augmentation of the supervised TLL runs (bench/tune_tll.py chose it)',
    )
    parser.add_argument('--text', action='store_true', help='also table (d), SICK text fine-tuning')
    parser.add_argument(
        '--only',
        choices=['image', 'text', 'text-to-image', 'scifact'],
        help='only the image tables (a)-(c), only table (d), only table (e) (bench/text_to_image.py), or only table '
        '(f) (bench/scifact.py)',
    )
    parser.add_argument(
        '--train-pairs', type=int, default=None, help='table (d) on a seeded subset of the 4500 SICK training pairs'
    )
    parser.add_argument('--text-epochs', type=int, default=None, help="override table (d)'s chosen epochs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.only == 'scifact':
        from bench.scifact import main as scifact

        scifact([])
        return
    if args.only == 'text-to-image':
        from bench.text_to_image import table

        table()
        return
    if args.only != 'text':
        image_tables(args)
    if args.only == 'text' or (args.text and args.only is None):
        text_table(args)


if __name__ == '__main__':
    main()
