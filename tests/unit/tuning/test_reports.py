"""Reports: the before/after table and JSON, and the PNG plots rendered from small synthetic inputs."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from executor.tuning.reports import (
    BEFORE_AFTER_PNG,
    CURVES_PNG,
    MATCHES_PNG,
    METRICS_JSON,
    display_metrics,
    plot_before_after,
    plot_curves,
    plot_matches,
)

BEFORE = {'precision_at_k': 0.25, 'ndcg@10': 0.5, 'dcg_at_k': 1.5, 'val_loss': 0.8}
AFTER = {'precision_at_k': 0.5, 'ndcg@10': 0.4, 'dcg_at_k': 2.0, 'val_loss': 0.6, 'hit@1': float('nan')}


def assert_png(path, min_side=200):
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == 'PNG'
        assert max(image.size) > min_side and min(image.size) > 50
        return image.size


def test_display_metrics_table_text_and_json(tmp_path):
    console = Console(file=io.StringIO(), width=120, color_system='truecolor', force_terminal=True)
    report = display_metrics(BEFORE, AFTER, tmp_path, console=console)
    assert report.path == tmp_path / METRICS_JSON
    assert report.table.row_count == 5
    lines = {line.split('│')[1].strip(): line for line in report.text.splitlines() if line.count('│') == 5}
    # 0.25 -> 0.5 is +0.250, +100%; 0.5 -> 0.4 is -0.100, -20%; a metric only after shows a dash before.
    assert '0.250' in lines['precision_at_k'] and '+0.250 (+100.0%)' in lines['precision_at_k']
    assert '-0.100 (-20.0%)' in lines['ndcg@10']
    assert '—' in lines['hit@1']
    printed = console.file.getvalue()
    assert '\x1b[' in printed  # the console got the coloured table; the text render has no escapes
    assert '\x1b[' not in report.text
    saved = json.loads(report.path.read_text())
    assert saved['before'] == BEFORE
    assert saved['after']['hit@1'] is None  # NaN is not JSON
    assert saved['change'] == pytest.approx(
        {'precision_at_k': 0.25, 'ndcg@10': -0.1, 'dcg_at_k': 0.5, 'val_loss': -0.2}
    )


def test_plot_curves(tmp_path):
    history = [{'epoch': float(e), 'train_loss': 1.0 / e, 'lr': 1e-3, 'epoch_seconds': 3.0} for e in range(1, 6)]
    for row in history[1::2]:  # evaluated every other epoch
        row.update({'val_loss': row['train_loss'] * 1.1, 'ndcg@10': 0.1 * row['epoch'], 'hit@1': 0.05})
    path = plot_curves(history, tmp_path)
    assert path == tmp_path / CURVES_PNG
    width, height = assert_png(path)
    assert width > height  # two panels side by side
    only_loss = plot_curves([{'step': 1, 'loss': 2.0}, {'step': 2, 'loss': 1.0}], tmp_path / 'sub')
    assert_png(only_loss)


def test_plot_curves_errors(tmp_path):
    with pytest.raises(ValueError, match='history is empty'):
        plot_curves([], tmp_path)
    with pytest.raises(ValueError, match='no loss or metric to plot'):
        plot_curves([{'epoch': 1, 'lr': 0.1}], tmp_path)
    with pytest.raises(ValueError, match=r"metrics \['mrr@10'\] are not in the history"):
        plot_curves([{'epoch': 1, 'loss': 0.1}], tmp_path, metrics=['mrr@10'])


def test_plot_before_after(tmp_path):
    path = plot_before_after(BEFORE, AFTER, tmp_path)
    assert path == tmp_path / BEFORE_AFTER_PNG
    assert_png(path)
    with pytest.raises(ValueError, match='nothing to plot'):
        plot_before_after({'a': 1.0}, {'b': 2.0}, tmp_path)
    with pytest.raises(ValueError, match=r"metrics \['hit@5'\] are missing"):
        plot_before_after(BEFORE, AFTER, tmp_path, metrics=['hit@5'])


def test_plot_matches(tmp_path):
    rng = np.random.default_rng(0)
    queries = [rng.integers(0, 255, (40, 30, 3), dtype=np.uint8), Image.new('L', (64, 20), 128)]
    matches = [
        [rng.integers(0, 255, (32, 32), dtype=np.uint8) for _ in range(4)],
        [Image.new('RGB', (10, 50), (0, 0, 255)) for _ in range(3)],
    ]
    relevant = [[True, False, True, False], [False, False, True]]
    path = plot_matches(queries, matches, relevant, tmp_path, tile=64)
    assert path == tmp_path / MATCHES_PNG
    width, height = assert_png(path)
    assert width > 5 * 64 and height > 2 * 64  # 1 query + 4 matches across, 2 rows down
    with Image.open(path) as sprite:
        pixels = np.asarray(sprite.convert('RGB'))
    greens = np.all(pixels == (0, 160, 60), axis=2).sum()
    reds = np.all(pixels == (210, 30, 30), axis=2).sum()
    assert greens > 0 and reds > greens  # 3 relevant frames, 4 irrelevant ones of the same size


def test_plot_matches_errors(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match='no query images'):
        plot_matches([], [], [], tmp_path)
    with pytest.raises(ValueError, match='query 0 has no matches'):
        plot_matches([image], [[]], [[]], tmp_path)
    with pytest.raises(ValueError, match='2 matches but 1 relevance flags'):
        plot_matches([image], [[image, image]], [[True]], tmp_path)
    with pytest.raises(ValueError, match='match 1 of query 0 must be a PIL image or a uint8 array'):
        plot_matches([image], [[image.astype(np.float32)]], [[True]], tmp_path)
