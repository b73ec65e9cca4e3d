"""Which parameters are an executor's own in a Flow: jina's per-executor rule, and typos still errors."""

from __future__ import annotations

import pytest

from executor.params import (
    EncodeParams,
    EvaluateParams,
    ModelsParams,
    ParameterError,
    SearchParams,
    TrainParams,
    executor_names,
    own_parameters,
    parse,
)

ENCODER = ('encoder', 'FinetunerExecutor')


def test_keys_addressed_to_an_executor_are_its_own_and_win_over_top_level_keys():
    sent = {'batch_size': 4, 'encoder': {'batch_size': 8}, 'encoder__runtime': 'torch', 'limit': 5}
    assert own_parameters(sent, ENCODER, SearchParams) == {'batch_size': 8, 'runtime': 'torch', 'limit': 5}
    # by class name too, as jina's worker merges `metas.name`
    assert own_parameters({'FinetunerExecutor': {'limit': 2}}, ENCODER, SearchParams) == {'limit': 2}


def test_keys_addressed_to_other_executors_are_left_to_them(caplog: pytest.LogCaptureFixture):
    sent = {'indexer': {'limit': 3}, 'reranker': {'top_k': 2, 'mode': 'fast'}, 'limit': 3}
    assert own_parameters(sent, ENCODER, SearchParams) == {'limit': 3}
    with caplog.at_level('DEBUG', logger='executor.params'):  # jina's own `__results__` is no other executor's
        assert parse(SearchParams, {'__results__': {}, 'limit': 2}, '/search', ENCODER).limit == 2
    assert '__results__' not in caplog.text
    params = parse(SearchParams, sent, '/search', ENCODER)
    assert params.limit == 3 and params.batch_size is None


def test_a_key_prefixed_with_another_name_reaches_no_executor_but_this_one_and_is_an_error():
    # jina's gateway strips every `<name>__<key>` but the addressed executor's own; with no gateway in between (an
    # HTTP Deployment) such a key is a typo such as `batch__size`, not another executor's
    for key in ('reranker__top_k', 'batch__size'):
        with pytest.raises(
            ParameterError,
            match=rf"invalid parameters for /search: parameter '{key}' is addressed "
            rf"to an executor named '{key.split('__')[0]}', but this one is "
            r"called 'encoder' or 'FinetunerExecutor'",
        ):
            parse(SearchParams, {key: 2}, '/search', ENCODER)


def test_a_misspelt_key_is_still_an_error():
    with pytest.raises(ParameterError, match=r"unknown parameter 'limt' \(did you mean 'limit'\?\)"):
        parse(SearchParams, {'indexer': {'limit': 3}, 'limt': 3}, '/search', ENCODER)
    # an object under a name close to an object-valued field is a typo, not another executor
    with pytest.raises(ParameterError, match=r"unknown parameter 'optimizer_option' \(did you mean 'optimizer_opt"):
        parse(TrainParams, {'train_data': 'd', 'optimizer_option': {'lr': 0.1}}, '/train', ENCODER)
    # a typo inside the executor's own object is its error too
    with pytest.raises(ParameterError, match=r"unknown parameter 'batchsize'"):
        parse(SearchParams, {'encoder': {'batchsize': 8}}, '/search', ENCODER)


def test_executor_names_come_from_the_flow_and_the_class():
    class Runtime:
        name = 'encoder/shard-0/rep-1'

    class Metas:
        name = 'FinetunerExecutor'

    class Fake:
        runtime_args, metas = Runtime(), Metas()

    assert executor_names(Fake()) == ('encoder', 'FinetunerExecutor', 'Fake')


def test_integer_parameters_refuse_booleans_and_models_names_count_once():
    """Issue 32: `truncate_dim: true` was taken as 1 (pydantic's lax mode reads true as an integer)."""
    with pytest.raises(ParameterError, match=r"parameter 'truncate_dim': takes an integer, not true or false"):
        parse(EncodeParams, {'truncate_dim': True}, '/encode')
    with pytest.raises(ParameterError, match=r"parameter 'matryoshka_dims': takes an integer, not true or false"):
        parse(EvaluateParams, {'matryoshka_dims': [8, True]}, '/evaluate')
    assert parse(EncodeParams, {'truncate_dim': 3.0}, '/encode').truncate_dim == 3  # gRPC's whole float
    assert parse(TrainParams, {'freeze': True}, '/train').freeze is True  # a field that takes a boolean too
    names = parse(ModelsParams, {'names': ['b', 'a', 'b'] * 1000}, '/models').names
    assert names == ['b', 'a']


def test_an_error_quotes_at_most_an_excerpt_of_the_request():
    with pytest.raises(ParameterError) as err:
        parse(EncodeParams, {'x' * 100_000: 1}, '/encode')
    assert len(str(err.value)) < 1000 and '(99802 characters more)' in str(err.value)
