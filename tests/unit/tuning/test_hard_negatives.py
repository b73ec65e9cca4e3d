"""Hard negatives mined from a corpus (hard_negatives.py), with sentence-transformers' option semantics: judged
positives are never negatives, the margins and score bounds hold, ranks range_min..range_max, n-tuple and triplet
rows; and mining in a run (saved as hard_negatives.jsonl, reused on resume)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from executor.tuning.config import HardNegatives
from executor.tuning.data.sources import Item
from executor.tuning.errors import DataError
from executor.tuning.evaluation import ModelEmbedder
from executor.tuning.hard_negatives import mine_hard_negatives
from executor.tuning.models import build_model


class AngleEmbedder:
    """Each text at an angle on the unit circle: cos(query, text) = cos(angle difference), so the ranking and every
    score are known exactly."""

    class_names = None

    def __init__(self, angles: dict[str, float]) -> None:
        self.angles = angles

    def embed_items(self, items, prompt_name=None):
        return np.array([[math.cos(self.angles[it.text]), math.sin(self.angles[it.text])] for it in items])


# one query at angle 0; its positive at 0.5 rad (cos 0.878); documents closer and further
ANGLES = {'query': 0.0, 'positive': 0.5, 'judged': 0.1, 'n1': 0.2, 'n2': 0.45, 'n3': 0.52, 'n4': 0.9, 'n5': 1.5}
CORPUS = [Item(id=t, text=t) for t in ('judged', 'n1', 'n2', 'n3', 'n4', 'n5')]
PAIR = Item(id='q->p', columns=('query', 'positive'), relevant={'positive': 1.0, 'judged': 2.0}, name='pair')
COS = {text: math.cos(angle) for text, angle in ANGLES.items()}


def mine(**options):
    return mine_hard_negatives(
        [PAIR], CORPUS + [Item(id='positive', text='positive')], AngleEmbedder(ANGLES), HardNegatives(**options)
    )


def negatives(mined):
    return [row.columns[2:] for row in mined.rows]


def test_judged_positives_never_become_negatives():
    """'judged' is the corpus's nearest document, but the query's judgements grade it 2: never a negative."""
    assert negatives(mine(num_negatives=3)) == [('n1', 'n2', 'n3')]


def test_the_margins_hold():
    positive = COS['positive']
    # absolute: at most positive - 0.05: n2 (0.900) and n1 are too close, n3 (0.868) is within 0.01: out too
    got = negatives(mine(num_negatives=2, margin=0.05, range_max=6))[0]
    assert got == ('n4', 'n5') and all(COS[n] <= positive - 0.05 for n in got)
    assert negatives(mine(num_negatives=2, absolute_margin=0.05, range_max=6)) == [got]
    # relative: at most positive - |positive| x 0.3 (0.614): n4 (0.622) is just too close
    got = negatives(mine(num_negatives=1, relative_margin=0.3, range_max=6))[0]
    assert got == ('n5',) and COS['n5'] <= positive * 0.7 < COS['n4']
    assert negatives(mine(num_negatives=2, max_score=0.95, min_score=0.5, range_max=6)) == [('n2', 'n3')]


def test_ranks_range_min_to_range_max():
    assert negatives(mine(num_negatives=2, range_min=1, range_max=4)) == [('n2', 'n3')]
    assert negatives(mine(num_negatives=2, range_min=1, range_max=4, sampling_strategy='random'))[0] in {
        ('n2', 'n3'),
        ('n2', 'n4'),
        ('n3', 'n4'),
    }


def test_n_tuple_leaves_out_a_pair_short_of_negatives_and_triplet_rows_each():
    with pytest.raises(DataError, match='no pair got 5 hard negatives'):
        mine(num_negatives=5, relative_margin=0.3, range_max=6)
    triplets = mine(num_negatives=2, output_format='triplet')
    assert [row.columns for row in triplets.rows] == [('query', 'positive', 'n1'), ('query', 'positive', 'n2')]


def test_options_are_checked():
    with pytest.raises(ValueError, match='range_min=5 must be below range_max=5'):
        HardNegatives(range_min=5, range_max=5)
    with pytest.raises(ValueError, match='cannot mine num_negatives=4 among ranks 2 to 4'):
        HardNegatives(num_negatives=4, range_min=2, range_max=4)
    with pytest.raises(ValueError, match='margin or absolute_margin'):
        HardNegatives(margin=0.1, absolute_margin=0.1)
    with pytest.raises(ValueError, match='Extra inputs'):
        HardNegatives(num_negative=3)


SENTENCES = [
    ('who rules an ant colony?', 'Ants live in colonies ruled by a single egg-laying queen.'),
    ('how do bees make honey?', 'Honey bees store nectar in wax combs as honey.'),
    ('what happens when a volcano erupts?', 'The volcano erupted, covering the town in ash.'),
    ('why did interest rates change?', 'The central bank raised interest rates again.'),
    ('who won the football match?', 'The striker scored twice in the final minutes.'),
    ('how do plants use sunlight?', 'Photosynthesis turns light into chemical energy.'),
]
DISTRACTORS = [
    'Worker ants forage for food and defend the nest.',
    'A bee colony swarms when a new queen is raised.',
    'Lava flows cooled into black basalt fields.',
    'Inflation fell as energy prices dropped.',
    'The goalkeeper saved a penalty in extra time.',
    'Chlorophyll absorbs red and blue light.',
    'The museum opened a new wing for modern art.',
    'Trains were delayed by snow across the north.',
]


def test_mined_with_the_real_model_keep_every_rule():
    model = build_model('all-MiniLM-L6-v2')
    embedder = ModelEmbedder(model, torch.device('cpu'))
    pairs = [Item(id=str(i), columns=pair, name=f'row {i}') for i, pair in enumerate(SENTENCES)]
    options = HardNegatives(num_negatives=2, relative_margin=0.05, range_max=12)
    mined = mine_hard_negatives(pairs, [Item(id=f'x{i}', text=t) for i, t in enumerate(DISTRACTORS)], embedder, options)
    texts = [q for q, _ in SENTENCES] + [p for _, p in SENTENCES] + DISTRACTORS
    unit = torch.nn.functional.normalize(embedder.embed_items([Item(id=t, text=t) for t in texts]), dim=1)
    cos = {(a, b): float(unit[i] @ unit[j]) for i, a in enumerate(texts) for j, b in enumerate(texts)}
    positives = {p for _, p in SENTENCES}
    assert mined.rows
    for row in mined.rows:
        query, positive, *negs = row.columns
        assert len(negs) == 2 and positive not in negs and query not in negs
        for negative in negs:
            # another query's positive may be a negative (as in sentence-transformers), never the own one
            assert negative in positives | set(DISTRACTORS)
            assert cos[query, negative] <= cos[query, positive] - abs(cos[query, positive]) * 0.05 + 1e-6
        assert cos[query, negs[0]] >= cos[query, negs[1]]  # best first
    assert mined.stats['positive_score_mean'] > mined.stats['negative_score_mean']


def test_a_run_mines_saves_and_reuses_its_negatives(tmp_path):
    """fit() on a BEIR folder with hard_negatives: rows (query, positive, negative) in hard_negatives.jsonl, and a
    resumed run reads them back instead of mining again."""
    from executor.tuning.config import TrainConfig
    from executor.tuning.plan import plan_run
    from executor.tuning.trainer import Trainer
    from tests.helpers import write_beir

    corpus = [{'_id': f'p{i}', 'text': p} for i, (_, p) in enumerate(SENTENCES)]
    corpus += [{'_id': f'x{i}', 'text': t} for i, t in enumerate(DISTRACTORS)]
    queries = [{'_id': f'q{i}', 'text': q} for i, (q, _) in enumerate(SENTENCES)]
    qrels = [(f'q{i}', f'p{i}', '1') for i in range(len(SENTENCES))] + [('q0', 'x0', '1')]  # x0 is judged for q0
    folder = write_beir(tmp_path / 'beir', corpus, queries, qrels, split='train')
    config = TrainConfig(
        model='all-MiniLM-L6-v2',
        train_data=str(folder),
        hard_negatives={'num_negatives': 1, 'range_max': 10},
        batch_size=4,
        epochs=1,
        output_dir=tmp_path / 'run',
        tensorboard=False,
        loggers=[],
    )
    plan = plan_run(config)
    assert plan.task.views == 3 and len(plan.corpus) == 14
    trainer = Trainer(plan)
    saved = tmp_path / 'run' / 'hard_negatives.jsonl'
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    assert len(rows) == 7 and all(len(r['columns']) == 3 for r in rows)
    q0 = [r['columns'] for r in rows if r['columns'][0] == SENTENCES[0][0]]
    assert all(c[2] not in (SENTENCES[0][1], DISTRACTORS[0]) for c in q0)  # both judged positives of q0
    trainer.fit()
    rows[0]['columns'][2] = 'a negative written by hand'
    saved.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    resumed = Trainer(plan)  # what a resumed run builds: it reads the saved rows, it does not mine again
    assert resumed.items[0].columns[2] == 'a negative written by hand'
