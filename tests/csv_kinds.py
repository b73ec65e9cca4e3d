"""CSV files of every kind this project reads, written as Python's ``csv.writer`` and pandas write them (RFC 4180: a
field holding the delimiter, a quote or a newline is quoted, its quotes doubled), with values that break a reader
that guesses quoting from the file's start: commas, doubled quotes and newlines inside fields, the first quote past
the first 4 KB (issue 29). Shared by the unit tests (the Python API) and the service's tests."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image

Column = Literal['image', 'text', 'label', 'score']
Writer = Literal['csv.writer', 'pandas']
WRITERS: tuple[Writer, ...] = ('csv.writer', 'pandas')

# The first two make STS-B's test line 650 of a scored pair: 'The rule - When in doubt throw it out!,"I always go by
# the rule ""When in doubt, throw it out!",4.0'
TRICKY = (
    'The rule - When in doubt throw it out!',
    'I always go by the rule "When in doubt, throw it out!',
    'She said, "yes, of course", and left.',
    '"Quoted" from its first character',
    'A first line\nand a second, after a newline',
    'Café, "crème brûlée"; tabs\tand pipes | inside',
)
LABELS = ('ants', 'bees, "honey" ones', 'wasps; or | hornets')  # tricky rows' labels, each on two rows
PLAIN_LABELS = ('ants', 'bees', 'wasps')


@dataclass(frozen=True)
class Kind:
    """One kind of CSV file: its header row (``None``: Finetuner's headerless file), what each column holds, and
    the ``csv_options`` it is read with."""

    name: str
    header: tuple[str, ...] | None
    columns: tuple[Column, ...]
    options: dict = field(default_factory=dict)

    def row(self, index: int, tricky: int | None) -> tuple[str, ...]:
        """Row ``index`` of a file: plain values (nothing to quote), or the ``tricky``-th row of tricky values."""
        values = []
        for j, column in enumerate(self.columns):
            if column == 'image':
                plain = f'plain image {index:03d} in column {j} with nothing to quote.png'  # long: few images
                name = plain if tricky is None else f'{index:03d}-{j} ants, "big" ones.png'
                values.append(f'img/{name}')
            elif column == 'text':
                plain = f'plain sentence {index} in column {j} with nothing to quote'
                values.append(plain if tricky is None else TRICKY[(tricky + j) % len(TRICKY)])
            elif column == 'label':
                values.append(PLAIN_LABELS[index % 3] if tricky is None else LABELS[tricky % 3])
            else:
                values.append(f'{index % 6}.0' if tricky is None else f'{4 - tricky * 0.5}')
        return tuple(values)

    def expected(self, rows: list[tuple[str, ...]]) -> list[tuple]:
        """What the items read from ``rows`` hold, as ``held`` gives them."""
        out: list[tuple] = []
        for k, row in enumerate(rows):
            if self.columns == ('image', 'image'):  # Finetuner's image pairs: each pair one class
                out += [(row[0], None, f'pair-{k}'), (row[1], None, f'pair-{k}')]
            elif self.columns[0] == 'image':
                caption = row[1] if self.columns[1] == 'text' else None
                label = row[1] if self.columns[1] == 'label' else None
                out.append((row[0], caption, label))
            elif 'label' in self.columns:
                out.append((None, row[0], row[1]))
            elif 'score' in self.columns:
                out.append((*row[:-1], float(row[-1])))
            else:
                out.append(row)
        return out


KINDS = (
    Kind('uri,label', ('uri', 'label'), ('image', 'label')),
    Kind('text,label', ('text', 'label'), ('text', 'label')),
    Kind('anchor,positive', ('anchor', 'positive'), ('text', 'text')),
    Kind('anchor,positive,negative', ('anchor', 'positive', 'negative'), ('text', 'text', 'text')),
    Kind('sentence1,sentence2,score', ('sentence1', 'sentence2', 'score'), ('text', 'text', 'score')),
    Kind('image,caption', ('image', 'caption'), ('image', 'text')),
    Kind('headerless image,label', None, ('image', 'label'), {'is_labeled': True}),
    Kind('headerless text,label', None, ('text', 'label'), {'is_labeled': True}),
    Kind('headerless text pairs', None, ('text', 'text')),
    Kind('headerless scored pairs', None, ('text', 'text', 'score')),
    Kind('headerless image pairs', None, ('image', 'image')),
)
KIND = {kind.name: kind for kind in KINDS}


def held(item, root: Path) -> tuple:
    """An item's values as ``Kind.expected`` gives them: its sentences (and score), else (image, text, label), the
    image as a path relative to ``root``."""
    if item.columns is not None:
        return item.columns if item.score is None else (*item.columns, item.score)
    uri = None if item.uri is None else os.path.relpath(item.uri, root.resolve())
    return uri, item.text, item.label


def write(path: Path, kind: Kind, rows: list[tuple[str, ...]], writer: Writer, delimiter: str = ',') -> Path:
    if writer == 'pandas':
        frame = pd.DataFrame(rows, columns=list(kind.header) if kind.header else None)
        frame.to_csv(path, sep=delimiter, index=False, header=kind.header is not None)
        return path
    with open(path, 'w', newline='', encoding='utf-8') as fh:
        out = csv.writer(fh, delimiter=delimiter)
        if kind.header:
            out.writerow(kind.header)
        out.writerows(rows)
    return path


def build(
    root: Path,
    kind: Kind,
    writer: Writer,
    quotes: Literal['first', 'late'] = 'late',
    past: int = 4096,
    delimiter: str = ',',
) -> tuple[Path, list[tuple[str, ...]]]:
    """A file of ``kind`` under ``root`` (its images beside it) and the rows written: plain rows until the file
    passes ``past`` characters, and six rows of tricky values after them (``quotes='late'``: the first quote past
    ``past``) or before them (``'first'``)."""
    filler: list[tuple[str, ...]] = []
    written = io.StringIO()
    while written.tell() <= past:
        filler.append(kind.row(len(filler), None))
        csv.writer(written, lineterminator='\n').writerow(filler[-1])  # pandas ends lines with '\\n' only
    tricky = [kind.row(len(filler) + t, t) for t in range(len(TRICKY))]
    rows = filler + tricky if quotes == 'late' else tricky + filler
    images = {value for row in rows for value, column in zip(row, kind.columns) if column == 'image'}
    for i, name in enumerate(sorted(images)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), i % 256, np.uint8)).save(root / name)
    path = write(root / f'{kind.name.replace(",", "-").replace(" ", "-")}.{writer}.csv', kind, rows, writer, delimiter)
    first_quote = path.read_bytes().index(b'"')
    assert first_quote > past if quotes == 'late' else first_quote < 200, first_quote
    return path, rows
