"""Automatic batch size against a simulated memory limit."""

from __future__ import annotations

import pytest
import torch

from executor.tuning.batch_size import find_batch_size


def fake_step(limit: int, calls: list[int]):
    def trial(batch: int) -> None:
        calls.append(batch)
        if batch > limit:
            raise torch.cuda.OutOfMemoryError(f'CUDA out of memory (simulated: {batch} > {limit})')

    return trial


@pytest.mark.parametrize(
    'limit, multiple, expected', [(100, 1, 100), (100, 4, 100), (77, 4, 76), (5000, 1, 4096), (7, 4, 4)]
)
def test_finds_the_largest_batch_below_the_limit(limit, multiple, expected):
    calls: list[int] = []
    assert find_batch_size(fake_step(limit, calls), start=16, maximum=4096, multiple=multiple) == expected
    assert len(calls) <= 2 * 12  # bounded: doubling then bisection


def test_other_errors_are_not_taken_for_out_of_memory():
    def broken(batch: int) -> None:
        raise ValueError('shape mismatch')

    with pytest.raises(ValueError, match='shape mismatch'):
        find_batch_size(broken)


def test_nothing_fits():
    with pytest.raises(RuntimeError, match='even a batch of 2'):
        find_batch_size(fake_step(1, []), start=8, multiple=2)


def test_trainer_keeps_the_found_batch(tmp_path, monkeypatch):
    from executor.tuning import TrainConfig, Trainer
    from executor.tuning.data.digits import digits_items
    from executor.tuning.trainer import Trainer as TrainerClass

    limit = 24
    real = TrainerClass.compute_loss

    def limited(self, batch, labels):  # simulated device memory: more than `limit` images do not fit
        if len(batch['images']) > limit:
            raise torch.cuda.OutOfMemoryError(f'CUDA out of memory (simulated: {len(batch["images"])} > {limit})')
        return real(self, batch, labels)

    monkeypatch.setattr(TrainerClass, 'compute_loss', limited)
    trainer = Trainer(
        TrainConfig(
            model='resnet18',
            pretrained=False,
            image_size=32,
            train_data=digits_items(8),
            auto_batch_size=True,
            batch_size=8,
            num_items_per_class=4,
            epochs=1,
            tensorboard=False,
            output_dir=tmp_path,
        )
    )
    assert trainer.batch_size == 24 and trainer.sampler.batch_size == 24
    assert all(p.grad is None for p in trainer.model.parameters())  # the trials left no gradients behind
    trainer.fit()
