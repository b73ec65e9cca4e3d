"""Learning-rate schedules by Finetuner's names (those of transformers' ``get_scheduler``), with warmup.

Each is a multiplier of the base learning rate as a function of the optimizer step, wrapped in torch's ``LambdaLR``;
written here (30 lines) rather than pulling transformers in for them.
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from executor.tuning.config import SchedulerOptions


def _factor(step: int, *, name: str, warmup: int, total: int, cycles: float, power: float, lr_end: float) -> float:
    if name != 'constant' and step < warmup:
        return (step + 1) / max(1, warmup)
    if name in ('constant', 'constant_with_warmup'):
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if name == 'linear':
        return max(0.0, 1.0 - progress)
    if name == 'cosine':
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * cycles * progress)))
    if name == 'cosine_with_restarts':
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0))))
    if name == 'polynomial':
        return lr_end + (1.0 - lr_end) * (1.0 - progress) ** power
    raise ValueError(f'unknown scheduler {name!r}')


def build_scheduler(
    name: str | None, optimizer: Optimizer, total_steps: int, options: SchedulerOptions, steps_per_epoch: int = 1
) -> LambdaLR | None:
    """``None`` keeps the learning rate constant; ``num_warmup_steps`` < 1 is a fraction of the schedule.

    The scheduler is stepped every batch. With ``scheduler_step='epoch'`` (Finetuner's) the schedule counts epochs:
    the rate holds through an epoch and moves at its end. The schedule is ``num_training_steps`` of its steps long
    when given, else the whole run."""
    if name is None:
        return None
    per = steps_per_epoch if options.scheduler_step == 'epoch' else 1
    total_steps = options.num_training_steps or max(1, total_steps // per)
    warmup = options.num_warmup_steps
    warmup = int(round(warmup * total_steps)) if 0 < warmup < 1 else int(warmup)
    # cosine_with_restarts counts whole cycles (transformers' num_cycles=1 default); cosine half a cycle
    cycles = options.num_cycles if name == 'cosine' else max(1.0, options.num_cycles)
    base_lr = optimizer.param_groups[0]['lr']
    fn = partial(
        _factor,
        name=name,
        warmup=warmup,
        total=total_steps,
        cycles=cycles,
        power=options.power,
        lr_end=options.lr_end / base_lr if base_lr else 0.0,
    )
    return LambdaLR(optimizer, fn if per == 1 else lambda step: fn(step // per))
