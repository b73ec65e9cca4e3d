"""The callback interface: the points of a run where a callback is called, and the trainer as callbacks see it.

Its own module so that every callback module (``callbacks``, ``trackers``) builds on it without importing the others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch


class TrainerState(Protocol):
    """The trainer as callbacks see it."""

    epoch: int
    epochs: int
    step: int
    total_steps: int
    should_stop: bool
    metrics_before: dict[str, float] | None
    raw_model: torch.nn.Module

    def embedder(self, batch_size: int = 64) -> Any: ...


class Callback:
    """Base class: override the hooks you need; ``state_dict``/``load_state_dict`` for what must survive a resume.

    The hooks, in the order a run calls them: ``on_fit_start``, then per epoch ``on_batch_end`` (each optimizer
    step), ``on_epoch_end`` and ``on_checkpoint``; ``on_artifact`` once the final model is saved; ``on_fit_end``
    always, also when the run fails.
    """

    def on_fit_start(self, trainer: TrainerState) -> None: ...

    def on_batch_end(self, trainer: TrainerState, loss: float) -> None: ...

    def on_epoch_end(self, trainer: TrainerState, logs: dict[str, float]) -> None: ...

    def on_checkpoint(self, trainer: TrainerState, logs: dict[str, float]) -> None:
        """After the epoch's checkpoint is written (rank 0): what has been reported here can be resumed from."""

    def on_artifact(self, trainer: TrainerState, folder: Path) -> None:
        """After the final model, its reports and its ONNX export (``to_onnx``) are written into ``folder``."""

    def on_fit_end(self, trainer: TrainerState) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
