"""Data sources: a CSV file, an image folder, or in-memory items, all read as a list of ``Item``."""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from executor.tuning.data.finetuner_csv import IMAGE_SUFFIXES, CSVOptions, read_headerless, read_rows, with_delimiter
from executor.tuning.errors import DataError, excerpt
from executor.tuning.files import NAME_MAX, PATH_MAX, check_regular_file, too_long

logger = logging.getLogger(__name__)


@dataclass
class Item:
    """One example: exactly one of ``uri`` / ``blob`` / ``tensor`` / ``text`` is the content.

    ``name`` is how errors call it: a document by the ``uri`` it was sent with (what its sender can find), else by its
    id; a CSV row by file and line. A sentence pair or triplet (``anchor,positive[,negative]`` or
    ``sentence1,sentence2,score`` rows) has its sentences in ``columns`` instead, and a ``score`` when scored.
    A judged query (``data/judgements.py``) has ``relevant``: the ids of the documents judged for it, with their grades.
    """

    id: str
    uri: str | None = None
    blob: bytes | None = None
    tensor: np.ndarray | None = None
    text: str | None = None
    label: str | None = None
    name: str = ''
    columns: tuple[str, ...] | None = None
    score: float | None = None
    relevant: dict[str, float] | None = None

    def __post_init__(self) -> None:
        self.name = self.name or f'item {self.id!r}'

    @property
    def content(self) -> Any:
        if self.columns is not None:
            return self.columns
        for value in (self.tensor, self.blob, self.uri):
            if value is not None:
                return value
        return self.text

    @property
    def kind(self) -> str:
        return 'text' if self.tensor is None and self.blob is None and self.uri is None else 'image'


def url_refusal(uri: str) -> str:
    return (
        f'uri {uri!r} is a URL, but this service reads local files only (it never downloads); save the file under '
        'a data root and give its path, or send its bytes as blob'
    )


def check_under_roots(path: str | os.PathLike, roots: Sequence[str | os.PathLike] | None, what: str) -> Path:
    """Resolve ``path`` (symlinks included) and check that it lies under one of ``roots`` (``None``: anywhere).

    With roots, a relative path is looked up under each root in turn (the first where it exists, else the first
    root), never under the server's working folder.
    """
    if '\x00' in str(path):
        raise DataError(f'{what}: the path holds a NUL byte, which no file name has; send the path of a file')
    if too_long(path):
        raise DataError(
            f'{what}: the path {excerpt(str(path))} is longer than a file path can be ({PATH_MAX} bytes, {NAME_MAX} '
            'per name); send the path of a file'
        )
    given = Path(path).expanduser()
    if roots is None:
        return given.resolve()
    if not given.is_absolute() and roots:
        candidates = [Path(root).expanduser() / given for root in roots]
        given = next((c for c in candidates if c.exists()), candidates[0])
    resolved = given.resolve()
    allowed = [Path(r).expanduser().resolve() for r in roots]
    if not any(resolved == r or r in resolved.parents for r in allowed):
        raise DataError(
            f'{what}: {str(path)!r} resolves to {str(resolved)!r}, outside the data roots {[str(r) for r in allowed]}; '
            f'move the data under a data root or start the executor with data_roots including its folder'
        )
    return resolved


PAIR_COLUMNS = (('anchor', 'positive', 'negative'), ('sentence1', 'sentence2'))
HEADER_WORDS = {'uri', 'text', 'label', 'anchor', 'positive', 'negative', 'sentence1', 'sentence2', 'score'}
HEADER_WORDS |= {'image', 'caption'}
ROW_COLUMNS = {'uri', 'text', 'image', 'caption'}  # the columns of single items and captioned images (and label)
CSV_LAYOUTS = (
    'uri,label | text,label | image,caption (or uri,text) | anchor,positive[,negative] | '
    'anchor,positive,negative_1..negative_n | sentence1,sentence2,score'
)


def from_csv(
    path: str | os.PathLike, roots: Sequence[str | os.PathLike] | None = None, options: CSVOptions | None = None
) -> list[Item]:
    """``uri,label`` or ``text,label`` (``label`` optional), ``image,caption`` or ``uri,text`` (captioned images, an
    image on as many rows as it has captions), ``anchor,positive[,negative]`` (sentence pairs or triplets),
    ``anchor,positive,negative_1..negative_n`` (n-tuples, as sentence-transformers' hard-negative mining writes them),
    or ``sentence1,sentence2,score`` (scored pairs, any score range), when a header row names the columns.
    A file whose first row names none of these is read as Finetuner read its CSVs, without a header, by ``options``
    (``finetuner_csv``). ``options`` also sample the rows (``size``, ``sampling_rate``) and set the dialect and
    encoding; by default the delimiter is told from the file and quoting is RFC 4180's (``finetuner_csv.read_rows``).
    Relative uris are relative to the file."""
    path = check_under_roots(path, roots, 'train/eval data')
    check_regular_file(path, 'CSV file')
    given = options
    options = with_delimiter(path, options or CSVOptions())
    first = next(read_rows(path, options.model_copy(update={'size': 1, 'sampling_rate': None})), (1, []))[1]
    columns = {c.strip() for c in first}
    if not _is_header(columns):
        if given is None and (columns & HEADER_WORDS or len(first) not in (2, 3)):
            raise DataError(
                f'{path.name!r}: the header must name the columns of one of {CSV_LAYOUTS}; found '
                f'{excerpt(sorted(columns))}. '
                'A file without a header row is read as Finetuner read it: 2 columns (item,label with '
                "csv_options={'is_labeled': True}, else a pair) or 3 (a scored pair)"
            )

        def make_uri(value: str, name: str) -> str:
            return _local_uri(path, value, roots, name)

        return read_headerless(path, options, make_uri, Item)
    header = [c.strip() for c in first]
    check_header(header, path)
    rows = [dict(zip(header, cells)) | {'__line__': line} for line, cells in read_rows(path, options, True)]
    if {'anchor', 'positive'} <= columns or {'sentence1', 'sentence2'} <= columns:
        items = _pairs(rows, columns, path)
    else:
        items = _rows(rows, columns, path, roots)
    if not items:
        raise DataError(f'{str(path)!r} has a header but no rows')
    return items


def check_header(header: list[str], path: Path) -> None:
    """Refuse a header naming a column twice: which of the two a row's value comes from would be a guess."""
    twice = sorted(name for name, count in Counter(header).items() if count > 1)
    if twice:
        raise DataError(
            f'{path.name} line 1: the header names {excerpt(twice)} more than once; give each column one name'
        )


def _is_header(columns: set[str]) -> bool:
    return (
        {'anchor', 'positive'} <= columns
        or {'sentence1', 'sentence2'} <= columns
        or (bool(columns & ROW_COLUMNS) and columns <= ROW_COLUMNS | {'label'})
    )


def _local_uri(path: Path, uri: str, roots: Sequence | None, name: str) -> str:
    if '://' in uri:
        raise DataError(f'{name}: {url_refusal(uri)}')
    return str(check_under_roots(path.parent / uri, roots, name))


def _rows(rows: list[dict], columns: set[str], path: Path, roots: Sequence | None) -> list[Item]:
    image_column = next((c for c in ('uri', 'image') if c in columns), None)
    text_column = next((c for c in ('text', 'caption') if c in columns), None)
    items = []
    for row in rows:
        name = f'{path.name} line {row["__line__"]}'
        label = (row.get('label') or '').strip() or None
        text = (row.get(text_column) or '').strip() if text_column else None
        if image_column is not None:
            uri = (row.get(image_column) or '').strip()
            if not uri:
                raise DataError(f'{name}: empty {image_column}')
            if text_column is not None and not text:
                raise DataError(f'{name}: empty {text_column}; every image,caption row needs its caption')
            uri = _local_uri(path, uri, roots, name)
            items.append(Item(id=name, uri=uri, text=text or None, label=label, name=name))
        else:
            if not text:
                raise DataError(f'{name}: empty text')
            items.append(Item(id=name, text=text, label=label, name=name))
    return items


def _pairs(rows: list[dict], columns: set[str], path: Path) -> list[Item]:
    """Sentence pairs, triplets or scored pairs: every sentence non-empty, every score a number."""
    names = next(c for c in PAIR_COLUMNS if c[0] in columns)
    names = tuple(c for c in names if c in columns) + _numbered_negatives(columns, path)
    scored = 'score' in columns
    items = []
    for row in rows:
        name = f'{path.name} line {row["__line__"]}'
        texts = tuple((row.get(c) or '').strip() for c in names)
        empty = [c for c, t in zip(names, texts) if not t]
        if empty:
            raise DataError(f'{name}: empty {empty[0]}; every row needs a sentence in each of {", ".join(names)}')
        score = None
        if scored:
            raw = (row.get('score') or '').strip()
            try:
                score = float(raw)
            except ValueError:
                what = 'no score' if not raw else f'score {raw!r}, which is not a number'
                raise DataError(f'{name}: {what}; give each row a numeric score (any range)') from None
            if score != score or score in (float('inf'), float('-inf')):
                raise DataError(f'{name}: score {raw!r} is not a finite number')
        items.append(Item(id=name, name=name, columns=texts, score=score))
    return items


def _numbered_negatives(columns: set[str], path: Path) -> tuple[str, ...]:
    """An n-tuple's ``negative_1..negative_n`` columns in order (sentence-transformers' n-tuple names), after checking
    they are numbered from 1 without a gap and not mixed with a plain ``negative``."""
    numbered = sorted((c for c in columns if re.fullmatch(r'negative_\d+', c)), key=lambda c: int(c.split('_')[1]))
    if not numbered:
        return ()
    expected = [f'negative_{i}' for i in range(1, len(numbered) + 1)]
    if numbered != expected or 'negative' in columns or 'anchor' not in columns:
        raise DataError(
            f'{str(path)!r}: an n-tuple CSV has the columns anchor,positive,negative_1,...,negative_n (numbered '
            f'from 1, no gap, no plain negative column); found {", ".join(sorted(columns))}'
        )
    return tuple(numbered)


def from_folder(root: str | os.PathLike, roots: Sequence[str | os.PathLike] | None = None) -> list[Item]:
    """``root/<label>/*.jpg`` (labelled), or image files directly in ``root`` (unlabelled)."""
    root = check_under_roots(root, roots, 'train/eval data')
    if not root.is_dir():
        raise DataError(f'image folder {str(root)!r} does not exist')

    def item(path: Path, label: str | None) -> Item:
        # every file, not only the folder: a class folder or an image may be a link to anywhere
        name = f'{root.name}/{path.relative_to(root)}'
        return Item(
            id=str(path.relative_to(root)), uri=str(check_under_roots(path, roots, name)), label=label, name=name
        )

    items = [item(p, None) for p in sorted(root.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        items += [
            item(p, class_dir.name)
            for p in sorted(class_dir.rglob('*'))
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        ]
    if not items:
        raise DataError(
            f'{str(root)!r} holds no images ({", ".join(sorted(IMAGE_SUFFIXES))}) directly or in class folders'
        )
    return items


def from_records(records: Iterable[Any], roots: Sequence[str | os.PathLike] | None = None) -> list[Item]:
    """Items from dicts or objects with ``uri`` / ``blob`` / ``tensor`` / ``text`` / ``label`` (and ``id``)."""
    items = []
    for i, rec in enumerate(records):
        get = rec.get if isinstance(rec, dict) else (lambda k, r=rec: getattr(r, k, None))
        ident = str(get('id') or i)
        uri, blob, tensor, text = get('uri'), get('blob'), get('tensor'), get('text')
        shown = str(uri) if uri and str(uri).strip() and not str(uri).startswith('data:') else ident  # as sent
        name = f'document {shown!r}'
        if uri is not None and '://' in str(uri) and blob is None and tensor is None:
            raise DataError(f'{name}: {url_refusal(str(uri))}')
        if uri is not None and '://' not in str(uri) and not str(uri).startswith('data:'):
            uri = str(check_under_roots(uri, roots, name))
        if isinstance(text, str) and not text.strip() and uri is None and blob is None and tensor is None:
            raise DataError(f'{name}: text is empty; send non-empty text or an image')
        if all(v is None for v in (uri, blob, tensor, text)):
            raise DataError(f'{name}: has no content; set one of uri, blob, tensor or text')
        label = get('label')
        relevant = get('relevant_ids')
        items.append(
            Item(
                id=ident,
                uri=uri,
                blob=blob,
                tensor=None if tensor is None else np.asarray(tensor),
                text=text,
                label=None if label in (None, '') else str(label),
                name=name,
                relevant=None if relevant is None else relevant_grades(relevant, name),
            )
        )
    return items


def relevant_grades(relevant: Any, name: str) -> dict[str, float]:
    """A judged query's ``relevant_ids``: a list of document ids (each relevant, grade 1), or ids -> grades."""
    if isinstance(relevant, dict):
        grades = {}
        for key, value in relevant.items():
            try:
                grades[str(key)] = float(value)
            except (TypeError, ValueError):
                raise DataError(
                    f'{name}: relevant_ids[{str(key)[:50]!r}] is not a number; a grade is 0, 1, 2...'
                ) from None
            if not np.isfinite(grades[str(key)]):
                raise DataError(f'{name}: relevant_ids[{str(key)[:50]!r}] is not a finite grade')
        return grades
    if isinstance(relevant, (list, tuple)) and all(isinstance(k, (str, int)) for k in relevant):
        return {str(k): 1.0 for k in relevant}
    raise DataError(
        f'{name}: relevant_ids must be a list of document ids or a dict of id -> grade, not {type(relevant).__name__}'
    )


def load_items(
    source: Any, roots: Sequence[str | os.PathLike] | None = None, csv_options: CSVOptions | None = None
) -> list[Item]:
    """A CSV file (``.csv``, or any file: Finetuner read every file as CSV), a folder path, or a sequence of
    records/``Item`` -> items. ``csv_options`` say how a CSV file is read (``finetuner_csv.CSVOptions``)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.suffix.lower() == '.csv' or _is_file_under(path, roots):
            return from_csv(path, roots, csv_options)
        return from_folder(path, roots)
    if isinstance(source, Sequence) and source and all(isinstance(s, Item) for s in source):
        return list(source)
    if isinstance(source, Sequence):
        return from_records(source, roots)
    raise DataError(f'data must be a CSV path, an image folder or a list of documents; got {type(source).__name__}')


def _is_file_under(path: Path, roots: Sequence[str | os.PathLike] | None) -> bool:
    try:
        return check_under_roots(path, roots, 'train/eval data').is_file()
    except DataError:
        return False
