"""Devices: the names training and serving accept ('auto', 'cpu', 'cuda', 'cuda:N'), the CPUs this process has, and
a batch moved to the device its model runs on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the settings check device names without loading it
    import torch

    from executor.tuning.inputs import Batch


def check_device(device: str) -> str:
    """``device`` unchanged when it is a name this project accepts; a ``ValueError`` saying which are otherwise."""
    if device in ('auto', 'cpu', 'cuda') or (device.startswith('cuda:') and device[5:].isdigit()):
        return device
    raise ValueError(
        f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}; use 'auto', 'cpu', 'cuda' "
        "or 'cuda:<index>' ('auto' takes a GPU when there is one)"
    )


def resolve_device(device: str) -> str:
    """``'auto'`` -> ``'cuda'`` when torch sees a GPU, else ``'cpu'``; ``'cuda:N'`` picks a GPU."""
    if check_device(device) == 'auto':
        import torch

        return 'cuda' if torch.cuda.is_available() else 'cpu'
    return device


def to_device(batch: Batch, device: torch.device, channels_last: bool = False) -> Batch:
    """The batch on ``device``; 4-D tensors in channels_last layout when asked (convolutional models)."""
    import torch

    moved = {}
    for name, tensor in batch.items():
        tensor = tensor.to(device, non_blocking=True)
        moved[name] = (
            tensor.contiguous(memory_format=torch.channels_last) if channels_last and tensor.ndim == 4 else tensor
        )
    return moved


def usable_cpus() -> list[int]:
    """The logical CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    if hasattr(os, 'sched_getaffinity'):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def usable_cores() -> int:
    """Physical cores among ``usable_cpus()``, SMT siblings counted once: onnxruntime's best intra-op thread count."""
    cores: set[str] = set()
    for cpu in usable_cpus():
        topology = Path(f'/sys/devices/system/cpu/cpu{cpu}/topology')
        try:
            cores.add(
                (topology / 'physical_package_id').read_text().strip()
                + ':'
                + (topology / 'core_id').read_text().strip()
            )
        except OSError:
            cores.add(f'cpu {cpu}')
    return max(1, len(cores))
