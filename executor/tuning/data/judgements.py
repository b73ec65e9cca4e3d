"""Relevance judgements: a corpus, queries, and which documents are relevant to which query (qrels), as BEIR and
MTEB measure search.

Three ways to give them:

- a BEIR folder: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``) and
  ``qrels/<split>.tsv`` (a header ``query-id corpus-id score``, then one judgement a line);
- a judgements CSV (``query_id,doc_id,score``; ``score`` optional, 1 when left out) with ``queries`` and ``corpus``
  files beside it (``.jsonl`` as BEIR's, or ``.csv`` with ``_id`` or ``id``, ``text`` and an optional ``title``);
- documents: a query carries ``relevant_ids`` (a list of ids, or ids -> grades), every other document is the corpus.

A document's text is ``title + ' ' + text``, as BEIR and sentence-transformers join them. A score > 0 is relevant,
graded where > 1; a 0 is judged not relevant. Files are read a line at a time (a large corpus is never one JSON load),
and every bad line is an error naming its file and line.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from executor.tuning.data.finetuner_csv import CSVOptions, read_rows
from executor.tuning.data.sources import Item, check_header, check_under_roots, from_records
from executor.tuning.errors import DataError

QRELS_HEADER = ('query-id', 'corpus-id', 'score')
CSV_HEADER = ('query_id', 'doc_id', 'score')
MAX_GRADE = 1e6  # a relevance grade is a small number (BEIR's are 0-2); a huge one is a mistake in the file


@dataclass
class Judgements:
    """Queries (each ``Item.relevant``: doc id -> grade, ``{}`` where the split judges none of its documents) and the
    corpus they search (``Item.id``: the doc id)."""

    queries: list[Item]
    corpus: list[Item]
    source: str = ''

    @property
    def judged(self) -> list[Item]:
        return [query for query in self.queries if query.relevant]

    def pairs(self) -> list[Item]:
        """(query, relevant document) pairs for training, one per judgement with a score > 0; each pair carries its
        query's whole judgement (``relevant``) so that no judged positive is ever mined as its negative."""
        texts = {doc.id: doc.text for doc in self.corpus}
        pairs = []
        for query in self.queries:
            for doc_id, grade in query.relevant.items():
                if grade > 0:
                    pairs.append(
                        Item(
                            id=f'{query.id}->{doc_id}',
                            columns=(query.text, texts[doc_id]),
                            relevant=dict(query.relevant),
                            name=f'{self.source} query {query.id!r} and document {doc_id!r}',
                        )
                    )
        if not pairs:
            raise DataError(
                f'{self.source}: no judgement has a score > 0, so there is no relevant document to train on'
            )
        return pairs


def is_judgements(source: Any, roots: Sequence[str | os.PathLike] | None = None) -> bool:
    """Whether ``source`` is relevance data: a BEIR folder, a judgements CSV, or documents carrying ``relevant_ids``."""
    if isinstance(source, (str, os.PathLike)):
        try:
            path = check_under_roots(source, roots, 'data')
        except DataError:
            return False
        if path.is_dir():
            return (path / 'qrels').is_dir() and _find(path, 'corpus') is not None
        return path.is_file() and path.suffix.lower() in ('.csv', '.tsv') and _judgements_header(path)
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        return any(
            (record.relevant if isinstance(record, Item) else _get(record, 'relevant_ids')) is not None
            for record in source
        )
    return False


def read_judgements(
    source: Any, split: str, roots: Sequence[str | os.PathLike] | None = None, csv_options: CSVOptions | None = None
) -> Judgements:
    """The judgements of ``source`` (see the module): a BEIR folder's ``qrels/<split>.tsv``, a judgements CSV with
    its queries and corpus beside it, or documents."""
    if not isinstance(source, (str, os.PathLike)):
        return from_documents(source, roots)
    path = check_under_roots(source, roots, 'relevance data')
    if path.is_dir():
        qrels = path / 'qrels' / f'{split}.tsv'
        if not qrels.is_file():
            found = sorted(p.stem for p in (path / 'qrels').glob('*.tsv'))
            raise DataError(
                f'{path.name}/qrels has no {split}.tsv (split={split!r}); its splits: {found or "none"}. Set split to '
                'one of them'
            )
        folder, delimiter = path, '\t'
    else:
        qrels, folder, delimiter = path, path.parent, None
    corpus_file, queries_file = _find(folder, 'corpus'), _find(folder, 'queries')
    for what, found in (('corpus', corpus_file), ('queries', queries_file)):
        if found is None:
            raise DataError(
                f'{folder.name}/ has no {what}.jsonl (or {what}.csv) beside {qrels.name}; relevance data needs the '
                f'{what} file next to its judgements'
            )
    for file in (corpus_file, queries_file):
        check_under_roots(file, roots, 'relevance data')
    corpus = list(read_documents(corpus_file, 'corpus'))
    by_id = {doc.id: doc for doc in corpus}
    queries = {query.id: query for query in read_documents(queries_file, 'queries')}
    judged = read_qrels(qrels, queries, by_id, delimiter, csv_options)
    for query in queries.values():
        query.relevant = judged.get(query.id, {})  # {}: not judged in this split (counted, never measured)
    return Judgements(list(queries.values()), corpus, source=f'{folder.name}/{qrels.name}')


def read_documents(path: Path, what: str) -> Iterator[Item]:
    """The documents of a corpus or queries file, a line (or row) at a time: ``_id`` (or ``id``), ``text`` and an
    optional ``title`` (joined ``title + ' ' + text``); a duplicate ``_id`` or an empty text is an error."""
    seen: set[str] = set()
    rows = _json_lines(path) if path.suffix.lower() == '.jsonl' else _csv_records(path)
    for line, record in rows:
        where = f'{path.name} line {line}'
        ident = record.get('_id', record.get('id'))
        if ident is None or str(ident).strip() == '':
            raise DataError(f'{where}: no _id; every {what} line needs an "_id" and a "text"')
        ident = str(ident)
        if ident in seen:
            raise DataError(f'{where}: _id {ident!r} again; each {what} id must be unique')
        seen.add(ident)
        title, text = record.get('title') or '', record.get('text')
        if not isinstance(text, str) or not isinstance(title, str):
            raise DataError(f'{where}: "text" and "title" must be strings')
        joined = f'{title} {text}'.strip()
        if not joined:
            raise DataError(f'{where}: {what} {ident!r} has an empty text')
        yield Item(id=ident, text=joined, name=f'{path.name} {what[:-1] if what == "queries" else what} {ident!r}')


def read_qrels(
    path: Path,
    queries: dict[str, Item],
    corpus: dict[str, Item],
    delimiter: str | None = None,
    csv_options: CSVOptions | None = None,
) -> dict[str, dict[str, float]]:
    """query id -> {doc id: grade} of a qrels TSV (or judgements CSV); every id must be in the queries and corpus."""
    options = (csv_options or CSVOptions()).model_copy(update={'size': None, 'sampling_rate': None})
    if delimiter is not None:
        options = options.model_copy(update={'delimiter': delimiter})
    judged: dict[str, dict[str, float]] = {}
    rows = read_rows(path, options)
    header = next(rows, None)
    if header is None:
        raise DataError(f'{path.name} is empty; a qrels file starts with the header "query-id corpus-id score"')
    names = [cell.strip().lower() for cell in header[1]]
    if tuple(names[:2]) not in (QRELS_HEADER[:2], CSV_HEADER[:2]):
        raise DataError(
            f'{path.name} line 1: the header must be "query-id corpus-id score" (or query_id,doc_id,score); found '
            f'{names[:3]}'
        )
    scored = len(names) > 2
    for line, cells in rows:
        where = f'{path.name} line {line}'
        if len(cells) < (3 if scored else 2):
            raise DataError(f'{where}: {len(cells)} field(s); a judgement is query id, document id and score')
        query_id, doc_id = cells[0].strip(), cells[1].strip()
        grade = _grade(cells[2].strip(), where) if scored else 1.0
        if query_id not in queries:
            raise DataError(f'{where}: query id {query_id!r} is not in the queries file')
        if doc_id not in corpus:
            raise DataError(f'{where}: document id {doc_id!r} is not in the corpus file')
        judged.setdefault(query_id, {})[doc_id] = grade
    if not judged:
        raise DataError(f'{path.name} has a header but no judgements')
    return judged


def from_documents(records: Sequence[Any], roots: Sequence[str | os.PathLike] | None = None) -> Judgements:
    """Queries (documents with ``relevant_ids``: a list of ids, or ids -> grades) and the corpus (the others)."""
    items = list(records) if all(isinstance(r, Item) for r in records) else from_records(records, roots)
    queries = [it for it in items if it.relevant is not None]
    corpus = [it for it in items if it.relevant is None]
    for item in items:
        if not isinstance(item.text, str) or not item.text.strip():
            raise DataError(f'{item.name}: relevance data is text; send a non-empty text')
    ids = [doc.id for doc in corpus]
    if len(set(ids)) < len(ids):
        raise DataError('two corpus documents share an id; each document needs its own id')
    known = set(ids)
    for query in queries:
        missing = sorted(set(query.relevant) - known)
        if missing:
            raise DataError(f'{query.name}: relevant_ids names {missing[:3]}, which no corpus document has as its id')
    if not queries or not corpus:
        raise DataError(
            'relevance data needs queries (documents with relevant_ids) and a corpus (documents without); '
            f'got {len(queries)} queries and {len(corpus)} corpus documents'
        )
    return Judgements(queries, corpus, source='documents')


def _grade(raw: Any, where: str) -> float:
    try:
        grade = float(raw)
    except (TypeError, ValueError):
        raise DataError(f'{where}: score {str(raw)[:50]!r} is not a number; a relevance score is 0, 1, 2...') from None
    if not math.isfinite(grade) or abs(grade) > MAX_GRADE:
        raise DataError(f'{where}: score {str(raw)[:50]!r} is not a finite relevance grade')
    return grade


def _get(record: Any, key: str) -> Any:
    return record.get(key) if isinstance(record, dict) else getattr(record, key, None)


def _find(folder: Path, stem: str) -> Path | None:
    return next((folder / f'{stem}{s}' for s in ('.jsonl', '.csv') if (folder / f'{stem}{s}').is_file()), None)


def _judgements_header(path: Path) -> bool:
    try:
        with open(path, encoding='utf-8', errors='replace') as fh:
            first = fh.readline(4096).lower()
    except OSError:
        return False
    return first.replace('\t', ',').replace(' ', '').startswith(('query_id,doc_id', 'query-id,corpus-id'))


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, 'rb') as fh:
        for line, raw in enumerate(fh, start=1):
            try:
                text = raw.decode('utf-8-sig' if line == 1 else 'utf-8')
            except UnicodeDecodeError as error:
                raise DataError(f'{path.name} line {line}: not UTF-8 (byte {error.start + 1} of the line)') from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(f'{path.name} line {line}: not a JSON object ({error.msg})') from None
            if not isinstance(record, dict):
                raise DataError(f'{path.name} line {line}: not a JSON object')
            yield line, record


def _csv_records(path: Path) -> Iterator[tuple[int, dict]]:
    rows = read_rows(path, CSVOptions())
    header = next(rows, None)
    if header is None:
        return
    names = [cell.strip() for cell in header[1]]
    check_header(names, path)
    for line, cells in rows:
        yield line, dict(zip(names, cells))
