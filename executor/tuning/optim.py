"""Optimizers by name (every ``torch.optim`` class, as Finetuner took them), with new heads learning faster than the
fine-tuned backbone."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from executor.tuning.errors import did_you_mean, excerpt
from executor.tuning.options import check_options

# New heads start from random weights: next to a fine-tuned backbone they learn at HEAD_LR_FACTOR x its rate.
# Measured on digits (full fine-tune from lr 1e-4, 5 epochs): accuracy 0.70 with one rate, 0.72 with this.
HEAD_LR_FACTOR = 10.0
OPTIMIZERS = {
    name: cls
    for name, cls in vars(torch.optim).items()
    if inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
}
# torch.optim classes that cannot drive this trainer's loop, and why (what to use is said with it)
REFUSED = {
    'LBFGS': 'it re-evaluates the loss several times per step through a closure, and this trainer takes one '
    'gradient step per batch (with gradient scaling and accumulation)',
    'SparseAdam': 'it takes sparse gradients only, and the models trained here have dense ones',
    'Muon': 'it optimizes 2-D weight matrices only, and every model here also has biases and norm weights',
}


def check_optimizer(name: str, what: str = 'optimizer') -> str:
    """``name`` when it is a ``torch.optim`` class this trainer can step; a ``ValueError`` saying which are else."""
    usable = sorted(set(OPTIMIZERS) - set(REFUSED))
    if name in REFUSED:
        raise ValueError(f'{what}={name!r} cannot train here: {REFUSED[name]}; use one of {", ".join(usable)}')
    if name not in OPTIMIZERS:
        hint = did_you_mean(name, usable)
        raise ValueError(f'unknown {what} {name!r}{hint}; use one of {", ".join(usable)} (torch.optim classes)')
    return name


def build_optimizer(
    name: str, params: Any, lr: float | None, options: dict[str, Any], what: str
) -> torch.optim.Optimizer:
    options = check_options(what, OPTIMIZERS[name], options)
    if lr is not None:
        options['lr'] = lr
    try:
        return OPTIMIZERS[name](params, **options)
    except (TypeError, ValueError) as err:
        raise ValueError(f'{what} {name} rejected its options {excerpt(options)}: {err}') from err


def parameter_groups(model: nn.Module, heads: Iterable[nn.Module], lr: float) -> list[dict[str, Any]]:
    """The trainable backbone parameters at ``lr`` and the heads' at ``HEAD_LR_FACTOR * lr`` (at ``lr`` when the
    heads are all that trains, as in a linear probe)."""
    heads = list(heads)
    head_ids = {id(p) for m in heads for p in m.parameters()}
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    head = [p for m in heads for p in m.parameters() if p.requires_grad]
    if not backbone and not head:
        raise ValueError('every parameter is frozen: nothing to train; freeze fewer layers')
    head_lr = lr * HEAD_LR_FACTOR if backbone else lr
    return [g for g in ({'params': backbone}, {'params': head, 'lr': head_lr}) if g['params']]
