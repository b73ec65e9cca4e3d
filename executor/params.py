"""The parameters of every endpoint (FinetunerExecutor's and the indexer's) and FinetunerExecutor's ``uses_with``:
pydantic models, unknown keys rejected.

Endpoints take ``parameters: dict`` and validate it here (``parse``) rather than through jina's ``parameters: Model``
annotation: behind a Flow's HTTP gateway the annotation makes the gateway validate against one executor's model, drop
unknown keys silently and send that model's fields alone, with their defaults, to every executor of the chain.
Validation is lax, so numbers that gRPC carries as floats (protobuf's ``Struct`` has no integers) become the integers
the fields ask for: ``3.0`` -> ``3``.

A Flow hands a request's parameters to every executor on its path, so ``/index`` and ``/search``, which
flows/search.yml routes through FinetunerExecutor (embeds) and then VectorIndexer (stores, finds), take one model each
that both executors validate: the encoder's fields plus the indexer's ``limit``. Each executor uses its own fields.

``/train`` takes the fields of the core's ``TrainConfig`` (so the names never drift from it) minus those the
executor sets itself (``output_dir``, ``callbacks``, ``data_roots``), plus ``wait``, ``resume`` and ``run_name``.
"""

from __future__ import annotations

import copy
import logging
import os
import types
import typing
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, Optional, TypeVar, Union

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from executor.indexing.base import FILTER_FIELDS
from executor.service.store import RUN_ID_PATTERN
from executor.tuning.artifact import Runtime
from executor.tuning.config import DATA_FIELDS, EmbedDim, Split, TrainConfig
from executor.tuning.data import check_under_roots
from executor.tuning.data.finetuner_csv import CSVOptions
from executor.tuning.errors import close_names, did_you_mean, excerpt
from executor.tuning.finetuner_compat import translate
from executor.tuning.inputs.base import DOCUMENT, QUERY
from executor.tuning.matryoshka import truncate

P = TypeVar('P', bound=BaseModel)
logger = logging.getLogger(__name__)

EXECUTOR_SET = ('output_dir', 'callbacks', 'data_roots')  # TrainConfig fields the executor fills in
JINA_RESULTS = '__results__'  # jina's own key in every request's parameters, never a user's


class ParameterError(ValueError):
    """The parameters of a request are invalid; the message names each bad one and what it accepts."""


class EndpointParams(BaseModel):
    """Base of every endpoint's parameters: a misspelt or unknown key is an error, never silently ignored.

    Also the parameters of endpoints that take none, so that a stray key is reported there too.
    """

    model_config = ConfigDict(extra='forbid')

    @model_validator(mode='before')
    @classmethod
    def _check_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        # jina's client sends `__results__: {}` with requests that have no parameters, and executors that return a
        # dict hand their results downstream under that key: it is jina's, never a user's typo.
        data = {key: value for key, value in data.items() if key != JINA_RESULTS}
        allowed = sorted({field.alias or name for name, field in cls.model_fields.items()})
        for key in data:
            if key not in allowed:
                hint = did_you_mean(key, allowed)
                raise ValueError(f'unknown parameter {excerpt(key)}{hint}; allowed: {", ".join(allowed) or "none"}')
        return data

    @field_validator('*', mode='before')
    @classmethod
    def _no_boolean_for_integer(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1: `truncate_dim: true` would keep one dimension
        field = cls.model_fields.get(info.field_name)
        if field is not None and _takes_integer_only(field.annotation):
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, bool) for v in values):
                raise ValueError('takes an integer, not true or false')
        return value


def _takes_integer_only(annotation: Any) -> bool:
    """Whether a field's type is an integer (or a list of them), maybe Optional, with no bool among its choices."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is int:
        return True
    if origin is typing.Annotated:
        return _takes_integer_only(args[0])
    if origin is list:
        return bool(args) and _takes_integer_only(args[0])
    if origin in (typing.Union, types.UnionType):
        choices = [a for a in args if a is not type(None)]
        return bool(choices) and all(_takes_integer_only(a) for a in choices)
    return False


def own_parameters(parameters: dict[str, Any], names: Sequence[str], model: type[BaseModel]) -> dict[str, Any]:
    """The parameters addressed to the executor called ``names`` (its name in the Flow, its class name), by jina's
    per-executor rule: ``{"<executor>": {...}}`` and ``<executor>__<key>`` (jina's gateway parses the last ``__`` part
    as the key) are another executor's unless ``<executor>`` is one of ``names``, and then they win over top-level
    keys. Top-level keys are every executor's, so an unknown one stays an error, and so does an object under a key
    close to an object-valued field of ``model`` (``optimizer_option: {...}`` is a typo, not an executor)."""
    own, addressed, others = {}, {}, []
    mapping_fields = [name for name, field in model.model_fields.items() if _takes_mapping(field.annotation)]
    for key, value in parameters.items():
        executor, sep, field = key.rpartition('__')
        if key == JINA_RESULTS:
            own[key] = value  # the model's key check drops it
        elif isinstance(value, dict) and key in names:
            addressed.update(value)
        elif sep and executor and field:
            # jina's gateway hands an executor only its own `<name>__<key>` keys (and strips the `<name>__`): one
            # that gets here unstripped came with no gateway in between (an HTTP Deployment), so it is no other's
            if executor not in names:
                raise ParameterError(
                    f'parameter {key!r} is addressed to an executor named {executor!r}, but this one '
                    f'is called {" or ".join(map(repr, names))}; write {field!r} or '
                    f'{names[0]}__{field}'
                )
            addressed[field] = value
        elif isinstance(value, dict) and key not in model.model_fields and not close_names(key, mapping_fields):
            others.append(key)  # {"<another executor>": {...}}
        else:
            own[key] = value
    if others:
        logger.debug('parameters %s are left to the executors of those names (this one is %s)', others, names[0])
    return {**own, **addressed}


def executor_names(executor: Any) -> tuple[str, ...]:
    """The names a jina executor is addressed by: its name in the Flow or Deployment (``runtime_args.name`` is
    ``<name>/rep-<i>`` or ``<name>/shard-<j>/rep-<i>``), and its ``metas.name`` (its class name by default)."""
    runtime_name = getattr(getattr(executor, 'runtime_args', None), 'name', None)
    metas_name = getattr(getattr(executor, 'metas', None), 'name', None)
    names = [str(runtime_name).split('/')[0] if runtime_name else None, metas_name, type(executor).__name__]
    return tuple(dict.fromkeys(name for name in names if name))


def _takes_mapping(annotation: Any) -> bool:
    """Whether a field's type accepts an object: a dict or a pydantic model, maybe inside Optional/Union."""
    if isinstance(annotation, type):
        return issubclass(annotation, (dict, BaseModel))
    origin = typing.get_origin(annotation)
    return origin is dict or any(_takes_mapping(arg) for arg in typing.get_args(annotation))


def parse(model: type[P], parameters: dict[str, Any] | None, endpoint: str, executor: Sequence[str] = ()) -> P:
    """Validate an endpoint's parameters; every problem is listed, named by its parameter. With ``executor`` (the
    executor's names), the parameters addressed to other executors of a Flow are left to them (``own_parameters``)."""
    parameters = parameters or {}
    if executor:
        try:
            parameters = own_parameters(parameters, executor, model)
        except ParameterError as err:
            raise ParameterError(f'invalid parameters for {endpoint}: {err}') from None
    try:
        return model.model_validate(parameters)
    except ValidationError as err:
        raise ParameterError(f'invalid parameters for {endpoint}: {describe_errors(err)}') from None


def describe_errors(err: ValidationError) -> str:
    """Every problem of a validation, each named by its parameter (``parameter 'a.b': ... (got ...)``)."""
    problems = []
    for error in err.errors(include_url=False):
        where = '.'.join(str(part) for part in error['loc'])
        message = error['msg'].removeprefix('Value error, ')
        value = error.get('input')
        shown = f' (got {excerpt(value)})' if where and 'input' in error and not isinstance(value, dict) else ''
        problems.append(f"parameter '{where}': {message}{shown}" if where else message)
    return '; '.join(problems)


def resolve_path(value: str, roots: Sequence[str | os.PathLike], what: str) -> str:
    """A path parameter, resolved: relative paths are taken under the first data root where they exist; the result
    must lie under a data root (symlinks resolved)."""
    return str(check_under_roots(value, roots, what))


def _int_if_integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# ---------------------------------------------------------------------------------------------------------------------
# /train
# ---------------------------------------------------------------------------------------------------------------------


class _TrainOptions(EndpointParams):
    """What ``/train`` takes besides ``TrainConfig``'s fields."""

    wait: bool = Field(False, description='answer when the run has ended rather than when it is queued')
    resume: Optional[str] = Field(
        None,
        pattern=RUN_ID_PATTERN,
        description='run_id of a FAILED or CANCELLED run to continue from its last checkpoint',
    )
    run_name: Optional[str] = Field(
        None, pattern=RUN_ID_PATTERN, description='the run_id to give the new run (default: a time-ordered id)'
    )

    @model_validator(mode='before')
    @classmethod
    def _finetuner_arguments(cls, data: Any) -> Any:
        # before the key check (EndpointParams'): Finetuner's names that are no fields here are translated first
        return translate(data, core=False) if isinstance(data, dict) else data

    @field_validator('freeze', mode='before', check_fields=False)
    @classmethod
    def _freeze_count(cls, value: Any) -> Any:
        # over gRPC `freeze=2` arrives as 2.0 and `1` as 1.0, which pydantic would read as True (freeze everything)
        return _int_if_integral(value)

    @field_validator(*DATA_FIELDS, mode='before', check_fields=False)
    @classmethod
    def _data_path(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            raise ValueError(
                'must be the path of a CSV file or an image folder under the data roots; send training '
                "documents as the request's documents instead"
            )
        return value

    @model_validator(mode='after')
    def _check(self) -> _TrainOptions:
        if self.resume is not None:
            extra = sorted(self.model_fields_set - {'resume', 'wait', 'epochs'})
            if extra:
                raise ValueError(
                    f'resume={self.resume!r} continues that run with its own options; drop {extra}, or '
                    'start a new run with them (only epochs may change on resume)'
                )
        return self

    def config_dict(self) -> dict[str, Any]:
        """The ``TrainConfig`` fields the request gave, as JSON-able values (``train_config`` checks them as one)."""
        names = {name for name in self.model_fields_set if name in TrainConfig.model_fields}
        return self.model_dump(mode='json', include=names)


def train_config(options: dict[str, Any]) -> TrainConfig:
    """The run's ``TrainConfig``: ``/train``'s options with what the service fills in (paths resolved, its model and
    device), validated once as a whole (known loss and miner, device, data pairs...), errors named by parameter."""
    try:
        return TrainConfig.model_validate(options)
    except ValidationError as err:
        raise ParameterError(f'invalid parameters for /train: {describe_errors(err)}') from None


def _train_fields() -> dict[str, Any]:
    return {
        name: (info.annotation, copy.copy(info))
        for name, info in TrainConfig.model_fields.items()
        if name not in EXECUTOR_SET
    }


TrainParams = create_model(
    'TrainParams',
    __base__=_TrainOptions,
    __module__=__name__,
    __doc__="Parameters of ``/train``: ``TrainConfig``'s fields (Finetuner's ``fit`` names) and the run options.",
    **_train_fields(),
)


# ---------------------------------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------------------------------


class RunParams(EndpointParams):
    """Parameters of ``/runs/status``, ``/runs/cancel``, ``/runs/artifact``, ``/runs/reports``, ``/runs/delete``."""

    run_id: str = Field(pattern=RUN_ID_PATTERN, description='the run, as /train and /runs return it')


class LogsParams(RunParams):
    """Parameters of ``/runs/logs``."""

    since: int = Field(0, ge=0, description="first line to return (0-based): the previous reply's next_since")
    limit: Optional[int] = Field(None, ge=1, le=1_000_000, description='most lines to return (default: all)')


class ExportParams(RunParams):
    """Parameters of ``/export``."""

    format: Literal['onnx'] = 'onnx'
    fp16: bool = Field(False, description='float16 weights and activations (GPU serving)')
    quantize: bool = Field(False, description='int8 static quantization (CPU serving)')

    @model_validator(mode='after')
    def _one_variant(self) -> ExportParams:
        if self.fp16 and self.quantize:
            raise ValueError('choose fp16=true or quantize=true, not both')
        return self


# ---------------------------------------------------------------------------------------------------------------------
# models in service
# ---------------------------------------------------------------------------------------------------------------------


class ModelParams(EndpointParams):
    """Which model serves a request: a finished run, a registry model, or (neither) the executor's served model."""

    run_id: Optional[str] = Field(None, pattern=RUN_ID_PATTERN, description='a FINISHED run')
    model: Optional[str] = Field(None, description="a registry model name, e.g. 'efficientnet_lite0' (pre-trained)")
    runtime: Optional[Runtime] = Field(
        None, description="'onnx' where the model has an ONNX export, else 'torch' (default: the executor's runtime)"
    )
    batch_size: Optional[int] = Field(None, ge=1, le=4096, description="default: the executor's batch_size")

    @model_validator(mode='after')
    def _one_model(self) -> ModelParams:
        if self.run_id is not None and self.model is not None:
            raise ValueError(f'give run_id or model, not both (got run_id={self.run_id!r}, model={self.model!r})')
        return self


class DocModelParams(ModelParams):
    """A model endpoint that answers with the documents it was sent."""

    drop_image_content: bool = Field(
        False,
        description="clear each document's blob, tensor and data: URI in the "
        'reply (path and http URIs stay): the reply carries ids and results only, as '
        "clip-as-service's parameter of the same name does",
    )


class EmbedParams(DocModelParams):
    """An endpoint that sets each document's embedding."""

    #: the prompt this endpoint's documents take when the request names none (where the model has it)
    default_prompt: ClassVar[str | None] = None

    prompt_name: Optional[str] = Field(
        None,
        min_length=1,
        max_length=100,
        description="the model's prompt put before each text (a model trained with prompts={'query': ..., "
        "'document': ...}, or a sentence-transformers folder's); default: 'document' on /index, 'query' on /search "
        '(where the model has it), none on /encode',
    )

    truncate_dim: Optional[int] = Field(
        None,
        ge=1,
        description='keep the first truncate_dim values of each embedding, L2-normalised again (a Matryoshka '
        "model's smaller sizes); at most the model's output size",
    )

    def truncated(self, embeddings: np.ndarray) -> np.ndarray:
        """``embeddings`` ``(N, D)`` cut to ``truncate_dim`` and L2-normalised again (as they are without it)."""
        dim, width = self.truncate_dim, embeddings.shape[1]
        if dim is None:
            return embeddings
        if dim > width:
            raise ParameterError(
                f"truncate_dim={dim} is more than the model's {width} dimensions; send truncate_dim <= {width}, or "
                'leave it out for the full embedding'
            )
        return truncate(embeddings, dim)


class EncodeParams(EmbedParams):
    """Parameters of ``/encode``."""


class IndexParams(EmbedParams):
    """Parameters of ``/index``: the model that embeds the documents; VectorIndexer then stores them."""

    default_prompt: ClassVar[str | None] = DOCUMENT


class SearchParams(EmbedParams):
    """Parameters of ``/search``: the model that embeds the queries, and how many matches VectorIndexer returns."""

    default_prompt: ClassVar[str | None] = QUERY

    limit: int = Field(10, ge=1, le=10_000, description='number of matches returned per query')
    filter: Optional[dict[str, Union[str, list[str]]]] = Field(
        None,
        description='only documents whose stored fields match: {"label": "ants"}, or {"label": ["ants", "bees"]} '
        f'for any of them; several fields must all match. Fields: {", ".join(FILTER_FIELDS)}',
    )

    @field_validator('filter')
    @classmethod
    def _filter_fields(cls, where: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        for field, value in (where or {}).items():
            if field not in FILTER_FIELDS:
                raise ValueError(
                    f'filter on {field!r}{did_you_mean(field, FILTER_FIELDS)}: a filter names stored fields, '
                    f'one of {", ".join(FILTER_FIELDS)}'
                )
            if isinstance(value, list) and not value:
                raise ValueError(f'filter {field!r} lists no value; give one or more, or leave {field!r} out')
        return where or None


class DeleteParams(EndpointParams):
    """Parameters of VectorIndexer's ``/delete``: ids to delete, besides the ids of the documents sent."""

    ids: list[str] = Field(default_factory=list)


class ClassifyParams(DocModelParams):
    """Parameters of ``/classify``: the model must have a classifier head (a run trained with CrossEntropyLoss)."""


class EvaluateParams(ModelParams):
    """Parameters of ``/evaluate``: labelled data as paths, or as the request's documents.

    ``query_data`` + ``index_data``: each query searches the index. ``data`` (or the documents sent): the items
    search each other, self excluded; a model with a classifier head also gets its accuracy on them.
    """

    query_data: Optional[str] = Field(None, description='CSV file or image folder under the data roots')
    index_data: Optional[str] = Field(None, description='CSV file or image folder under the data roots')
    data: Optional[str] = Field(
        None, description='CSV file (labelled items, sentence pairs, scored pairs) or image folder under the data roots'
    )
    limit: int = Field(20, ge=1, le=1000, description='k of the *_at_k metrics')
    csv_options: Optional[CSVOptions] = Field(
        None, description="how the CSV files are read, as /train's (is_labeled, dialect, delimiter, ...)"
    )
    matryoshka_dims: Optional[list[EmbedDim]] = Field(
        None, min_length=1, max_length=64, description='evaluate at each of these leading slices of the embedding too'
    )
    split: Split = Field(
        'test', description='relevance data (a BEIR folder as data): the judgements split, qrels/<split>.tsv'
    )

    @model_validator(mode='after')
    def _data(self) -> EvaluateParams:
        if (self.query_data is None) != (self.index_data is None):
            raise ValueError('query_data and index_data go together: give both, or data alone')
        if self.data is not None and self.query_data is not None:
            raise ValueError('give data, or query_data with index_data, not both')
        return self


class ModelsParams(EndpointParams):
    """Parameters of ``/models``: every model, or those in ``names`` (each one's output_dim measured)."""

    names: Optional[list[str]] = Field(
        None, min_length=1, description='describe these models only (a name given twice is described once)'
    )
    local_only: bool = Field(False, description='only the models whose pretrained weights are on the server')

    @field_validator('names')
    @classmethod
    def _distinct(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        return None if value is None else list(dict.fromkeys(value))


# Every endpoint's parameters, by path: what the endpoints validate with, and what the OpenAPI page shows
# (executor.rest).
ENDPOINT_PARAMS: dict[str, type[EndpointParams]] = {
    '/train': TrainParams,
    '/runs': EndpointParams,
    **dict.fromkeys(('/runs/status', '/runs/cancel', '/runs/artifact', '/runs/reports', '/runs/delete'), RunParams),
    '/runs/logs': LogsParams,
    '/models': ModelsParams,
    '/export': ExportParams,
    '/encode': EncodeParams,
    '/index': IndexParams,
    '/search': SearchParams,
    '/classify': ClassifyParams,
    '/evaluate': EvaluateParams,
    '/delete': DeleteParams,
    '/count': EndpointParams,
}
