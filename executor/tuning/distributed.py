"""The training process's device and its place in a DDP group (``torchrun``), NCCL on GPUs and gloo on CPU."""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(world size, rank): joins the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    NCCL on GPUs, gloo on CPU (also on a machine with GPUs when ``device='cpu'``); the rendezvous comes from
    torchrun's environment (``MASTER_ADDR``/``MASTER_PORT``).
    """
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1:
        return 1, 0
    if not dist.is_initialized():
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        if device.type == 'cuda':
            torch.cuda.set_device(device)  # NCCL's barrier and communicators use the current GPU, not GPU 0 for all
        dist.init_process_group(backend)
        logger.info('joined %s process group as rank %d of %d', backend, dist.get_rank(), dist.get_world_size())
    return dist.get_world_size(), dist.get_rank()


def training_device(device: str) -> torch.device:
    """The device of this process: under ``torchrun``, 'auto' and 'cuda' mean the GPU of its ``LOCAL_RANK``."""
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'device={device!r} but no CUDA device is visible; use device="cpu" or "auto"')
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda' and int(os.environ.get('WORLD_SIZE', '1')) > 1:
        return torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
    return torch.device(device)


def check_local_world(num_devices: int) -> None:
    """``num_devices`` > 1 must be what torchrun started on this machine."""
    local = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
    if num_devices > 1 and local != num_devices:
        raise ValueError(
            f'num_devices={num_devices} asks for that many processes on this machine, but this one runs among '
            f'{local}; torchrun starts them: train through the service (/train num_devices=...) or run `torchrun '
            f'--nproc-per-node {num_devices} -m executor.tuning run.json` (num_devices=1 when torchrun decides the '
            'count)'
        )


def agree_on_minimum(value: int, device: torch.device, world: int) -> int:
    """The smallest of every rank's ``value`` (each rank's own when alone)."""
    if world <= 1:
        return value
    shared = torch.tensor([value], device=device)
    dist.all_reduce(shared, op=dist.ReduceOp.MIN)
    return int(shared.item())
