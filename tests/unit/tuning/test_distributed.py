"""DDP on CPU: two gloo processes train the same weights as one process on the same global batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from pytorch_metric_learning.miners import TripletMarginMiner
from pytorch_metric_learning.utils.distributed import DistributedMinerWrapper

from executor.tuning import TrainConfig, Trainer, fit
from executor.tuning.data.digits import digits_items

# The pretrained default with BatchNorm statistics kept: per-rank batch statistics would otherwise differ from the
# global batch's (SyncBatchNorm needs CUDA). SGD keeps the comparison linear in the gradients, and SupConLoss is
# smooth: a hinge loss (TripletMarginLoss) flips triplets in and out of its average on float-rounding differences.
OPTIONS = dict(
    model='efficientnet_lite0',
    image_size=32,
    batch_size=20,
    num_items_per_class=2,
    epochs=1,
    optimizer='SGD',
    learning_rate=0.01,
    tensorboard=False,
    seed=3,
    freeze=3,
    loss='SupConLoss',
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def worker(rank: int, world: int, port: int, output_dir: str, results: dict) -> None:
    os.environ.update(
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        MASTER_ADDR='127.0.0.1',
        MASTER_PORT=str(port),
        FINETUNER_PROGRESS='0',
    )
    torch.set_num_threads(1)
    config = TrainConfig(train_data=digits_items(per_class=8, size=32), output_dir=output_dir, **OPTIONS)
    trainer = Trainer(config)
    # gathered mining: a rank's miner sees the other rank's embeddings (indices beyond its own 10)
    miner = DistributedMinerWrapper(TripletMarginMiner(margin=1.0))
    trainer.model.eval()  # the probe must not move BatchNorm statistics
    with torch.no_grad():
        images, labels = next(iter(trainer.loader))
        anchors, positives, negatives = miner(trainer.net(trainer.to_device(images)), labels)
    result = trainer.fit()
    results[rank] = {
        'state': {k: v.clone() for k, v in result.model.state_dict().items()},
        'max_mined': int(torch.cat([anchors, positives, negatives]).max()),
        'local': len(labels),
    }
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path):
    single = fit(train_data=digits_items(per_class=8, size=32), output_dir=tmp_path / 'single', **OPTIONS)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(2, free_port(), str(tmp_path / 'ddp'), results), nprocs=2, join=True)
        results = dict(results)
    # Same global batches, same loss over the gathered embeddings: equal up to float summation order (1 vs 2
    # threads, batches of 10 vs 20). Measured max |diff| after 4 SGD steps: 1.0e-5 on AVX-512 cores; 1.3e-4 to 6.0e-4
    # on AVX2-only EPYC cores, where the largest weight moved 0.045 (so 1.3 %). A DDP bug (gradients not averaged,
    # other batches) moves weights by the size of the step, hence: under 5 % of how far training moved them.
    initial = Trainer(
        TrainConfig(train_data=digits_items(per_class=8, size=32), output_dir=tmp_path / 'init', **OPTIONS)
    ).model.state_dict()
    moved = max(
        (value.float() - initial[name].float()).abs().max().item() for name, value in single.model.state_dict().items()
    )
    assert moved > 1e-2, moved
    for name, value in single.model.state_dict().items():
        diff = (results[0]['state'][name] - value).abs().max().item()
        assert diff < 0.05 * moved, (name, diff, moved)
        assert torch.equal(results[0]['state'][name], results[1]['state'][name]), name
    assert results[0]['local'] == 10 and results[0]['max_mined'] >= 10  # the miner reached the other rank's items
    written = sorted(p.name for p in (tmp_path / 'ddp').rglob('*') if p.is_file())
    assert written.count('last.pt') == 1 and 'model.pt' in written


def test_num_devices_without_torchrun_says_how_to_start_the_processes():
    with pytest.raises(
        ValueError,
        match=r'num_devices=2 asks for that many processes on this machine, but this one '
        r'runs among 1; .*torchrun --nproc-per-node 2 -m executor.tuning run.json',
    ):
        fit(train_data=digits_items(per_class=2, size=32), device='cpu', num_devices=2)
