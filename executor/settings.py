"""The executor's settings (its ``uses_with``), declared once: their names, defaults, bounds and meanings live here,
the executor validates its ``uses_with`` with them (a misspelt key is an error), and docs/service.md's table is
written from them (``python -m executor.settings``; a test checks it is current). The Hub FinetunerExecutor's names
are kept where it had them."""

from __future__ import annotations

import sys
from typing import Any, Optional

from pydantic import Field, field_validator, model_validator

from executor.params import EndpointParams
from executor.service.artifact_io import MAX_UNPACKED_BYTES
from executor.tuning.artifact import Runtime
from executor.tuning.devices import check_device


class ServiceConfig(EndpointParams):
    """The executor's ``uses_with``: every setting, its default and its meaning."""

    model_config = {**EndpointParams.model_config, 'protected_namespaces': ()}

    model: str = Field(
        'efficientnet_lite0',
        description='registry model served when a request names no `run_id`/`model` (pre-trained weights must be '
        'local)',
    )
    artifact: Optional[str] = Field(
        None,
        description='serve this instead of `model`: a run id of this workspace, an artifact folder (`model.pt` '
        'and/or `model.onnx`), or a `.zip` of one',
    )
    batch_size: int = Field(
        32, ge=1, le=4096, description='images per forward pass for `/encode`, `/classify`, `/evaluate`'
    )
    max_batch_size: int = Field(
        128,
        ge=1,
        le=4096,
        description="the most a request's `batch_size` may ask for; a larger one is refused (422) naming the bound "
        '(one request of 2000 images at `batch_size=4096` took 22.8 GB and the worker with it)',
    )
    max_image_pixels: int = Field(
        40_000_000,
        ge=1,
        description='the most pixels an image may have; a larger one is refused from its header, before it is '
        'decoded, naming the document (a 17 KB PNG of 12000 x 12000 takes 700 MB to decode)',
    )
    max_request_docs: int = Field(
        10_000,
        ge=1,
        description='the most documents one request may carry; more are refused (413) before any is decoded. '
        "`FinetunerClient` sends `/train`'s and `/evaluate`'s documents as one request (jina's `Client` splits into "
        '100s), so training from more documents than this means a CSV file or folder under the data roots',
    )
    max_request_bytes: int = Field(
        64 * 2**20,
        ge=1,
        description='the most bytes of document content (blobs, tensors, texts, `uri`s) one request may carry, '
        "refused (413) naming the document where the sum passes it; and the largest HTTP body the executor's own "
        "HTTP port reads (413 from its `Content-Length`, or as a chunked body passes it). A Flow's HTTP gateway "
        'reads `FINETUNER_MAX_REQUEST_BYTES` from its environment (same default). On gRPC the message itself is '
        "received first: bound it at the transport with the Deployment's "
        "`grpc_server_options={'grpc.max_receive_message_length': N}`",
    )
    max_parameter_items: int = Field(
        10_000,
        ge=1,
        description="the most entries any one list (or object) of a request's parameters may hold, at any depth; "
        'more are refused (413) naming the parameter before an endpoint reads them (so are parameters nested more '
        'than 16 deep, 422)',
    )
    max_model_names: int = Field(
        64,
        ge=1,
        le=10_000,
        description="the most distinct `names` one `/models` request may describe (each one's `output_dim` is "
        'measured by building the model, ~0.1-1 s); more are refused (422) naming the bound, duplicates count once',
    )
    max_artifact_bytes: int = Field(
        MAX_UNPACKED_BYTES,
        ge=1,
        description='the most an `artifact` `.zip` may unpack to; a larger one, or one with a member compressed '
        'more than 100x, stops the start before anything is written',
    )
    select_model: Optional[str] = Field(
        None,
        description="the model file inside `artifact`, e.g. `'model-int8.onnx'`; by default `model.onnx` with "
        "runtime `onnx` when it exists, else `model.pt`; for a two-tower artifact, `'clip-text'` or "
        "`'clip-vision'` serves that tower alone (the Hub executor's names)",
    )
    device: str = Field(
        'auto',
        description="`'auto'` (CUDA when present), `'cpu'`, `'cuda'` or `'cuda:N'`; used for serving, and for "
        'training when `/train` names no `device`',
    )
    runtime: Runtime = Field(
        'onnx',
        description="`'onnx'` serves a run's ONNX export when it has one (`to_onnx=true` or `/export`), otherwise "
        "torch, and serves a registry model (`model`, or a request's `model`) through onnxruntime: exported on first "
        'use, parity-checked against torch, cached in `model_cache` by model name and weights digest and reused '
        'after a restart (a model neither ONNX exporter can export is served by torch, with a warning in the log); '
        "`'torch'` always serves the `.pt` model or the registry model in eager PyTorch",
    )
    data_roots: list[str] = Field(
        default_factory=list, description='more folders that requests may read from, besides `<workspace>/data`'
    )
    max_cached_models: int = Field(
        4, ge=1, le=64, description='models kept loaded at once; the least recently used is dropped first'
    )
    model_cache: Optional[str] = Field(
        None,
        description="folder of the registry models' ONNX exports (default `<workspace>/models`); replicas sharing "
        'it take a file lock, so one exports each model and the others load its file; an unwritable folder means '
        'the registry model is served by torch, with a warning',
    )

    @model_validator(mode='after')
    def _batch_within_bound(self) -> ServiceConfig:
        if self.batch_size > self.max_batch_size:
            raise ValueError(
                f'batch_size={self.batch_size} is more than max_batch_size={self.max_batch_size}; raise '
                'max_batch_size or lower batch_size'
            )
        return self

    @field_validator('data_roots', mode='before')
    @classmethod
    def _no_roots(cls, value: Any) -> Any:
        return [] if value is None else value  # `data_roots: null` in a YAML file: none besides the workspace's

    @field_validator('device')
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device(value)


def _shown(value: Any) -> str:
    text = f'`{value!r}`'
    if isinstance(value, int) and value >= 2**20:
        for unit, size in (('GiB', 2**30), ('MiB', 2**20)):
            if value % size == 0:
                return f'{text} ({value // size} {unit})'
    return text


def markdown_table() -> str:
    """docs/service.md's ``uses_with`` table, from the fields above."""
    rows = ['| name | default | meaning |', '|---|---|---|']
    for name, field in ServiceConfig.model_fields.items():
        default = field.get_default(call_default_factory=True)
        rows.append(f'| `{name}` | {_shown(default)} | {field.description} |')
    return '\n'.join(rows) + '\n'


if __name__ == '__main__':
    sys.stdout.write(markdown_table())
