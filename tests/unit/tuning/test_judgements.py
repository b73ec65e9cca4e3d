"""Relevance data (data/judgements.py): a BEIR folder, a judgements CSV beside its queries and corpus, documents with
relevant_ids; each bad line an error naming its file and line."""

from __future__ import annotations

import csv

import pandas as pd
import pytest

from executor.tuning.data.judgements import is_judgements, read_judgements
from executor.tuning.errors import DataError
from tests.helpers import write_beir

CORPUS = [
    {'_id': 'd1', 'title': 'Ants', 'text': 'Ants live in colonies, "ruled" by a queen.'},
    {'_id': 'd2', 'title': '', 'text': 'Bees make honey,\nand wax.'},
    {'_id': 'd3', 'text': 'Wasps hunt other insects.'},
    {'_id': 'd4', 'title': 'Hornets', 'text': 'Hornets are large wasps.'},
]
QUERIES = [
    {'_id': 'q1', 'text': 'who rules an ant colony?'},
    {'_id': 'q2', 'text': 'what do bees make?'},
    {'_id': 'q3', 'text': 'an unjudged query'},
]
QRELS = [('q1', 'd1', '1'), ('q2', 'd2', '2'), ('q2', 'd3', '0')]


def test_a_beir_folder_reads_as_beir_joins_it(tmp_path):
    folder = write_beir(tmp_path / 'beir', CORPUS, QUERIES, QRELS)
    assert is_judgements(folder)
    judged = read_judgements(folder, 'test')
    texts = {doc.id: doc.text for doc in judged.corpus}
    assert texts == {
        'd1': 'Ants Ants live in colonies, "ruled" by a queen.',
        'd2': 'Bees make honey,\nand wax.',  # an empty title adds nothing
        'd3': 'Wasps hunt other insects.',
        'd4': 'Hornets Hornets are large wasps.',
    }
    relevant = {q.id: q.relevant for q in judged.queries}
    assert relevant == {'q1': {'d1': 1.0}, 'q2': {'d2': 2.0, 'd3': 0.0}, 'q3': {}}
    assert [q.id for q in judged.judged] == ['q1', 'q2']
    pairs = judged.pairs()  # a judgement of 0 is no training pair
    assert [p.columns for p in pairs] == [
        ('who rules an ant colony?', texts['d1']),
        ('what do bees make?', texts['d2']),
    ]
    assert pairs[1].relevant == {'d2': 2.0, 'd3': 0.0}  # the whole judgement goes with the pair (for mining)


def test_a_missing_split_names_the_splits_there(tmp_path):
    folder = write_beir(tmp_path / 'beir', CORPUS, QUERIES, QRELS, split='train')
    with pytest.raises(DataError, match=r"no test\.tsv \(split='test'\); its splits: \['train'\]"):
        read_judgements(folder, 'test')


@pytest.mark.parametrize(
    'change, message',
    [
        ({'qrels': [('q1', 'd9', '1')]}, r"test\.tsv line 2: document id 'd9' is not in the corpus"),
        ({'qrels': [('q1', 'd1', '1'), ('q7', 'd1', '1')]}, r"test\.tsv line 3: query id 'q7' is not in the queries"),
        ({'qrels': [('q1', 'd1', 'high')]}, r"test\.tsv line 2: score 'high' is not a number"),
        ({'qrels': [('q1', 'd1', 'nan')]}, r"test\.tsv line 2: score 'nan' is not a finite"),
        ({'corpus': [*CORPUS, {'_id': 'd1', 'text': 'again'}]}, r"corpus\.jsonl line 5: _id 'd1' again"),
        ({'corpus': [*CORPUS, {'_id': 'd5', 'title': '', 'text': '  '}]}, r'corpus\.jsonl line 5: .*empty text'),
        ({'queries': [{'text': 'no id'}]}, r'queries\.jsonl line 1: no _id'),
        ({'corpus': [*CORPUS, {'_id': 'd6', 'text': 7}]}, r'corpus\.jsonl line 5: "text" and "title" must be strings'),
    ],
)
def test_each_bad_line_is_named(tmp_path, change, message):
    folder = write_beir(tmp_path / 'beir', **{'corpus': CORPUS, 'queries': QUERIES, 'qrels': QRELS, **change})
    with pytest.raises(DataError, match=message):
        read_judgements(folder, 'test')


def test_broken_json_and_bytes_are_named_by_line(tmp_path):
    folder = write_beir(tmp_path / 'beir', CORPUS, QUERIES, QRELS)
    with open(folder / 'corpus.jsonl', 'a', encoding='utf-8') as fh:
        fh.write('{"_id": "d5", "text": \n')
    with pytest.raises(DataError, match=r'corpus\.jsonl line 5: not a JSON object'):
        read_judgements(folder, 'test')
    write_beir(folder, CORPUS, QUERIES, QRELS)
    with open(folder / 'queries.jsonl', 'ab') as fh:
        fh.write(b'{"_id": "q4", "text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r'queries\.jsonl line 4: not UTF-8') as raised:
        read_judgements(folder, 'test')
    assert 'caf' not in str(raised.value)  # never the file's contents


def test_a_large_corpus_streams(tmp_path):
    """50,000 documents, read a line at a time (the reader never loads the file as one JSON value)."""
    corpus = [{'_id': f'd{i}', 'title': f'title {i}', 'text': f'text {i}'} for i in range(50_000)]
    folder = write_beir(tmp_path / 'beir', corpus, QUERIES, [('q1', 'd49999', '1')])
    judged = read_judgements(folder, 'test')
    assert len(judged.corpus) == 50_000 and judged.corpus[-1].text == 'title 49999 text 49999'


@pytest.mark.parametrize('writer', ['csv.writer', 'pandas'])
def test_a_judgements_csv_beside_its_queries_and_corpus(tmp_path, writer):
    """query_id,doc_id,score with queries.csv and corpus.csv beside it, each written by csv and by pandas, with
    quotes, commas and newlines inside fields, far into the file."""
    filler = [{'_id': f'f{i}', 'title': f'filler, "{i}"', 'text': f'line one\nline "two", {i}'} for i in range(3000)]
    corpus = [*filler, *CORPUS]
    tables = {
        'corpus.csv': (['_id', 'title', 'text'], [[d['_id'], d.get('title', ''), d['text']] for d in corpus]),
        'queries.csv': (['_id', 'text'], [[q['_id'], q['text']] for q in QUERIES]),
        'qrels.csv': (['query_id', 'doc_id', 'score'], [list(r) for r in QRELS] + [['q1', 'f2999', '1']]),
    }
    for name, (header, rows) in tables.items():
        if writer == 'pandas':
            pd.DataFrame(rows, columns=header).to_csv(tmp_path / name, index=False)
        else:
            with open(tmp_path / name, 'w', newline='', encoding='utf-8') as fh:
                csv.writer(fh).writerows([header, *rows])
    assert is_judgements(tmp_path / 'qrels.csv')
    judged = read_judgements(tmp_path / 'qrels.csv', 'ignored for a CSV')
    texts = {doc.id: doc.text for doc in judged.corpus}
    assert texts['f2999'] == 'filler, "2999" line one\nline "two", 2999'
    assert texts['d1'] == 'Ants Ants live in colonies, "ruled" by a queen.'
    assert judged.queries[0].relevant == {'d1': 1.0, 'f2999': 1.0}


def test_documents_with_relevant_ids(tmp_path):
    docs = [
        {'id': 'q1', 'text': 'who rules an ant colony?', 'relevant_ids': ['d1']},
        {'id': 'q2', 'text': 'what do bees make?', 'relevant_ids': {'d2': 2, 'd1': 0}},
        {'id': 'd1', 'text': 'Ants live in colonies.'},
        {'id': 'd2', 'text': 'Bees make honey.'},
    ]
    assert is_judgements(docs)
    judged = read_judgements(docs, 'test')
    assert [q.relevant for q in judged.queries] == [{'d1': 1.0}, {'d2': 2.0, 'd1': 0.0}]
    assert [d.id for d in judged.corpus] == ['d1', 'd2']
    with pytest.raises(DataError, match=r"document 'q1': relevant_ids names \['d7'\]"):
        read_judgements([{**docs[0], 'relevant_ids': ['d7']}, *docs[2:]], 'test')
    with pytest.raises(DataError, match=r"relevant_ids\['d2'\] is not a number"):
        read_judgements([{**docs[1], 'relevant_ids': {'d2': 'very'}}, *docs[2:]], 'test')
    assert not is_judgements([{'text': 'a'}, {'text': 'b'}])
