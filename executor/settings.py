"""The executor's settings (its ``uses_with``), validated like every endpoint's parameters: a misspelt key is an
error. The Hub FinetunerExecutor's names are kept where it had them."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from executor.service.artifacts import MAX_UNPACKED_BYTES
from executor.tuning.artifact import Runtime
from executor.tuning.devices import check_device


class ServiceConfig(BaseModel):
    """The executor's ``uses_with`` (the Hub executor's names where it had them)."""

    model_config = ConfigDict(extra='forbid', protected_namespaces=())

    model: str = Field('efficientnet_lite0', description='registry model served when a request names none')
    artifact: Optional[str] = Field(
        None, description='serve this instead of `model`: a run id, an artifact folder or a .zip of one'
    )
    batch_size: int = Field(32, ge=1, le=4096, description='images per forward pass')
    max_batch_size: int = Field(
        128,
        ge=1,
        le=4096,
        description=(
            "the most items a request's batch_size may ask for in one forward pass: one request of 2000 images at "
            'batch_size=4096 took 22.8 GB and the worker with it'
        ),
    )
    max_image_pixels: int = Field(
        40_000_000,
        ge=1,
        description='the most pixels an image may have to be decoded, read from its header first (a 17 KB PNG of '
        '12000 x 12000 took 700 MB to decode)',
    )
    max_request_docs: int = Field(
        10_000,
        ge=1,
        description='the most documents one request may carry; send more in several requests, or train from a CSV '
        'file or folder under the data roots',
    )
    max_request_bytes: int = Field(
        64 * 2**20,
        ge=1,
        description="the most bytes of documents' content (blobs, tensors, texts, data: URIs) one request may carry, "
        'and the largest HTTP body the executor reads (413 above it)',
    )
    max_artifact_bytes: int = Field(
        MAX_UNPACKED_BYTES,
        ge=1,
        description='the most bytes an `artifact` zip may unpack to (a 1 MB zip unpacked to 1 GiB at start-up)',
    )
    select_model: Optional[str] = Field(None, description="the model file inside `artifact`, e.g. 'model-int8.onnx'")
    device: str = Field('auto', description="'auto', 'cpu', 'cuda' or 'cuda:N'; for serving and training")
    runtime: Runtime = Field('onnx', description="'onnx' where an ONNX export exists, else torch")
    data_roots: list[str] = Field(
        default_factory=list, description="folders requests may read data from, besides the workspace's data/ folder"
    )
    max_cached_models: int = Field(4, ge=1, le=64, description='models held in memory at once (LRU)')
    model_cache: Optional[str] = Field(
        None,
        description="folder of the registry models' ONNX exports, by name and weights (default: <workspace>/models)",
    )

    @model_validator(mode='after')
    def _batch_within_bound(self) -> ServiceConfig:
        if self.batch_size > self.max_batch_size:
            raise ValueError(
                f'batch_size={self.batch_size} is more than max_batch_size={self.max_batch_size}; raise '
                'max_batch_size or lower batch_size'
            )
        return self

    @field_validator('device')
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device(value)
