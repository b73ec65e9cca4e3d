"""gather_across_devices: two gloo processes, each with half of the batch under DDP, get the loss and the parameter
gradients of one process holding the whole batch (MultipleNegativesRankingLoss, its cached form, CLIPLoss)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from executor.tuning.pair_losses import (
    CachedMultipleNegativesRankingLoss,
    CLIPLoss,
    MultipleNegativesRankingLoss,
    cached_loss,
    gather,
)

WORLD, B, COLUMNS, D_IN = 2, 8, 3, 16  # B: the global batch; each rank takes B / WORLD rows of every column


class Towers(nn.Module):
    """Two small encoders and a learnt logit scale: a stand-in two-tower model (and, its first tower alone, a text
    encoder), seeded so every process builds the same weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Sequential(nn.Linear(D_IN, 32), nn.Tanh(), nn.Linear(32, 8))
        self.second = nn.Sequential(nn.Linear(D_IN, 32), nn.Tanh(), nn.Linear(32, 8))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        if y is None:
            return self.first(x)
        return self.first(x), self.second(y), self.logit_scale.exp()


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    columns = torch.randn(COLUMNS, B, D_IN, generator=generator)
    images, texts = torch.randn(B, D_IN, generator=generator), torch.randn(B, D_IN, generator=generator)
    return columns, torch.stack([images, texts]), torch.tensor([0, 1, 2, 3, 4, 5, 0, 6])  # rows 0 and 6: one image


def share(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of every column (batch on axis 1)."""
    per = tensor.shape[1] // world
    return tensor[:, rank * per : (rank + 1) * per]


def step(net: nn.Module, case: str, rank: int, world: int, gathered: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward and backward of ``case`` on this rank's share; (loss, every parameter's gradient)."""
    columns, pair, groups = data()
    columns, pair = share(columns, rank, world), share(pair, rank, world)
    groups = groups.view(1, -1)[:, rank * (B // world) : (rank + 1) * (B // world)].reshape(-1)
    if case == 'clip':
        images, texts, scale = net(pair[0], pair[1])
        loss = CLIPLoss(gather_across_devices=gathered)(images, texts, scale, groups)
    elif case.startswith('cached'):
        symmetric = case.endswith('symmetric')
        rows = columns.reshape(-1, D_IN)  # every first column, then every second...
        cached = CachedMultipleNegativesRankingLoss(
            symmetric=symmetric, mini_batch_size=3, gather_across_devices=gathered
        )
        loss = cached_loss(cached, net, list(rows.split(3)), COLUMNS, None, getattr(net, 'no_sync', None))
    else:
        symmetric = case.endswith('symmetric')
        embeddings = net(columns.reshape(-1, D_IN))
        mnrl = MultipleNegativesRankingLoss(symmetric=symmetric, gather_across_devices=gathered)
        loss = mnrl(list(embeddings.chunk(COLUMNS)))
    loss.backward()
    model = net.module if isinstance(net, DistributedDataParallel) else net
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


CASES = ['mnrl', 'mnrl-symmetric', 'cached', 'cached-symmetric', 'clip']


def worker(rank: int, world: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        net = DistributedDataParallel(
            Towers(), find_unused_parameters=True
        )  # averages the ranks' gradients; MNRL uses one tower
        out = {}
        for case in CASES:
            for gathered in (True, False):
                out[case, gathered] = step(net, case, rank, world, gathered)
        probe = torch.full((2, 1), float(rank), requires_grad=True)
        everything, offset = gather(probe)
        everything.sum().backward()
        out['probe'] = (everything.detach().reshape(-1).tolist(), offset, probe.grad.reshape(-1).tolist())
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope='module')
def ranks(free_port) -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(WORLD, free_port(), results), nprocs=WORLD, join=True)
        return dict(results)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max((a[n] - b[n]).abs().max().item() for n in a)


def test_gather_puts_every_rank_rows_in_order_and_sums_their_gradients(ranks):
    for rank in range(WORLD):
        rows, offset, grad = ranks[rank]['probe']
        assert rows == [0.0, 0.0, 1.0, 1.0] and offset == 2 * rank
        assert grad == [2.0, 2.0]  # both ranks' sums reached each rank's own rows


@pytest.mark.parametrize('case', CASES)
def test_two_gloo_processes_equal_one_process_holding_the_whole_batch(ranks, case):
    single_loss, single_grads = step(Towers(), case, rank=0, world=1, gathered=True)  # no process group: no-op
    plain_loss, plain_grads = step(Towers(), case, rank=0, world=1, gathered=False)
    assert single_loss == pytest.approx(plain_loss, abs=1e-7) and max_diff(single_grads, plain_grads) < 1e-7
    losses = [ranks[rank][case, True][0] for rank in range(WORLD)]
    # each rank's loss is the mean over its own queries, so their mean is the one process's mean over all
    assert sum(losses) / WORLD == pytest.approx(single_loss, abs=1e-5)
    for rank in range(WORLD):
        assert max_diff(ranks[rank][case, True][1], single_grads) < 1e-5  # DDP's average: the global gradient
    # without gathering each rank's negatives are its own half: another loss and other gradients
    local = [ranks[rank][case, False][0] for rank in range(WORLD)]
    assert abs(sum(local) / WORLD - single_loss) > 1e-3
    assert max_diff(ranks[0][case, False][1], single_grads) > 1e-3
