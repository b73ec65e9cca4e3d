"""Finetuner's CSV files: no header row, read by ``CSVOptions`` (``is_labeled``, ``dialect``, ``size``, ...).

Finetuner read a CSV as rows of data, never a header: two columns are ``item,label`` with ``is_labeled=True``, else a
pair of items that belong together; three columns are a pair and its similarity score. Whether a column holds
images or text is told here by its values (a path with an image suffix is an image), where Finetuner asked the
model's task. Image pairs become labelled images, each pair one class, as Finetuner made them (an item seen in an
earlier pair keeps that pair's label); sentence pairs are this project's ``anchor,positive`` pairs.

Every CSV file, with a header row or without, is read here (``read_rows``). ``dialect='auto'`` tells only the
delimiter from the file; quoting is RFC 4180's, as Python's ``csv.writer``, pandas and spreadsheets write it (a field
holding the delimiter, a quote or a newline is quoted, a quote inside it doubled). ``csv.Sniffer`` guessed quoting
too, from the first 1024 bytes: where they held no quoted field it chose ``doublequote=False``, and a later ``""``
split its row (issue 29).
"""

from __future__ import annotations

import codecs
import csv
import io
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from executor.tuning.errors import DataError, excerpt
from executor.tuning.files import check_regular_file

IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff'}
DELIMITERS = ',\t;|'  # the delimiters 'auto' tells apart
SAMPLE_CHARS = 64 * 1024  # how much of a file 'auto' reads to tell them apart
SAMPLE_SEED = 0  # Finetuner sampled rows unseeded; a fixed seed makes a run read the same rows every time
# The widest row and the longest line a CSV file may have: the widest layout has 3 columns (Finetuner's, 2-3), and a
# header of 10^6 columns stalled the service for 43 s; a field is bounded by the csv module's 131072 characters.
MAX_COLUMNS = 1024
MAX_LINE_CHARS = 2**20


class CSVOptions(BaseModel):
    """Finetuner's ``CSVOptions``, field for field (plus ``delimiter``): how a CSV file of training or evaluation
    data is read."""

    model_config = ConfigDict(extra='forbid')

    size: Optional[int] = Field(None, ge=1, description='read at most this many rows (after sampling)')
    sampling_rate: Optional[float] = Field(
        None, ge=0, le=1, description='keep each row with this probability (seeded: the same rows every time)'
    )
    dialect: str = Field(
        'auto', description="'auto' (the delimiter told from the file, quoting RFC 4180's) or a csv module dialect name"
    )
    delimiter: Optional[str] = Field(None, min_length=1, max_length=1, description="overrides the dialect's")
    quotechar: Optional[str] = Field(None, min_length=1, max_length=1, description="overrides the dialect's ('\"')")
    escapechar: Optional[str] = Field(None, min_length=1, max_length=1, description='e.g. a backslash; none by default')
    encoding: str = 'utf-8'
    is_labeled: bool = Field(False, description='two columns are item,label (True) or a pair of items (False)')
    convert_to_blob: bool = Field(True, description='accepted; images are read from their files either way')
    create_point_clouds: bool = Field(True, description='accepted; only 3D meshes used it, which are not trained')
    point_cloud_size: int = Field(2048, ge=1, description='accepted; only 3D meshes used it')

    @field_validator('dialect')
    @classmethod
    def _known_dialect(cls, value: str) -> str:
        if value != 'auto' and value not in csv.list_dialects():
            raise ValueError(f"unknown dialect {value!r}; use 'auto' or one of {csv.list_dialects()}")
        return value

    @field_validator('encoding')
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        import codecs

        try:
            codec = codecs.lookup(value)
        except LookupError:
            raise ValueError(f'unknown encoding {excerpt(value)}; use e.g. utf-8 or latin-1') from None
        # rot13, uu_codec, base64...: codecs that turn bytes into bytes or text into text, no text encodings
        if not getattr(codec, '_is_text_encoding', True):
            raise ValueError(f'{value!r} is not a text encoding; use e.g. utf-8, utf-16 or latin-1')
        return value


def _encoding(options: CSVOptions) -> str:
    """The encoding a file is opened with: UTF-8's a byte order mark may start (Excel writes one), as BEIR's readers
    and pandas take it."""
    return 'utf-8-sig' if codecs.lookup(options.encoding).name == 'utf-8' else options.encoding


@contextmanager
def open_csv(path: Path, options: CSVOptions) -> Iterator[IO[str]]:
    """``path`` opened as ``options`` say (a regular file only), its decode errors as ``DataError`` naming the file
    and the line, never the bytes."""
    check_regular_file(path, 'CSV file')
    encoding = _encoding(options)
    try:
        with open(path, newline='', encoding=encoding) as fh:
            yield fh
    except UnicodeError as error:
        line = _bad_line(path, encoding)
        reason = getattr(error, 'reason', None) or str(error)
        raise DataError(
            f'{path.name} line {line}: not {options.encoding} text ({reason}); save the file as {options.encoding}, '
            "or give its encoding in csv_options={'encoding': ...}"
        ) from None


def _bad_line(path: Path, encoding: str) -> int:
    """The line of the first byte of ``path`` that ``encoding`` cannot decode (decoded until there, no further)."""
    decoder = codecs.getincrementaldecoder(encoding)()
    newlines = 0
    with open(path, 'rb') as fh:
        for raw in fh:
            try:
                newlines += decoder.decode(raw).count('\n')
            except UnicodeError:
                break
    return newlines + 1


def _lines(fh: IO[str], path: Path) -> Iterator[str]:
    """The lines of ``fh``, each at most ``MAX_LINE_CHARS`` long (read no further than that)."""
    line = 1
    while text := fh.readline(MAX_LINE_CHARS + 1):
        if len(text) > MAX_LINE_CHARS and not text.endswith('\n'):
            raise DataError(
                f'{path.name} line {line}: longer than the {MAX_LINE_CHARS} characters a line may have; split it, '
                'or give long texts and images as files'
            )
        line += 1
        yield text


def with_delimiter(path: Path, options: CSVOptions) -> CSVOptions:
    """``options`` with the delimiter decided: ``dialect='auto'`` tells it from the file (``guess_delimiter``), once,
    for every later read of the file."""
    if options.dialect != 'auto' or options.delimiter is not None:
        return options
    with open_csv(path, options) as fh:
        sample = fh.read(SAMPLE_CHARS)
        complete = not fh.read(1)
    return options.model_copy(update={'delimiter': guess_delimiter(sample, complete, _fmtparams(options))})


def guess_delimiter(sample: str, complete: bool, quoting: dict[str, str] | None = None) -> str:
    """The one of ``DELIMITERS`` that splits the most rows of ``sample`` (read with RFC 4180 quoting, or ``quoting``)
    into the same number of columns, two or more; ``,`` where none does, and where two tie. The last row of an
    incomplete sample is left out, as it may be cut short."""
    best, best_share = ',', 0.0
    for delimiter in DELIMITERS:
        try:
            rows = [r for r in csv.reader(io.StringIO(sample), 'excel', delimiter=delimiter, **(quoting or {})) if r]
        except csv.Error:
            continue
        rows = rows if complete else rows[:-1]
        width, count = Counter(len(r) for r in rows).most_common(1)[0] if rows else (1, 0)
        share = count / len(rows) if width > 1 else 0.0
        if share > best_share:
            best, best_share = delimiter, share
    return best


def _fmtparams(options: CSVOptions) -> dict[str, str]:
    """What ``options`` set over their dialect's: ``csv.reader``'s keyword arguments."""
    named = {'delimiter': options.delimiter, 'quotechar': options.quotechar, 'escapechar': options.escapechar}
    return {k: v for k, v in named.items() if v is not None}


def read_rows(path: Path, options: CSVOptions, skip_header: bool = False) -> Iterator[tuple[int, list[str]]]:
    """``(line, cells)`` of the rows ``options`` keeps (its dialect, ``sampling_rate``, then ``size``), the first
    row left out with ``skip_header``. ``line`` is the line a row starts on (a quoted field may hold newlines)."""
    options = with_delimiter(path, options)
    dialect = 'excel' if options.dialect == 'auto' else options.dialect  # 'excel' is RFC 4180's quoting
    with open_csv(path, options) as fh:
        reader = csv.reader(_lines(fh, path), dialect, **_fmtparams(options))
        rng = random.Random(SAMPLE_SEED)
        kept, line = 0, 1
        try:
            for cells in reader:
                start, line = line, reader.line_num + 1
                if len(cells) > MAX_COLUMNS:
                    raise DataError(
                        f'{path.name} line {start}: {len(cells)} columns, more than the {MAX_COLUMNS} a row may have '
                        '(the layouts take 2 or 3); check the delimiter (csv_options delimiter) and the file'
                    )
                if skip_header and start == 1:
                    continue
                if options.size is not None and kept >= options.size:
                    return
                if not cells or (options.sampling_rate is not None and rng.random() >= options.sampling_rate):
                    continue
                kept += 1
                yield start, cells
        except csv.Error as error:
            raise DataError(f'{path.name} line {line}: not readable as CSV ({error})') from None


def is_image_path(value: str) -> bool:
    return Path(value).suffix.lower() in IMAGE_SUFFIXES


Kind = Literal['image', 'text']


def read_headerless(path: Path, options: CSVOptions, make_uri, Item) -> list:
    """The items (instances of ``Item``, ``sources.Item``) of a headerless Finetuner CSV. ``make_uri(value, name)``
    resolves an image path (relative to the file, under the data roots)."""
    rows = list(read_rows(path, options))
    if not rows:
        raise DataError(f'{str(path)!r} has no rows')
    width = len(rows[0][1])
    allowed = (2,) if options.is_labeled else (2, 3)
    layout = 'item,label (is_labeled=True)' if options.is_labeled else 'a pair item,item or item,item,score'
    kinds: list[Kind] | None = None
    items: list[Item] = []
    labels: dict[str, str] = {}
    for line, cells in rows:
        name = f'{path.name} line {line}'
        cells = [c.strip() for c in cells]
        if len(cells) != width or width not in allowed:
            raise DataError(
                f'{name}: {len(cells)} columns; a CSV without a header row is read as Finetuner read it, every row '
                f'{layout}; give each row {" or ".join(map(str, allowed))} columns, or a header row naming the '
                'columns (uri,label | text,label | anchor,positive | sentence1,sentence2,score)'
            )
        empty = [i + 1 for i, c in enumerate(cells) if not c]
        if empty:
            raise DataError(f'{name}: column {empty[0]} is empty; every row needs a value in each of its {width}')
        data = cells[:1] if options.is_labeled else cells[:2]
        row_kinds: list[Kind] = ['image' if is_image_path(c) else 'text' for c in data]
        if kinds is None:
            kinds = row_kinds
            if 'image' in kinds and 'text' in kinds:
                fixes = 'give the file a header row image,caption'
                if width == 2:  # Finetuner's is_labeled=False reads two columns as a pair of items
                    fixes = (
                        f"if {data[1]!r} is the image's label, read the file with csv_options={{'is_labeled': True}}; "
                        f'if it is a caption, {fixes}'
                    )
                raise DataError(
                    f'{name}: an image and a text in one row make a text-to-image (CLIP) pair, which a headerless '
                    f'file does not give here; {fixes}'
                )
            if width == 3 and 'image' in kinds:
                raise DataError(f'{name}: scored pairs (3 columns) must be sentences, got an image path')
        elif row_kinds != kinds:
            shown = ', '.join(f'{c!r} ({k})' for c, k in zip(data, row_kinds))
            raise DataError(
                f'{name}: {shown}, while line {rows[0][0]} has {", ".join(kinds)}: every row must hold the same '
                'kinds (an image path ends in an image suffix); if the first line is a header, it must name the '
                'columns of uri,label | text,label | anchor,positive | sentence1,sentence2,score'
            )
        if options.is_labeled:
            items.append(_item(Item, name, data[0], kinds[0], cells[1], make_uri))
        elif width == 3:
            items.append(Item(id=name, name=name, columns=tuple(data), score=_score(name, cells[2])))
        elif kinds[0] == 'text':
            items.append(Item(id=name, name=name, columns=tuple(data)))
        else:
            items += _image_pair(Item, name, data, labels, make_uri)
    return items


def _item(item_cls, name: str, value: str, kind: Kind, label: str | None, make_uri):
    if kind == 'image':
        return item_cls(id=name, uri=make_uri(value, name), label=label, name=name)
    return item_cls(id=name, text=value, label=label, name=name)


def _image_pair(item_cls, name: str, pair: Sequence[str], labels: dict[str, str], make_uri) -> list:
    """Finetuner's pair rule: both images get a new label, unless one was seen before: then the unseen one joins
    the seen one's label; a pair of two seen images adds nothing."""
    first, second = pair
    if first in labels and second in labels:
        return []
    if first in labels or second in labels:
        seen, new = (first, second) if first in labels else (second, first)
        labels[new] = labels[seen]
        return [_item(item_cls, f'{name} ({new})', new, 'image', labels[new], make_uri)]
    labels[first] = labels[second] = f'pair-{len(set(labels.values()))}'
    return [_item(item_cls, f'{name} ({value})', value, 'image', labels[value], make_uri) for value in pair]


def _score(name: str, raw: str) -> float:
    try:
        score = float(raw)
    except ValueError:
        raise DataError(f'{name}: score {raw!r} is not a number; a scored pair has its score third') from None
    if score != score or score in (float('inf'), float('-inf')):
        raise DataError(f'{name}: score {raw!r} is not a finite number')
    return score
