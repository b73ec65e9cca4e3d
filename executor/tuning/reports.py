"""A run's ``reports/``: the before/after metrics table, curves, bars, example results and their match sprite.

- `write_reports`: all of them for a finished run, from a plain record of it (history, metrics, its evaluator)

- `display_metrics`: pre-trained vs fine-tuned table (rich, plus a plain-text render) -> ``metrics_before_after.json``
- `plot_curves`: loss and metric curves from the training history -> ``curves.png``
- `plot_before_after`: before/after bars per metric -> ``before_after.png``
- `plot_matches`: each query then its top matches, relevant framed green, others red -> ``matches.png``
- `example_results`: a few queries and their matches (Finetuner's) -> ``examples.json`` (and ``matches.png``)

Plots use matplotlib's object API (a `Figure` rendered by Agg, no pyplot state), so they work headless and in threads.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw
from rich.console import Console, RenderableType
from rich.table import Table

from executor.tuning.data.sources import Item
from executor.tuning.evaluation import Evaluator, knn, metric_mode
from executor.tuning.files import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

METRICS_JSON = 'metrics_before_after.json'
CURVES_PNG = 'curves.png'
BEFORE_AFTER_PNG = 'before_after.png'
MATCHES_PNG = 'matches.png'
EXAMPLES_JSON = 'examples.json'  # example_results: queries and their matches, for every modality

ImageLike = Image.Image | np.ndarray
_X_KEYS = ('epoch', 'step')
_GREEN, _RED, _GREY, _WHITE = (0, 160, 60), (210, 30, 30), (120, 120, 120), (255, 255, 255)


@dataclass
class MetricsReport:
    """What `display_metrics` produced: the rich table, its plain-text render and the JSON file."""

    table: Table
    text: str
    path: Path


def metrics_table(
    before: Mapping[str, float], after: Mapping[str, float], title: str = 'Pre-trained vs fine-tuned'
) -> Table:
    """A rich table with one row per metric: pre-trained value, fine-tuned value and the change.

    The change is green when it is an improvement (by `metric_mode`), red when it is a regression.
    """
    names = _metric_names(before, after)
    table = Table(title=title)
    table.add_column('Metric')
    table.add_column('Pre-trained', justify='right')
    table.add_column('Fine-tuned', justify='right')
    table.add_column('Change', justify='right')
    for name in names:
        old, new = before.get(name), after.get(name)
        table.add_row(name, _fmt(old), _fmt(new), _change(name, old, new))
    return table


def render_text(renderable: RenderableType, width: int = 100) -> str:
    """Render a rich object to plain text (no colours), e.g. for logs or files."""
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(renderable)
    return console.file.getvalue()


def display_metrics(
    before: Mapping[str, float],
    after: Mapping[str, float],
    folder: str | os.PathLike,
    console: Console | None = None,
    title: str = 'Pre-trained vs fine-tuned',
) -> MetricsReport:
    """Finetuner's `display_metrics`: the before/after table, printed on `console` when given, saved as JSON.

    The JSON (``metrics_before_after.json`` in `folder`) holds ``{"before": {...}, "after": {...}, "change":
    {...}}`` with change = after - before for the metrics in both; non-finite values are written as null.
    """
    table = metrics_table(before, after, title)
    if console is not None:
        console.print(table)
    change = {
        name: after[name] - before[name] for name in _metric_names(before, after) if name in before and name in after
    }
    payload = {'before': _json_ready(before), 'after': _json_ready(after), 'change': _json_ready(change)}
    path = _write_bytes(Path(folder) / METRICS_JSON, (json.dumps(payload, indent=2) + '\n').encode())
    return MetricsReport(table, render_text(table), path)


def plot_curves(
    history: Sequence[Mapping[str, float]],
    folder: str | os.PathLike,
    metrics: Sequence[str] | None = None,
) -> Path:
    """Plot the losses (left) and the metrics (right) of a training history into ``curves.png``.

    :param history: one dict per epoch, e.g. ``{'epoch': 1, 'train_loss': 0.7, 'ndcg@10': 0.41}``; a key missing
        from some rows (evaluation every few epochs) is plotted where present. The x axis is 'epoch' (else 'step',
        else the row number).
    :param metrics: the non-loss keys to plot; default: every key that is a known higher-is-better metric in
        [0, 1] (so 'lr', timings and the unbounded ``dcg_at_k`` are left out, which would squash the others).
    """
    if not history:
        raise ValueError('history is empty: nothing to plot; pass the list of per-epoch dicts of a finished epoch')
    keys = list(dict.fromkeys(key for row in history for key in row))
    x_key = next((key for key in _X_KEYS if all(key in row for row in history)), None)
    xs = [row[x_key] for row in history] if x_key else list(range(1, len(history) + 1))
    losses = [key for key in keys if 'loss' in key]
    chosen = list(metrics) if metrics is not None else [key for key in keys if _is_score(key) and key != 'dcg_at_k']
    unknown = [key for key in chosen if key not in keys]
    if unknown:
        raise ValueError(f'metrics {unknown} are not in the history; its keys are {keys}')
    panels = [(title, names) for title, names in (('Loss', losses), ('Metrics', chosen)) if names]
    if not panels:
        raise ValueError(f'history has no loss or metric to plot; its keys are {keys}')

    fig = Figure(figsize=(6.0 * len(panels), 4.5), dpi=100, layout='constrained')
    for ax, (title, names) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for name in names:
            points = [(x, row[name]) for x, row in zip(xs, history) if _finite(row.get(name))]
            if points:
                px, py = zip(*points)
                ax.plot(px, py, marker='o' if len(points) <= 30 else None, label=name)
        ax.set_title(title)
        ax.set_xlabel(x_key or 'row')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        # many metrics: the legend goes beside the axes, where it hides no curve
        ax.legend(fontsize='small', **({'loc': 'upper left', 'bbox_to_anchor': (1.0, 1.0)} if len(names) > 6 else {}))
    return _save_figure(fig, Path(folder) / CURVES_PNG)


def plot_before_after(
    before: Mapping[str, float],
    after: Mapping[str, float],
    folder: str | os.PathLike,
    metrics: Sequence[str] | None = None,
) -> Path:
    """Horizontal bars of each metric before and after fine-tuning, with the values written on them.

    :param metrics: the metrics to show; default: those in both dicts with finite values.
    """
    names = (
        list(metrics)
        if metrics is not None
        else [name for name in _metric_names(before, after) if _finite(before.get(name)) and _finite(after.get(name))]
    )
    missing = [name for name in names if name not in before or name not in after]
    if missing:
        raise ValueError(f'metrics {missing} are missing from before or after; give metrics present in both')
    if not names:
        raise ValueError('no metric is present with a finite value in both before and after: nothing to plot')

    y = np.arange(len(names))
    fig = Figure(figsize=(8.0, 1.2 + 0.45 * len(names)), dpi=100, layout='constrained')
    ax = fig.subplots()
    height = 0.4
    for offset, values, label, color in (
        (-height / 2, before, 'pre-trained', '#9aa5b1'),
        (height / 2, after, 'fine-tuned', '#1f77b4'),
    ):
        bars = ax.barh(y + offset, [values[name] for name in names], height, label=label, color=color)
        ax.bar_label(bars, fmt='%.3f', padding=2, fontsize='x-small')
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_title('Before / after fine-tuning')
    ax.grid(axis='x', alpha=0.3)
    ax.legend(loc='lower right', fontsize='small')
    ax.margins(x=0.15)
    return _save_figure(fig, Path(folder) / BEFORE_AFTER_PNG)


def plot_matches(
    queries: Sequence[ImageLike],
    matches: Sequence[Sequence[ImageLike]],
    relevant: Sequence[Sequence[bool]] | np.ndarray,
    folder: str | os.PathLike,
    tile: int = 96,
) -> Path:
    """A sprite of search results into ``matches.png``: one row per query, the query then its matches, best first.

    The query is framed grey, relevant matches green and the others red; rows may have different numbers of
    matches.

    :param queries: the query images, PIL images or uint8 arrays (H, W) / (H, W, 3|4).
    :param matches: for each query, its match images in rank order.
    :param relevant: for each query, one flag per match.
    :param tile: side of each square tile in pixels (images are fitted inside, keeping their aspect ratio).
    """
    if not queries:
        raise ValueError('no query images: give at least one query with its matches')
    if len(matches) != len(queries) or len(relevant) != len(queries):
        raise ValueError(
            f'got {len(queries)} queries, {len(matches)} match lists and {len(relevant)} relevance lists: '
            'give one match list and one relevance list per query'
        )
    if tile < 16:
        raise ValueError(f'tile must be at least 16 pixels, got {tile}')
    for row, (images, flags) in enumerate(zip(matches, relevant)):
        if len(images) == 0:
            raise ValueError(f'query {row} has no matches: give at least one match per query')
        if len(flags) != len(images):
            raise ValueError(f'query {row} has {len(images)} matches but {len(flags)} relevance flags')

    border, gap, header = max(2, tile // 24), tile // 4, 16
    columns = 1 + max(len(images) for images in matches)
    width = columns * tile + (columns - 1) * border + gap
    height = header + len(queries) * (tile + border) - border
    sprite = Image.new('RGB', (width, height), _WHITE)
    draw = ImageDraw.Draw(sprite)
    draw.text((4, 2), 'query', fill=(0, 0, 0))
    for col in range(1, columns):
        draw.text((_column_x(col, tile, border, gap) + 4, 2), str(col), fill=(0, 0, 0))
    for row, (query, images, flags) in enumerate(zip(queries, matches, relevant)):
        y = header + row * (tile + border)
        sprite.paste(_tile(query, tile, border, _GREY, f'query {row}'), (0, y))
        for col, (image, flag) in enumerate(zip(images, flags), start=1):
            framed = _tile(image, tile, border, _GREEN if flag else _RED, f'match {col} of query {row}')
            sprite.paste(framed, (_column_x(col, tile, border, gap), y))
    return _write_bytes(Path(folder) / MATCHES_PNG, _png_bytes(sprite))


def _metric_names(before: Mapping[str, float], after: Mapping[str, float]) -> list[str]:
    return list(dict.fromkeys([*before, *after]))


def _finite(value: object) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value)


def _is_score(name: str) -> bool:
    try:
        return metric_mode(name) == 'max'
    except ValueError:
        return False


def _fmt(value: float | None) -> str:
    return '—' if value is None else f'{value:.3f}'


def _change(name: str, old: float | None, new: float | None) -> str:
    if not (_finite(old) and _finite(new)):
        return ''
    delta = new - old
    text = f'{delta:+.3f}' + (f' ({delta / abs(old):+.1%})' if old else '')
    try:
        mode = metric_mode(name)
    except ValueError:  # a metric of unknown direction is shown uncoloured
        return text
    if delta == 0:
        return text
    better = (delta > 0) == (mode == 'max')
    return f'[{"green" if better else "red"}]{text}[/]'


def _json_ready(values: Mapping[str, float]) -> dict[str, float | None]:
    return {name: float(value) if _finite(value) else None for name, value in values.items()}


def _column_x(col: int, tile: int, border: int, gap: int) -> int:
    return col * (tile + border) + gap if col else 0


def _tile(image: ImageLike, tile: int, border: int, color: tuple[int, int, int], what: str) -> Image.Image:
    """The image fitted into a white square of side `tile` inside a `border`-wide frame of `color`."""
    picture = _to_pil(image, what)
    inner = tile - 2 * border
    picture.thumbnail((inner, inner))
    if max(picture.size) < inner:  # thumbnail only shrinks; enlarge small images too
        scale = inner / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))))
    framed = Image.new('RGB', (tile, tile), color)
    framed.paste(Image.new('RGB', (inner, inner), _WHITE), (border, border))
    framed.paste(picture, (border + (inner - picture.width) // 2, border + (inner - picture.height) // 2))
    return framed


def _to_pil(image: ImageLike, what: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert('RGB')
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or array.ndim == 3 and array.shape[2] not in (1, 3, 4):
        raise ValueError(
            f'{what} must be a PIL image or a uint8 array (H, W) or (H, W, 1|3|4), got {array.dtype} '
            f'{array.shape}; convert float images with (x * 255).astype(np.uint8)'
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f'{what} is an empty image of shape {array.shape}')
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(array).convert('RGB')


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return buffer.getvalue()


def _save_figure(fig: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png')
    return _write_bytes(path, buffer.getvalue())


def _write_bytes(path: Path, data: bytes) -> Path:
    """Written atomically, so a reader never sees half a report."""
    atomic_write_bytes(path, data)
    logger.info('wrote %s', path)
    return path


# --- a finished run's reports/ -------------------------------------------------------------------------------------


def write_reports(
    folder: Path,
    history: Sequence[Mapping[str, float]],
    metrics_before: dict[str, float] | None = None,
    evaluator: Callable[[Any], Any] | None = None,
    embedder: Any = None,
    inputs: Any = None,
) -> dict[str, float] | None:
    """A finished run's ``reports/`` in ``folder``: its curves from ``history``; with an ``evaluator`` (the per-epoch
    evaluation, run once more on the final model's ``embedder``) and the ``metrics_before`` training, the before/after
    table and bars, and example results (their images from ``inputs``). Returns the metrics after training.

    The evaluator's embeddings also rank the examples' matches, so the evaluation data is embedded once.
    """
    folder.mkdir(exist_ok=True)
    if history:
        plot_curves(history, folder)
    if evaluator is None or metrics_before is None:
        return None
    evaluation = evaluator(embedder)
    if evaluation.query_embeddings is not None and isinstance(evaluator, Evaluator):  # labelled items' matches
        example_results(
            inputs, evaluator.query, evaluator.index, evaluation.query_embeddings, evaluation.index_embeddings, folder
        )
    report = display_metrics(metrics_before, evaluation.metrics, folder)
    plot_before_after(metrics_before, evaluation.metrics, folder)
    logger.info('retrieval metrics before/after fine-tuning:\n%s', report.text)
    return evaluation.metrics


def example_results(
    inputs: Any,
    query_items: Sequence[Item],
    index_items: Sequence[Item] | None,
    q_emb: torch.Tensor,
    i_emb: torch.Tensor,
    folder: Path,
    queries: int = 6,
    k: int = 5,
) -> list[dict[str, Any]]:
    """Finetuner's example results: a few queries (one per label, first seen first) and their top ``k`` by the final
    model's embeddings ``q_emb`` ``(Q, D)`` and ``i_emb`` ``(I, D)``, written to ``examples.json`` (each match with its
    score and whether it shares the query's label); a query never matches itself when queries and index are the same
    set. For inputs that have a preview (images), ``matches.png`` shows them, relevant matches framed green."""
    same = index_items is None
    index_items = query_items if same else index_items
    chosen = list({it.label: row for row, it in enumerate(query_items)}.values())[:queries]
    scores, neighbours = knn(q_emb[chosen], i_emb, min(k + same, len(index_items)))  # (len(chosen), k + same)
    examples, ranked_rows = [], []
    for q, row in enumerate(chosen):
        ranked = [(col, score) for col, score in zip(neighbours[q].tolist(), scores[q].tolist())]
        ranked = [(col, score) for col, score in ranked if not (same and col == row)][:k]
        query = query_items[row]
        matches = [
            {**_shown(index_items[col]), 'score': round(score, 6), 'relevant': index_items[col].label == query.label}
            for col, score in ranked
        ]
        examples.append({'query': _shown(query), 'matches': matches})
        ranked_rows.append([col for col, _ in ranked])
    atomic_write_json(folder / EXAMPLES_JSON, examples)
    picked = [query_items[row] for row in chosen]
    if inputs.preview(inputs.content_of(picked[0]), picked[0].name) is not None:
        previews = [
            [inputs.preview(inputs.content_of(index_items[col]), index_items[col].name) for col in r]
            for r in ranked_rows
        ]
        relevant = [[m['relevant'] for m in example['matches']] for example in examples]
        shown = [inputs.preview(inputs.content_of(it), it.name) for it in picked]
        plot_matches(shown, previews, relevant, folder)
    return examples


def _shown(item: Item) -> dict[str, Any]:
    """How an example names an item: its text, else its name (the uri it came with, or its id); its uri; its label."""
    shown: dict[str, Any] = {'text': item.text} if item.text is not None else {'name': item.name}
    if item.uri is not None and not item.uri.startswith('data:'):
        shown['uri'] = item.uri
    return {**shown, 'label': item.label}
