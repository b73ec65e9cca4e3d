"""A run planned once: what the plan holds, and that it comes back from disk as it was made, unvalidated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from executor.tuning.config import TrainConfig
from executor.tuning.data import Item
from executor.tuning.inputs.image import load_image
from executor.tuning.plan import PLAN_FILE, RunPlan, plan_run, read_items, write_items
from executor.tuning.tasks import PairTraining


def test_items_of_every_kind_come_back_as_they_were_written(tmp_path: Path):
    rng = np.random.default_rng(0)
    tensor = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
    png = tmp_path / 'blob.png'
    Image.fromarray(tensor[::-1].copy()).save(png)
    on_disk = tmp_path / 'on-disk.png'
    Image.fromarray(tensor[:, ::-1].copy()).save(on_disk)
    items = [
        Item('t', tensor=tensor, label='a', name="document 't'"),
        Item('b', blob=png.read_bytes(), label='b'),
        Item('u', uri=str(on_disk)),
        Item('s', text='a sentence, with "quotes"\nand a newline', label='c'),
        Item('p', columns=('a cat', 'a kitten'), score=4.5, name='pairs.csv line 2'),
    ]
    write_items(tmp_path / 'plan', 'train', items)
    back = read_items(tmp_path / 'plan', 'train')
    assert [(it.id, it.label, it.name) for it in back] == [(it.id, it.label, it.name) for it in items]
    for original, restored in zip(items[:3], back[:3]):  # images: the same pixels, from the files saved beside
        assert np.array_equal(np.asarray(load_image(restored.content)), np.asarray(load_image(original.content)))
    assert back[3].text == items[3].text and back[3].kind == 'text'
    assert back[4].columns == ('a cat', 'a kitten') and back[4].score == 4.5


def test_a_saved_plan_loads_as_it_was_planned_without_validating_again(tmp_path: Path, validations):
    rows = ['sentence1,sentence2,score'] + [f'a sentence {i},another sentence {i},{i % 5}' for i in range(12)]
    (tmp_path / 'pairs.csv').write_text('\n'.join(rows) + '\n')
    config = TrainConfig(
        model='all-MiniLM-L6-v2',
        train_data=str(tmp_path / 'pairs.csv'),
        loss='CosineSimilarityLoss',
        val_split=0.25,
        data_roots=[str(tmp_path)],
    )
    plan = plan_run(config)
    assert isinstance(plan.task, PairTraining) and plan.task.score_range == (0.0, 4.0)
    assert plan.counts() == {'train': 9, 'query': 3}  # a quarter of the rows held out, read from the CSV once
    assert plan.config.learning_rate == 2e-5 and plan.config.epochs == 1  # the pair task's defaults, filled in
    plan.save(tmp_path / 'run')

    validations.count = 0
    loaded = RunPlan.load(tmp_path / 'run', output_dir=tmp_path / 'run')
    assert validations.count == 0
    assert loaded.config.model_dump(exclude={'output_dir'}) == plan.config.model_dump(exclude={'output_dir'})
    assert loaded.config.output_dir == tmp_path / 'run'
    assert type(loaded.task) is PairTraining and loaded.task.spec() == plan.task.spec()
    assert [it.columns for it in loaded.items] == [it.columns for it in plan.items]
    assert [it.score for it in loaded.evaluation[0]] == [it.score for it in plan.evaluation[0]]
    assert loaded.evaluation[1] is None and loaded.class_names is None
    saved = json.loads((tmp_path / 'run' / PLAN_FILE).read_text())
    assert saved['task'] == {'name': 'pairs', 'columns': 2, 'scored': True, 'score_range': [0.0, 4.0]}
    assert saved['config']['train_data'] == str(tmp_path / 'pairs.csv')
    RunPlan.update(tmp_path / 'run', epochs=3)
    assert RunPlan.load(tmp_path / 'run').config.epochs == 3
