"""The HTTP face of the executors: each endpoint's parameters typed on the OpenAPI page, and bad input answered 4xx.

jina builds the FastAPI apps itself (a Deployment's worker app, a Flow's HTTP gateway) and hands each one to
``jina.helper.extend_rest_interface`` before serving it; importing this module sets that hook in the process. The
executors import it, so a Deployment's HTTP port has it; a Flow's gateway runs in a process of its own and loads it
with ``gateway: py_modules: [executor.rest]`` (flows/*.yml do), or ``Flow().config_gateway(py_modules=[
'executor.rest'])`` in Python.

Why not jina's own typing (``parameters: SomeModel``): behind a Flow's gateway the last executor's model wins, loses
``extra='forbid'`` (a typo is dropped and answered 200) and breaks the other executors' parameters
(docs/design-notes.md). The endpoints keep validating inside (``executor.params``); this only describes the same
models and maps the executors' error types to HTTP statuses. jina answers every executor error with 500 and the
exception's ``repr`` as ``detail``, so the status is chosen from the exception's name at the start of ``detail``.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jina.helper

from executor.params import ENDPOINT_PARAMS

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger(__name__)

# The executors' exception types for bad input, and the status each is answered with; anything else stays 500.
STATUS_BY_ERROR = {
    'ParameterError': 422,  # a misspelt or invalid parameter: what FastAPI answers for a body that fails its model
    'DataError': 400,  # a document or data file that cannot be used
    'ValueError': 400,  # a request the executor refuses as it stands (a run in the wrong state, both run_id and model)
    'WeightsNotFoundError': 400,  # a model asked for pretrained whose weights are not on the server
    'RunNotFoundError': 404,
    'RequestTooLarge': 413,  # over max_request_docs or max_request_bytes
    'EngineUnavailable': 503,  # the indexer's engine (Qdrant, Milvus) did not answer; the encoder keeps serving
}
# The largest body an HTTP port reads. The executor sets it from its max_request_bytes (its worker's port); a Flow's
# gateway, which runs no executor, reads FINETUNER_MAX_REQUEST_BYTES (default: the executor's default, 64 MiB).
body_limit = int(os.environ.get('FINETUNER_MAX_REQUEST_BYTES', 64 * 2**20))
# jina's HTTP load balancer (a Deployment's HTTP port) reads bodies with aiohttp's default bound and, above it, sends
# the request on with no body at all: the executor behind it sees an empty POST.
LOAD_BALANCER_BODY_LIMIT = 2**20
_ERROR_NAME = re.compile(r'^(\w+)\(')
_PARAMETERS_NOTE = (
    "The endpoint's own parameters; an object under the name of an executor of the Flow "
    '(`{"indexer": {"limit": 3}}`) is addressed to that executor (docs/service.md).'
)


def status_for(detail: Any) -> int | None:
    """The HTTP status for an executor's error ``detail`` (``repr`` of its exception), or None to keep 500."""
    match = _ERROR_NAME.match(detail) if isinstance(detail, str) else None
    return STATUS_BY_ERROR.get(match.group(1)) if match else None


def typed_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` (FastAPI's OpenAPI dict) with each known endpoint's ``parameters`` described by its pydantic model."""
    components = schema.setdefault('components', {}).setdefault('schemas', {})
    for path, operations in schema.get('paths', {}).items():
        model = ENDPOINT_PARAMS.get(path)
        body = operations.get('post', {}).get('requestBody', {}).get('content', {}).get('application/json', {})
        ref = body.get('schema', {}).get('$ref', '')
        request_model = components.get(ref.rpartition('/')[2])
        if model is None or request_model is None or 'parameters' not in request_model.get('properties', {}):
            continue
        described = model.model_json_schema(ref_template='#/components/schemas/{model}')
        components.update(described.pop('$defs', {}))
        described['additionalProperties'] = {'type': 'object'}  # objects addressed to other executors
        described['description'] = f'{described.get("description", "")}\n\n{_PARAMETERS_NOTE}'.strip()
        components[model.__name__] = described
        request_model['properties']['parameters'] = {'$ref': f'#/components/schemas/{model.__name__}'}
    return schema


def set_body_limit(limit: int) -> None:
    """The largest body this process's HTTP ports read (the executor's ``max_request_bytes``)."""
    global body_limit
    body_limit = limit


def too_large(size: int | None) -> str:
    got = 'more' if size is None else f'{size}'
    return (
        f'the request body holds {got} bytes, more than the {body_limit} this HTTP port reads (max_request_bytes '
        "in uses_with; FINETUNER_MAX_REQUEST_BYTES for a Flow's gateway); send fewer documents per request, paths "
        '(uri) of files under the data roots instead of their bytes, or use gRPC'
    )


def lone_surrogate(exc: UnicodeEncodeError) -> str:
    """The detail of a request whose text jina could not encode: the text, shown escaped and cut short."""
    text = exc.object if isinstance(exc.object, str) else ''
    return (
        f'DataError: the request holds a lone surrogate (a half of a UTF-16 pair, such as \\ud800), which is no '
        f'character, in the text {ascii(text)[:200]}; send valid Unicode text'
    )


EMPTY_BODY = (
    'the request arrived with no body; send JSON {"data": [...], "parameters": {...}}. Behind the HTTP port of a jina '
    f'Deployment (its load balancer), a body of more than {LOAD_BALANCER_BODY_LIMIT} bytes, or one that is not JSON, '
    'arrives empty: send fewer documents per request, use gRPC, or serve HTTP without the load balancer '
    "(`jina executor --protocol http`, `Deployment(..., include_gateway=False)` or a Flow's gateway)"
)


class BodyLimit:
    """ASGI middleware: a body over ``body_limit`` is answered 413, from its Content-Length before it is read, or
    as soon as the bytes read pass the bound (a chunked body); an empty POST is answered with ``EMPTY_BODY``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse

        if scope['type'] != 'http' or scope['method'] != 'POST':
            return await self.app(scope, receive, send)
        headers = dict(scope['headers'])
        length = headers.get(b'content-length')
        if length is not None and length.isdigit() and int(length) > body_limit:
            return await JSONResponse({'detail': too_large(int(length))}, 413)(scope, receive, send)
        if length == b'0' and scope['path'] in ENDPOINT_PARAMS:
            via_balancer = b'aiohttp' in headers.get(b'user-agent', b'')
            return await JSONResponse({'detail': EMPTY_BODY}, 413 if via_balancer else 422)(scope, receive, send)
        read = 0

        async def counted() -> dict:
            nonlocal read
            message = await receive()
            read += len(message.get('body', b''))
            if read > body_limit:  # FastAPI passes an HTTPException raised while it reads the body on as it is
                raise HTTPException(413, too_large(None))
            return message

        return await self.app(scope, counted, send)


def extend(app: FastAPI, then: Callable[[FastAPI], FastAPI]) -> FastAPI:
    """Typed OpenAPI, 4xx answers and the body bound on ``app``; ``then`` is the hook that was set before (jina's, or
    a user's)."""
    from fastapi.exception_handlers import http_exception_handler
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    app.add_middleware(BodyLimit)

    @app.exception_handler(HTTPException)
    async def bad_input_is_4xx(request, exc: HTTPException):
        status = status_for(exc.detail) if exc.status_code == 500 else None
        if status is None:
            return await http_exception_handler(request, exc)
        return JSONResponse(status_code=status, content={'detail': exc.detail})

    @app.exception_handler(UnicodeEncodeError)
    async def lone_surrogate_is_400(request, exc: UnicodeEncodeError):
        # jina turns a request's parameters into protobuf before any executor sees them, and protobuf takes no
        # lone surrogate (JSON's "\ud800"): a 500 with no detail otherwise
        return JSONResponse(status_code=400, content={'detail': lone_surrogate(exc)})

    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = typed_openapi(build_openapi())
        return app.openapi_schema

    app.openapi = openapi
    return then(app)


def install() -> None:
    """Set the hook in this process (once): jina calls it on every FastAPI app it builds from now on."""
    # FastAPI checks each reply against jina's response model, where docarray declares tensors (NdArray) as bytes:
    # pydantic then warns once per document (2052 log lines for one request of 2000 images) that a tensor or an
    # embedding is a list, and writes it as the list it is (tests/integration compare HTTP's embeddings to gRPC's).
    warnings.filterwarnings('ignore', message='Pydantic serializer warnings', category=UserWarning)
    current = jina.helper.extend_rest_interface
    if getattr(current, 'finetuner_executor', False):
        return

    def hook(app: FastAPI) -> FastAPI:
        return extend(app, current)

    hook.finetuner_executor = True
    jina.helper.extend_rest_interface = hook


install()
