"""VectorIndexer's settings: defaults, each backend's own settings, and the errors a wrong one gets."""

from __future__ import annotations

import pytest

from executor.indexing.settings import BACKEND_SETTINGS, COMMON, IndexerConfig, IndexerConfigError, load_settings
from executor.params import ParameterError, SearchParams, parse


def test_hnsw_is_the_default_and_every_setting_belongs_to_a_backend():
    settings = load_settings({})
    assert (settings.backend, settings.dim, settings.index_dir, settings.ef) == ('hnsw', None, None, None)
    declared = set(IndexerConfig.model_fields)
    assigned = set(COMMON).union(*BACKEND_SETTINGS.values())
    assert declared == assigned  # no setting that no backend reads, none read but undeclared


def test_each_backend_takes_its_own_settings():
    qdrant = load_settings(
        {
            'backend': 'qdrant',
            'url': 'http://q:6333',
            'shard_number': 4,
            'replication_factor': 2,
            'quantization': 'int8',
        }
    )
    assert (qdrant.shard_number, qdrant.replication_factor, qdrant.quantization) == (4, 2, 'int8')
    assert qdrant.quantization_rescore is True
    milvus = load_settings({'backend': 'milvus', 'host': 'm', 'port': 19530, 'index_type': 'IVF_SQ8'})
    assert (milvus.host, milvus.port, milvus.index_type) == ('m', 19530, 'IVF_SQ8')
    # a YAML's `null` for another backend's setting (indexer.yml's index_dir) is no setting at all
    assert load_settings({'backend': 'qdrant', 'path': '/data/q', 'index_dir': None}).path == '/data/q'


@pytest.mark.parametrize(
    'uses_with,message',
    [
        ({'backend': 'qdrant', 'urll': 'http://q:6333'}, r"unknown parameter 'urll' \(did you mean 'url'\?\)"),
        ({'backend': 'elastic'}, r"parameter 'backend': Input should be 'hnsw', 'qdrant' or 'milvus'"),
        ({'backend': 'hnsw', 'url': 'http://q:6333'}, r"'url' is a setting of backend 'qdrant', not of backend='hnsw'"),
        (
            {'backend': 'milvus', 'index_dir': '/x'},
            r"'index_dir' is a setting of backend 'hnsw', not of backend='milvus'; remove it or set backend to 'hnsw'",
        ),
        ({'backend': 'qdrant'}, r'exactly one of url .*, path .* or location .*; got none'),
        ({'backend': 'qdrant', 'url': 'http://q', 'path': '/q'}, r'exactly one of url.*; got url, path'),
        ({'backend': 'qdrant', 'path': '/q', 'quantization': 'int4'}, r"parameter 'quantization': Input should be"),
        ({'backend': 'milvus', 'index_type': 'DISKANN'}, r"parameter 'index_type': Input should be 'FLAT'"),
        ({'backend': 'milvus', 'port': 0}, r"parameter 'port': Input should be greater than or equal to 1"),
        (
            {'backend': 'milvus', 'host': '$MILVUS_HOST'},
            r'takes host from the environment variable MILVUS_HOST, which is not set; export MILVUS_HOST=',
        ),
        ({'connect_timeout': 0}, r"parameter 'connect_timeout': Input should be greater than 0"),
    ],
)
def test_a_wrong_setting_is_named_with_what_is_allowed(uses_with: dict, message: str):
    with pytest.raises(IndexerConfigError, match=r'invalid VectorIndexer settings \(uses_with\): .*' + message):
        load_settings(uses_with)


def test_the_search_filter_names_stored_fields():
    params = parse(SearchParams, {'limit': 3, 'filter': {'label': 'ants', 'uri': ['a', 'b']}}, '/search')
    assert params.filter == {'label': 'ants', 'uri': ['a', 'b']}
    assert parse(SearchParams, {'filter': {}}, '/search').filter is None
    with pytest.raises(ParameterError, match=r"filter on 'lable' \(did you mean 'label'\?\).*one of uri, text, label"):
        parse(SearchParams, {'filter': {'lable': 'ants'}}, '/search')
    with pytest.raises(ParameterError, match=r"filter 'label' lists no value"):
        parse(SearchParams, {'filter': {'label': []}}, '/search')
    with pytest.raises(ParameterError, match=r"parameter 'filter.label.str'"):
        parse(SearchParams, {'filter': {'label': 3}}, '/search')
