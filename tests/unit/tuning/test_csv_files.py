"""CSV files as csv.writer and pandas write them, read through the Python API (``load_items``, ``plan_run``) for every
kind of file, with a header row and without; the delimiter told from the file, quoting RFC 4180's (issue 29)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from executor.tuning.config import TrainConfig
from executor.tuning.data import DataError, load_items
from executor.tuning.data.finetuner_csv import (
    MAX_COLUMNS,
    MAX_LINE_CHARS,
    SAMPLE_CHARS,
    CSVOptions,
    guess_delimiter,
)
from executor.tuning.plan import plan_run
from tests.csv_kinds import KIND, KINDS, TRICKY, WRITERS, build, held, write


@pytest.mark.parametrize('quotes', ['late', 'first'])
@pytest.mark.parametrize('writer', WRITERS)
@pytest.mark.parametrize('kind', KINDS, ids=lambda kind: kind.name)
def test_every_kind_of_file_reads_as_it_was_written(tmp_path: Path, kind, writer, quotes):
    path, rows = build(tmp_path, kind, writer, quotes)
    items = load_items(path, [tmp_path], CSVOptions(**kind.options) if kind.options else None)
    assert [held(item, tmp_path) for item in items] == kind.expected(rows)


@pytest.mark.parametrize('writer', WRITERS)
def test_the_sts_b_line_reads_as_three_fields(tmp_path: Path, writer):
    """STS-B's test line 650, after 64 KB of rows that hold no quote: more than 'auto' reads to tell the delimiter."""
    path, rows = build(tmp_path, KIND['sentence1,sentence2,score'], writer, past=SAMPLE_CHARS)
    assert (
        b'The rule - When in doubt throw it out!,"I always go by the rule ""When in doubt, throw' in path.read_bytes()
    )
    items = load_items(path)
    first_tricky = len(rows) - len(TRICKY)
    assert items[first_tricky].columns == (TRICKY[0], TRICKY[1]) and items[first_tricky].score == 4.0
    assert items[first_tricky].name == f'{path.name} line {first_tricky + 2}'  # the header is line 1
    assert items[-2].name == f'{path.name} line {first_tricky + 7}'  # the row before it spans two lines


@pytest.mark.parametrize(
    ('kind', 'config'),
    [
        ('uri,label', {'model': 'efficientnet_lite0'}),
        ('text,label', {}),
        ('anchor,positive', {}),
        ('anchor,positive,negative', {}),
        ('sentence1,sentence2,score', {}),
        ('image,caption', {'model': 'efficientnet_lite0', 'text_model': 'all-MiniLM-L6-v2', 'eval_data': None}),
        ('headerless image,label', {'model': 'efficientnet_lite0'}),
        ('headerless text,label', {}),
        ('headerless text pairs', {}),
        ('headerless scored pairs', {}),
        ('headerless image pairs', {'model': 'efficientnet_lite0'}),
    ],
)
@pytest.mark.parametrize('writer', WRITERS)
def test_a_run_plans_on_every_kind_of_file(tmp_path: Path, kind, config, writer):
    """``fit()``'s path: ``plan_run`` reads train_data and eval_data with the run's csv_options."""
    kind = KIND[kind]
    path, rows = build(tmp_path, kind, writer)
    options = {'csv_options': CSVOptions(**kind.options)} if kind.options else {}
    given = {'model': 'all-MiniLM-L6-v2', 'eval_data': str(path), **options, **config}
    plan = plan_run(TrainConfig(train_data=str(path), data_roots=[str(tmp_path)], epochs=1, **given))
    assert len(plan.items) >= len(rows)  # a task may add items (a class per label), never drops a row
    if given['eval_data'] is not None:
        assert [held(item, tmp_path) for item in plan.evaluation[0]] == kind.expected(rows)


@pytest.mark.parametrize('delimiter', ['\t', ';', '|'])
@pytest.mark.parametrize('writer', WRITERS)
@pytest.mark.parametrize('kind', ['sentence1,sentence2,score', 'headerless text,label'])
def test_the_delimiter_is_told_from_the_file(tmp_path: Path, kind, writer, delimiter):
    kind = KIND[kind]
    _, rows = build(tmp_path, kind, writer)
    path = write(tmp_path / 'other.csv', kind, rows, writer, delimiter)
    items = load_items(path, None, CSVOptions(**kind.options) if kind.options else None)
    assert [held(item, tmp_path) for item in items] == kind.expected(rows)


def test_guess_delimiter_reads_quoted_fields_and_leaves_a_cut_row_out():
    assert guess_delimiter('a,"b\tc"\n"d;e",f\n', complete=True) == ','
    assert guess_delimiter('a\t"b,c"\nd\te\n', complete=True) == '\t'
    assert guess_delimiter('a|b\nc|d\ne,f,g', complete=False) == '|'  # the cut last row is not counted
    assert guess_delimiter('one column\nonly\n', complete=True) == ','


def test_quoting_is_rfc_4180_unless_the_options_name_another(tmp_path: Path):
    rows = [('text', 'label'), (TRICKY[1], 'a'), ("it's 'quoted', here", 'b')]
    escaped = tmp_path / 'escaped.csv'
    with open(escaped, 'w', newline='') as fh:
        csv.writer(fh, escapechar='\\', doublequote=False).writerows(rows)
    items = load_items(escaped, None, CSVOptions(escapechar='\\'))
    assert [(i.text, i.label) for i in items] == rows[1:]
    single = tmp_path / 'single.csv'
    with open(single, 'w', newline='') as fh:
        csv.writer(fh, quotechar="'").writerows(rows)
    assert [(i.text, i.label) for i in load_items(single, None, CSVOptions(quotechar="'"))] == rows[1:]
    tabs = tmp_path / 'tabs.csv'
    with open(tabs, 'w', newline='') as fh:
        csv.writer(fh, 'excel-tab').writerows(rows)
    assert [(i.text, i.label) for i in load_items(tabs, None, CSVOptions(dialect='excel-tab'))] == rows[1:]


def test_a_row_the_csv_module_cannot_read_is_named_by_file_and_line(tmp_path: Path):
    path = tmp_path / 'big.csv'
    with open(path, 'w', newline='') as fh:
        csv.writer(fh).writerows([('text', 'label'), ('two\nlines', 'a'), ('x' * (csv.field_size_limit() + 1), 'b')])
    with pytest.raises(DataError, match=r'big.csv line 4: not readable as CSV \(field larger than field limit'):
        load_items(path)


def test_a_bad_row_is_named_by_the_line_it_starts_on(tmp_path: Path):
    path = tmp_path / 'sts.csv'
    with open(path, 'w', newline='') as fh:
        csv.writer(fh).writerows([('sentence1', 'sentence2', 'score'), ('a\nb', 'c', '1'), ('d\ne', 'f', 'high')])
    with pytest.raises(DataError, match=r"sts.csv line 4: score 'high', which is not a number"):
        load_items(path)


def test_an_image_and_a_word_without_a_header_name_both_ways_to_read_them(tmp_path: Path):
    """Finetuner's default is_labeled=False reads two columns as a pair; an image beside a word may be the image's
    label (is_labeled=True) or its caption (a header row image,caption)."""
    (tmp_path / 'ants').mkdir()
    path = tmp_path / 'ants.csv'
    path.write_text('ants/1.jpg,ants\nants/2.jpg,ants\n')
    with pytest.raises(
        DataError,
        match=r"ants.csv line 1: .*; if 'ants' is the image's label, read the file with csv_options=\{'is_labeled': "
        r'True\}; if it is a caption, give the file a header row image,caption',
    ):
        load_items(path, [tmp_path])
    labelled = load_items(path, [tmp_path], CSVOptions(is_labeled=True))
    assert [(Path(i.uri).name, i.label) for i in labelled] == [('1.jpg', 'ants'), ('2.jpg', 'ants')]
    path.write_text('image,caption\n' + path.read_text())
    assert [i.text for i in load_items(path, [tmp_path])] == ['ants', 'ants']


def test_a_bad_byte_names_the_file_and_line_and_never_its_contents(tmp_path: Path):
    """Issue 32: a \\xff in leak.csv answered with a UnicodeDecodeError holding 159 lines of the file."""
    path = tmp_path / 'leak.csv'
    path.write_bytes(b'text,label\n' + b''.join(b'secret-%d,x\n' % i for i in range(5000)) + b'\xff,y\n')
    with pytest.raises(DataError, match=r'leak.csv line 5002: not utf-8 text \(invalid start byte\)') as err:
        load_items(path)
    assert 'secret' not in str(err.value)
    (tmp_path / 'u16.csv').write_bytes('text,label\na,x\n'.encode('utf-16-le'))
    with pytest.raises(DataError, match=r'u16.csv line 1: not utf-16 text \(UTF-16 stream does not start with BOM'):
        load_items(tmp_path / 'u16.csv', None, CSVOptions(encoding='utf-16'))


@pytest.mark.parametrize('encoding', ['rot13', 'uu_codec', 'base64'])
def test_only_text_encodings_are_taken(encoding: str):
    with pytest.raises(ValueError, match=rf"'{encoding}' is not a text encoding"):
        CSVOptions(encoding=encoding)
    assert CSVOptions(encoding='latin-1').encoding == 'latin-1'


def test_rows_and_lines_are_bounded_and_the_error_lists_no_columns(tmp_path: Path):
    (tmp_path / 'columns.csv').write_text(','.join(f'c{i}' for i in range(MAX_COLUMNS + 1)) + '\n1,2\n')
    with pytest.raises(DataError, match=rf'columns.csv line 1: {MAX_COLUMNS + 1} columns, more than the') as err:
        load_items(tmp_path / 'columns.csv')
    assert 'c1000' not in str(err.value)
    (tmp_path / 'line.csv').write_text('text,label\n' + 'a,' * MAX_LINE_CHARS + 'x\n')
    with pytest.raises(DataError, match=rf'line.csv line 2: longer than the {MAX_LINE_CHARS} characters'):
        load_items(tmp_path / 'line.csv')
    (tmp_path / 'field.csv').write_text('text,label\n' + 'a' * 200_000 + ',x\nb,y\n')
    with pytest.raises(DataError, match=r'field.csv line 2: not readable as CSV \(field larger than field limit'):
        load_items(tmp_path / 'field.csv')


def test_a_bom_is_no_column_and_a_column_named_twice_is_refused(tmp_path: Path):
    with open(tmp_path / 'bom.csv', 'w', encoding='utf-8-sig') as fh:
        fh.write('text,label\na,x\nb,y\n')
    assert [(i.text, i.label) for i in load_items(tmp_path / 'bom.csv')] == [('a', 'x'), ('b', 'y')]
    (tmp_path / 'dup.csv').write_text('text,label,text\na,x,q\nb,y,r\n')
    with pytest.raises(DataError, match=r"dup.csv line 1: the header names \['text'\] more than once"):
        load_items(tmp_path / 'dup.csv')


def test_a_fifo_is_not_a_regular_file(tmp_path: Path):
    os.mkfifo(tmp_path / 'fifo.csv')  # opening it to read would block until a writer comes
    with pytest.raises(DataError, match=r"CSV file 'fifo.csv' is not a regular file \(a folder, a FIFO or a device"):
        load_items(tmp_path / 'fifo.csv')
    with pytest.raises(DataError, match=r"CSV file 'missing.csv' does not exist"):
        load_items(tmp_path / 'missing.csv')
