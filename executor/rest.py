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
import re
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
}
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


def extend(app: FastAPI, then: Callable[[FastAPI], FastAPI]) -> FastAPI:
    """Typed OpenAPI and 4xx answers on ``app``; ``then`` is the hook that was set before (jina's, or a user's)."""
    from fastapi.exception_handlers import http_exception_handler
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def bad_input_is_4xx(request, exc: HTTPException):
        status = status_for(exc.detail) if exc.status_code == 500 else None
        if status is None:
            return await http_exception_handler(request, exc)
        return JSONResponse(status_code=status, content={'detail': exc.detail})

    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = typed_openapi(build_openapi())
        return app.openapi_schema

    app.openapi = openapi
    return then(app)


def install() -> None:
    """Set the hook in this process (once): jina calls it on every FastAPI app it builds from now on."""
    current = jina.helper.extend_rest_interface
    if getattr(current, 'finetuner_executor', False):
        return

    def hook(app: FastAPI) -> FastAPI:
        return extend(app, current)

    hook.finetuner_executor = True
    jina.helper.extend_rest_interface = hook


install()
