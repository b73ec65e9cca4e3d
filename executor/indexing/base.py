"""The contract every index backend keeps: upsert by id, nearest neighbours by cosine (best first, with a filter on
stored fields), delete, count, the embedding size kept with the index; and the errors an engine's absence raises."""

from __future__ import annotations

import abc
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

logger = logging.getLogger(__name__)

# The stored fields a filter may name. A filter is {field: value} or {field: [values]} (any
# of them); several fields must all match.
FILTER_FIELDS = ('uri', 'text', 'label')
Filter = dict[str, Union[str, list[str]]]


class EngineUnavailable(RuntimeError):
    """The engine behind the index did not answer; the HTTP port answers 503, the other endpoints keep serving."""


@dataclass
class Stored:
    """One indexed document: its stored fields and its embedding ``(dim,)``."""

    id: str
    uri: Optional[str]
    text: Optional[str]
    label: Optional[str]
    embedding: np.ndarray


@dataclass
class Match:
    """A stored document found for a query, and its cosine similarity to it."""

    id: str
    uri: Optional[str]
    text: Optional[str]
    label: Optional[str]
    score: float


class IndexBackend(abc.ABC):
    """One index in one engine. Methods run on the indexer's single index thread (some engines' handles are not
    thread-safe). ``dim`` is None until the first documents (or the saved index) fix it."""

    name: str  # the backend's name in uses_with, and in every error about its engine

    @abc.abstractmethod
    def saved_dim(self) -> Optional[int]:
        """The embedding size of the index already stored (a restart), or None."""

    @abc.abstractmethod
    def open(self, dim: int) -> None:
        """Opens the index (creating it if missing) for ``dim``-d embeddings."""

    @abc.abstractmethod
    def upsert(self, docs: Sequence[Stored]) -> None:
        """Stores the documents; one with the id of a stored document replaces it."""

    @abc.abstractmethod
    def search(self, queries: np.ndarray, limit: int, where: Optional[Filter]) -> list[list[Match]]:
        """For each query ``(n, dim)``, at most ``limit`` stored documents matching ``where``, best cosine first."""

    @abc.abstractmethod
    def get(self, ids: Sequence[str]) -> list[Stored]:
        """The stored documents of these ids (those that exist)."""

    @abc.abstractmethod
    def delete(self, ids: Sequence[str]) -> None:
        """Deletes the documents of these ids (all exist)."""

    @abc.abstractmethod
    def count(self) -> int:
        """The number of stored documents."""

    def close(self) -> None:
        """Releases the engine's handle (a local mode's lock on its folder, a connection); hnsw holds none."""
        return None

    def check_reachable(self) -> None:
        """Raises ``EngineUnavailable`` when the engine (a server) cannot be reached now; an embedded one always can."""
        return None


def calling(backend: IndexBackend, call, *args, **kwargs):
    """``call(*args, **kwargs)`` on the engine, checked first: a stopped engine is ``EngineUnavailable`` at once, and
    an engine error raised while the engine has become unreachable is that too; any other error is the call's own."""
    backend.check_reachable()
    try:
        return call(*args, **kwargs)
    except Exception:
        backend.check_reachable()
        raise


def unit(vectors: np.ndarray) -> np.ndarray:
    """Each row L2-normalised (a zero row stays zero): inner products of unit vectors are cosines."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


def as_values(where: Filter) -> dict[str, list[str]]:
    """A filter with each value as a list of accepted strings."""
    return {field: [value] if isinstance(value, str) else list(value) for field, value in where.items()}


def probe(engine: str, host: str, port: int, timeout: float, settings: str) -> None:
    """Raises ``EngineUnavailable`` naming the engine and its settings unless ``host:port`` accepts a TCP connection
    within ``timeout`` seconds: a stopped engine is answered at once instead of after a client's retries."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        reason = 'timed out' if isinstance(err, socket.timeout) else (err.strerror or type(err).__name__)
        raise EngineUnavailable(
            f'the {engine} engine at {host}:{port} did not answer within {timeout:g} s ({reason}); start it, or '
            f'point {settings} in uses_with at a running one'
        ) from None
