"""Fixtures shared by every test: free local ports for the servers tests start, and jina's environment."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import pytest

# Set on import, before any test module imports jina (which reads JINA_MP_START_METHOD once, at import).
# Spawn, not fork: once a test has used a jina gRPC client, grpc's poller thread runs in this process, and a
# Deployment forked after that hangs ("Other threads are currently calling into gRPC, skipping fork() handlers").
os.environ.setdefault('JINA_MP_START_METHOD', 'spawn')
os.environ.setdefault('JINA_OPTOUT_TELEMETRY', '1')


@pytest.fixture(scope='session')
def free_port() -> Callable[[], int]:
    """Call it for a TCP port on 127.0.0.1 that nothing listens on now."""

    def pick() -> int:
        with socket.socket() as sock:
            sock.bind(('127.0.0.1', 0))
            return sock.getsockname()[1]

    return pick


@pytest.fixture(scope='session')
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One `model_cache` for the Deployments of a test session: the default model is exported to ONNX (about 20 s)
    once, on the first request that serves it, rather than once per Deployment."""
    return str(tmp_path_factory.mktemp('model-cache'))


class ValidationCounter:
    """Stands in for TrainConfig's pydantic validator and counts the validations (``TrainConfig(...)``,
    ``model_validate``); ``model_construct`` and ``model_copy`` do not validate and are not counted."""

    def __init__(self, validator) -> None:
        self.validator, self.count = validator, 0

    def validate_python(self, *args, **kwargs):
        self.count += 1
        return self.validator.validate_python(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.validator, name)


@pytest.fixture
def validations(monkeypatch) -> ValidationCounter:
    """How many times TrainConfig is validated in this process while the test runs."""
    from executor.tuning.config import TrainConfig

    counter = ValidationCounter(TrainConfig.__pydantic_validator__)
    monkeypatch.setattr(TrainConfig, '__pydantic_validator__', counter)
    return counter
