"""A run's checkpoint: everything an exact resume needs (weights, optimizer, schedule, scaler, heads, RNG states,
callbacks' state, the history and the pre-training metrics)."""

from __future__ import annotations

from typing import Any

import torch


def state_of(trainer: Any) -> dict[str, Any]:
    """What ``torch.save`` writes for ``trainer`` (a ``Trainer``) after an epoch."""
    return {
        'epoch': trainer.epoch,
        'step': trainer.step,
        'history': trainer.history,
        'model': trainer.raw_model.state_dict(),
        'optimizer': trainer.optimizer.state_dict(),
        'loss': trainer.loss.module.state_dict(),
        'loss_optimizer': trainer.loss_optimizer.state_dict() if trainer.loss_optimizer else None,
        'scheduler': trainer.scheduler.state_dict() if trainer.scheduler else None,
        'scaler': trainer.scaler.state_dict(),
        'heads': {name: head.state_dict() for name, head in trainer.task.heads.items()},
        'rng': torch.get_rng_state(),
        'cuda_rng': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        'callbacks': [c.state_dict() for c in trainer.callbacks],
        'metrics_before': trainer.metrics_before,
    }


def restore(trainer: Any, state: dict[str, Any]) -> None:
    """Put ``trainer`` back where ``state`` was taken, RNG included, so the run continues bit for bit."""
    trainer.raw_model.load_state_dict(state['model'])
    trainer.optimizer.load_state_dict(state['optimizer'])
    trainer.loss.module.load_state_dict(state['loss'])
    if trainer.loss_optimizer is not None:
        trainer.loss_optimizer.load_state_dict(state['loss_optimizer'])
    if trainer.scheduler is not None:
        trainer.scheduler.load_state_dict(state['scheduler'])
    # checkpoints written before tasks were classes kept the SimCLR head as `ssl_head`
    heads = state.get('heads') or {'ssl_head': state.get('ssl_head')}
    for name, head in trainer.task.heads.items():
        head.load_state_dict(heads[name])
    trainer.scaler.load_state_dict(state['scaler'])
    for callback, callback_state in zip(trainer.callbacks, state['callbacks']):
        callback.load_state_dict(callback_state)
    trainer.epoch, trainer.step, trainer.history = state['epoch'], state['step'], list(state['history'])
    trainer.metrics_before = state['metrics_before']
    torch.set_rng_state(state['rng'].cpu())
    if state['cuda_rng'] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda_rng']])
