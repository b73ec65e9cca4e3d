"""Search fine-tuning on BEIR SciFact (``../shared/data/scifact``), pre-trained vs fine-tuned nDCG@10, side by side.

The 809 claims of its train split are split once, seeded, by whole claims: ``train`` (the runs' training pairs),
``dev`` (what the settings were chosen on) and ``report`` (never looked at while choosing: the table's figures). Every
model searches the whole corpus (5183 abstracts, ``title + ' ' + text``) by exact cosine kNN; the metrics are the
service's (``evaluation.judged``, checked against pytrec_eval in the tests).

Rows, trained one after the other in this run with the same recipe (optimizer, learning rate, schedule, batch size,
epochs, seed), all through the service's ``fit`` on a BEIR folder holding only the train claims' judgements:
  (i)   in-batch negatives only (MultipleNegativesRankingLoss);
  (ii)  with hard negatives mined from the corpus by the model being tuned (``hard_negatives={...}``);
  (iii) CachedMultipleNegativesRankingLoss at a batch of 256 (mini-batches of 32);
  and the reference: a plain sentence-transformers loop (its own SentenceTransformer, MultipleNegativesRankingLoss,
  AdamW and transformers' linear warmup schedule) on the same pairs and settings as (i).

    .venv/bin/python bench/scifact.py [--rows i,ii,iii,reference] [--sweep-learning-rates 2e-5,1e-4]
                                      [--epochs 2] [--max-seq-length 256]
    .venv/bin/python bench/paper_tables.py --only scifact      # the same table

Measured (2 cores, load average 3-4; ``--max-seq-length 128``, the learning rate 1e-4 chosen on dev over 2e-5), report
nDCG@10: pre-trained 0.6366, (i) 0.6432, (ii) 0.6670, (iii) 0.6510, the sentence-transformers loop 0.6683. Row (i)
trails the loop by 0.025 (0.012 on dev); over ``--seed`` 0-2 by 0.006 on report (-0.025 to +0.008) and 0.026 on dev,
unexplained as yet: the figure to look into next.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault('FINETUNER_PROGRESS', '0')

from executor.tuning import fit
from executor.tuning.data import Item
from executor.tuning.data.judgements import read_judgements
from executor.tuning.evaluation.evaluator import ModelEmbedder
from executor.tuning.evaluation.judged import judged_metrics
from executor.tuning.evaluation.knn import knn
from executor.tuning.inputs import DOCUMENT, QUERY
from executor.tuning.models import build_model
from executor.tuning.models.families.transformers_models import embedded_folder

SCIFACT = Path(__file__).resolve().parents[2] / 'shared/data/scifact'
MODEL = 'all-MiniLM-L6-v2'
SHOWN = ('ndcg@10', 'mrr@10', 'recall@100')
# the recipe of every row, sentence-transformers' defaults for MNRL fine-tuning (AdamW, weight decay 0.01, 2e-5,
# linear decay after 10 % warmup, batch 32) for 2 epochs; the learning rate is chosen on the dev claims in each run
# (--sweep-learning-rates)
RECIPE: dict[str, Any] = dict(
    model=MODEL,
    optimizer='AdamW',
    optimizer_options={'weight_decay': 0.01},
    learning_rate=2e-5,
    scheduler='linear',
    scheduler_options={'num_warmup_steps': 0.1},
    batch_size=32,
    epochs=2,
    seed=0,
    tensorboard=False,
    save_best=False,
    device='cpu',
)
# the mining options but one negative a pair (each more costs a document's forward and backward per pair: 2
# cores); rows of (claim, abstract, mined abstract)
MINING = {'num_negatives': 1, 'range_min': 10, 'range_max': 100, 'relative_margin': 0.05}
CACHED = dict(loss='CachedMultipleNegativesRankingLoss', loss_options={'mini_batch_size': 32}, batch_size=256)


def split_claims(judged: Sequence[Item], seed: int = 0) -> dict[str, list[Item]]:
    """The judged claims in three seeded parts by whole claims: report 250, dev 100, train the rest."""
    order = sorted(judged, key=lambda q: q.id)
    random.Random(seed).shuffle(order)
    return {'report': order[:250], 'dev': order[250:350], 'train': order[350:]}


def write_train_folder(folder: Path, train: Sequence[Item], corpus: Sequence[Item]) -> Path:
    """A BEIR folder of ``corpus`` whose qrels/train.tsv holds the train claims' judgements only."""
    (folder / 'qrels').mkdir(parents=True, exist_ok=True)
    (folder / 'queries.jsonl').symlink_to(SCIFACT / 'queries.jsonl')
    with open(folder / 'corpus.jsonl', 'w', encoding='utf-8') as fh:  # the text as read (title + ' ' + text)
        fh.writelines(json.dumps({'_id': d.id, 'title': '', 'text': d.content}) + '\n' for d in corpus)
    lines = ['query-id\tcorpus-id\tscore']
    lines += [f'{q.id}\t{d}\t{int(g)}' for q in train for d, g in sorted(q.relevant.items())]
    (folder / 'qrels' / 'train.tsv').write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return folder


class STEmbedder:
    """A sentence-transformers model as the evaluators' ``Embedder``."""

    class_names = None

    def __init__(self, model: Any, batch_size: int = 64) -> None:
        self.model, self.batch_size = model, batch_size

    def embed_items(self, items: Sequence[Item], prompt_name: str | None = None) -> np.ndarray:
        prompt = (self.model.prompts or {}).get(prompt_name) if prompt_name else None
        texts = [it.content for it in items]
        return self.model.encode(texts, batch_size=self.batch_size, prompt=prompt or None, convert_to_numpy=True)


def evaluate(embedder: Any, parts: dict[str, list[Item]], corpus: list[Item]) -> dict[str, dict[str, float]]:
    """The judged metrics of the dev and report claims, the corpus embedded once for both."""
    ids = [d.id for d in corpus]
    corpus_emb = torch.as_tensor(np.asarray(embedder.embed_items(corpus, DOCUMENT), dtype=np.float32))
    results = {}
    for name in ('dev', 'report'):
        queries = parts[name]
        query_emb = torch.as_tensor(np.asarray(embedder.embed_items(queries, QUERY), dtype=np.float32))
        _, indices = knn(query_emb, corpus_emb, k=100)
        ranked = [[ids[j] for j in row] for row in indices.tolist()]
        results[name] = judged_metrics(ranked, [q.relevant for q in queries])
    return results


def reference_loop(pairs: list[tuple[str, str]], recipe: dict[str, Any]) -> tuple[Any, float]:
    """The plain sentence-transformers loop: its own model and MNRL, AdamW and transformers' linear warmup schedule,
    the pairs shuffled each epoch (seeded), the last partial batch dropped as the service's sampler does."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(recipe['seed'])
    model = SentenceTransformer(str(embedded_folder()), device='cpu')
    model.max_seq_length = recipe['max_seq_length']
    loss = MultipleNegativesRankingLoss(model)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe['learning_rate'], weight_decay=recipe['optimizer_options']['weight_decay']
    )
    size = recipe['batch_size']
    steps = len(pairs) // size * recipe['epochs']
    warmup = int(np.ceil(steps * recipe['scheduler_options']['num_warmup_steps']))
    schedule = get_linear_schedule_with_warmup(optimizer, warmup, steps)
    rng = random.Random(recipe['seed'])
    started = time.perf_counter()
    model.train()
    for _ in range(recipe['epochs']):
        order = list(range(len(pairs)))
        rng.shuffle(order)
        for start in range(0, len(order) - size + 1, size):
            batch = [pairs[i] for i in order[start : start + size]]
            features = [model.preprocess([a for a, _ in batch]), model.preprocess([p for _, p in batch])]
            value = loss(features, None)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return model, time.perf_counter() - started


def service_row(folder: Path, out: Path, recipe: dict[str, Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fit(train_data=str(folder), split='train', output_dir=out, **recipe)
    return result.model.eval(), time.perf_counter() - started


def table(args: argparse.Namespace) -> None:
    judgements = read_judgements(SCIFACT, 'train')
    corpus = list(judgements.corpus)
    parts = split_claims(judgements.judged)
    if args.smoke:  # a check that every row runs (minutes): a tenth of the claims, judged abstracts + 200 others
        parts = {name: queries[: len(queries) // 10] for name, queries in parts.items()}
        kept = {d for qs in parts.values() for q in qs for d in q.relevant}
        corpus = [d for d in corpus if d.id in kept] + [d for d in corpus if d.id not in kept][:200]
    texts = {d.id: d.content for d in corpus}
    pairs = [(q.content, texts[d]) for q in parts['train'] for d, grade in sorted(q.relevant.items()) if grade > 0]
    recipe = dict(
        RECIPE, epochs=args.epochs, learning_rate=args.learning_rate, max_seq_length=args.max_seq_length, seed=args.seed
    )
    print(
        f'SciFact: {len(corpus)} abstracts; claims: train {len(parts["train"])} ({len(pairs)} pairs), dev '
        f'{len(parts["dev"])}, report {len(parts["report"])}; {MODEL}; recipe '
        + ', '.join(f'{k}={v}' for k, v in recipe.items() if k not in ('model', 'tensorboard', 'save_best', 'device')),
        flush=True,
    )
    rows: dict[str, tuple[dict[str, dict[str, float]], float | None]] = {}

    def measured(name: str, model: Any, seconds: float | None, st: bool = False) -> None:
        embedder = STEmbedder(model) if st else ModelEmbedder(model, torch.device('cpu'), batch_size=64)
        rows[name] = (evaluate(embedder, parts, corpus), seconds)
        dev, report = rows[name][0]['dev'], rows[name][0]['report']
        print(
            f'  {name}: dev ndcg@10 {dev["ndcg@10"]:.4f}, report ndcg@10 {report["ndcg@10"]:.4f}'
            + (f', {seconds:.0f} s' if seconds is not None else ''),
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix='bench-scifact-') as tmp:
        folder = write_train_folder(Path(tmp) / 'beir', parts['train'], corpus)
        wanted = args.rows.split(',')
        if 'pre' in wanted:
            pre = build_model(MODEL).eval()
            pre.inputs = pre.inputs.with_options(max_seq_length=args.max_seq_length)
            measured('pre-trained', pre, None)
        if 'i' in wanted:
            # the learning rate is chosen here, on the dev claims only: row (i) at each rate, the best dev nDCG@10 kept
            tried = {}
            for rate in args.sweep_learning_rates:
                name = f'(i) in-batch negatives (MNRL), lr {rate:g}'
                measured(name, *service_row(folder, Path(tmp) / f'i-{rate:g}', dict(recipe, learning_rate=rate)))
                tried[rate] = rows[name][0]['dev']['ndcg@10']
            recipe['learning_rate'] = max(tried, key=lambda r: (tried[r], -r))
            print(
                'learning rate chosen on dev: '
                + ', '.join(f'{r:g}: dev ndcg@10 {v:.4f}' for r, v in tried.items())
                + f' -> {recipe["learning_rate"]:g}',
                flush=True,
            )
        if 'ii' in wanted:
            mined = dict(recipe, hard_negatives=MINING)
            measured('(ii) + mined hard negatives', *service_row(folder, Path(tmp) / 'ii', mined))
        if 'iii' in wanted:
            cached = dict(recipe, **CACHED)
            measured('(iii) cached MNRL, batch 256', *service_row(folder, Path(tmp) / 'iii', cached))
        if 'reference' in wanted:
            measured('reference: sentence-transformers loop', *reference_loop(pairs, recipe), st=True)

    print(f'\nSciFact nDCG@10 (and mrr@10, recall@100) on the {len(parts["report"])} report claims, whole corpus:')
    print(f'{"":<40}{"dev ndcg":>10}' + ''.join(f'{m:>12}' for m in SHOWN) + f'{"wall s":>9}')
    for name, (metrics, seconds) in rows.items():
        shown = ''.join(f'{metrics["report"][m]:>12.4f}' for m in SHOWN)
        wall = f'{seconds:>9.0f}' if seconds is not None else f'{"":>9}'
        print(f'{name:<40}{metrics["dev"]["ndcg@10"]:>10.4f}{shown}{wall}')
    pre = rows['pre-trained'][0]['report']['ndcg@10'] if 'pre-trained' in rows else float('nan')
    reference = rows.get('reference: sentence-transformers loop')
    for name, (metrics, _) in rows.items():
        if name == 'pre-trained':
            continue
        value = metrics['report']['ndcg@10']
        line = f'{name}: report ndcg@10 - pre-trained {value - pre:+.4f}'
        if reference is not None and not name.startswith('reference'):
            line += f'; - reference {value - reference[0]["report"]["ndcg@10"]:+.4f}'
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({k: v[0] | {'seconds': v[1]} for k, v in rows.items()}, indent=1))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--rows', default='pre,i,ii,iii,reference', help='which rows: pre (pre-trained), i, ii, iii, reference'
    )
    parser.add_argument('--seed', type=int, default=RECIPE['seed'], help='the seed of every run (the split stays)')
    parser.add_argument('--epochs', type=int, default=RECIPE['epochs'])
    parser.add_argument(
        '--sweep-learning-rates',
        type=lambda text: [float(r) for r in text.split(',')],
        default=[2e-5, 1e-4],
        help="row (i)'s learning rates tried; the best on dev is the recipe of the other rows",
    )
    parser.add_argument(
        '--learning-rate', type=float, default=RECIPE['learning_rate'], help='the rate when row (i) is not run'
    )
    parser.add_argument(
        '--max-seq-length',
        type=int,
        default=256,
        help="tokens per text for every row (the model's own 256 by default; 128 halves the cost of a corpus pass)",
    )
    parser.add_argument('--json', default=None, help='also write the metrics to this file')
    parser.add_argument('--smoke', action='store_true', help='a quick check that every row runs (not a result)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not (SCIFACT / 'corpus.jsonl').is_file():
        raise SystemExit(f'{SCIFACT} is missing: SciFact lives in ../shared/data/scifact (see its README.md)')
    table(args)


if __name__ == '__main__':
    main()
